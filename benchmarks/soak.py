"""Soak test: a long recipe run at small sizes, watched for slow leaks (resident memory, open files, update time).

    python benchmarks/soak.py                                  # 50,000 updates, HalfCheetah, small networks
    python benchmarks/soak.py --updates 2000 --sample-every 500  # a smoke test
    python benchmarks/soak.py > benchmarks/results/soak_<machine>.jsonl

Runs the recipe unchanged, as a subprocess, with everything a long run does: collection, updates, an evaluation and a
checkpoint every ``--interval`` frames, CSV logging. The replay buffer is small (10,000 transitions, full after the
first 10,000 frames) so that a full buffer's memory is part of the warm-up. Every ``--sample-every`` updates (at the
first log it sees, polling every half second, that many updates after its previous sample) it records the recipe's
resident memory, open file descriptors and mean update time over the last window, one JSON line
each, then a summary line: the growth of each after the warm-up (``--warmup-updates``), from the first third of the
remaining samples to the last third, and ``flat``: memory and update time within ``--tolerance`` (5%) and no more
open files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_process import SMALL, RecipeProcess, cpu_model, window_update_ms  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=50_000, help="updates to run (UTD 1: as many frames)")
    parser.add_argument("--sample-every", type=int, default=2500, help="updates between two samples")
    parser.add_argument("--warmup-updates", type=int, default=10_000, help="updates before growth is measured")
    parser.add_argument("--warmup-frames", type=int, default=1000, help="random frames before the first update")
    parser.add_argument("--interval", type=int, default=5000, help="frames between evaluations and checkpoints")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed growth after warm-up (fraction)")
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the recipe runs (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides")
    return parser.parse_args(argv)


def growth(samples: list[dict], key: str, reduce=statistics.mean) -> float | None:
    """Relative change of ``key`` from the first third of ``samples`` to the last third (each reduced by ``reduce``,
    so that a sample taken during a checkpoint write, with its transient memory and files, does not decide it)."""
    values = [sample[key] for sample in samples if sample.get(key) is not None]
    third = len(values) // 3
    if third < 1:
        return None
    first, last = reduce(values[:third]), reduce(values[-third:])
    return (last - first) / first if first else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warmup_frames = args.warmup_frames
    overrides = [
        *SMALL, f"env.name={args.env}", f"collector.init_random_frames={warmup_frames}",
        # updates start with the batch that ends the warm-up
        f"collector.total_frames={warmup_frames - 10 + args.updates}",
        "replay_buffer.size=10000", f"logger.eval_iter={args.interval}", f"checkpoint.interval={args.interval}",
        "logger.num_eval_episodes=2", "compile.num_threads=1", *args.overrides,
    ]
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="alm-soak-"))
    recipe = RecipeProcess(overrides, run_dir)
    samples, previous, next_at = [], None, args.sample_every
    while recipe.running():
        time.sleep(0.5)
        try:
            sample = recipe.sample()
        except (FileNotFoundError, ProcessLookupError, StopIteration):  # it just ended
            break
        if sample.get("updates", 0) < next_at:
            continue
        sample["window_update_ms"] = window_update_ms(previous, sample) if previous else None
        samples.append(sample)
        print(json.dumps(sample), flush=True)
        previous, next_at = sample, sample["updates"] + args.sample_every
    code = recipe.stop()
    after_warmup = [sample for sample in samples if sample["updates"] >= args.warmup_updates]
    rss, update = growth(after_warmup, "rss_mb"), growth(after_warmup, "window_update_ms")
    fds = growth(after_warmup, "open_fds", reduce=max)
    summary = {
        "summary": True,
        "exit_code": code,
        "updates": samples[-1]["updates"] if samples else 0,
        "samples_after_warmup": len(after_warmup),
        "rss_growth": rss,
        "open_fds_growth": fds,
        "update_ms_growth": update,
        "flat": code == 0 and None not in (rss, fds, update) and abs(rss) <= args.tolerance and fds <= 0
        and update <= args.tolerance,
        "env": args.env,
        "overrides": overrides,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "run_dir": str(run_dir),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
