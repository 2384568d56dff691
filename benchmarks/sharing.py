"""Sharing the machine: the recipe's frames per second alone and next to busy processes.

    python benchmarks/sharing.py                       # the issue's tiny HalfCheetah run, default threads
    python benchmarks/sharing.py --threads 2           # the same with compile.num_threads=2 (torch's old default here)
    python benchmarks/sharing.py --seconds 5 --warmup-frames 100   # a smoke test
    python benchmarks/sharing.py >> benchmarks/results/sharing_<machine>.jsonl

Runs the recipe (tiny HalfCheetah: latent 8, hidden 32, batch 16) for ``--seconds`` after its random warm-up, once
alone and once next to ``--busy`` processes that each keep a core busy (a Python loop), and reports the frames per
second of each (measured from its logs: frames logged after the warm-up over the time between), their ratio, and
``keeps_a_quarter``: whether the shared run keeps at least a quarter of its solo speed. Needs a quiet machine:
"alone" must mean alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_process import SMALL, RecipeProcess, cpu_model  # noqa: E402

BUSY_LOOP = "while True: pass"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120, help="measured seconds per run, after the warm-up")
    parser.add_argument("--warmup-frames", type=int, default=1000, help="collector.init_random_frames")
    parser.add_argument("--busy", type=int, default=2, help="busy processes next to the shared run")
    parser.add_argument("--threads", type=int, default=None, help="compile.num_threads (default: the recipe's choice)")
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides")
    return parser.parse_args(argv)


def frames_per_second(overrides: list[str], seconds: float, warmup_frames: int) -> dict[str, float]:
    """Run the recipe until ``seconds`` have passed since its first log after the warm-up; frames/s in between."""
    with tempfile.TemporaryDirectory(prefix="alm-sharing-") as run_dir:
        recipe = RecipeProcess(overrides, Path(run_dir))
        first = last = None
        try:
            while recipe.running():
                time.sleep(0.2)
                frames = recipe.progress().get("frames", 0)
                if frames <= warmup_frames:
                    continue
                now = time.monotonic()
                first = first or (now, frames)
                if frames > (last or first)[1]:  # a new row: when it was first seen
                    last = (now, frames)
                if now - first[0] >= seconds:
                    break
        finally:
            recipe.stop()
        if last is None:
            raise RuntimeError(f"the recipe logged no progress after its warm-up; see {run_dir}/stderr.txt")
        return {"frames_per_s": (last[1] - first[1]) / (last[0] - first[0]), "frames": last[1] - first[1]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    overrides = [
        *SMALL, f"env.name={args.env}", f"collector.init_random_frames={args.warmup_frames}",
        "collector.total_frames=10000000", "env.max_episode_steps=100",  # a log every 100 frames
        "logger.eval_iter=10000000", "checkpoint.interval=10000000",
        *([f"compile.num_threads={args.threads}"] if args.threads else []), *args.overrides,
    ]
    solo = frames_per_second(overrides, args.seconds, args.warmup_frames)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
    try:
        shared = frames_per_second(overrides, args.seconds, args.warmup_frames)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    ratio = shared["frames_per_s"] / solo["frames_per_s"]
    result = {
        "solo_frames_per_s": solo["frames_per_s"],
        "shared_frames_per_s": shared["frames_per_s"],
        "ratio": ratio,
        "keeps_a_quarter": ratio >= 0.25,
        "busy_processes": args.busy,
        "threads": args.threads or "default",
        "seconds": args.seconds,
        "env": args.env,
        "overrides": overrides,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
