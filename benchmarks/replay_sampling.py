"""Time sampling a batch of slices from the recipe's replay buffer, both ``replay_buffer.sampling`` modes side by side.

Builds one buffer per mode with the recipe's factory (``recipes/alm/utils.py``, ``replay_buffer.size=<n>``), fills
each with the same HalfCheetah-shaped transitions (what the recipe stores: observation and next observation of 17
floats, action of 6, reward, done, terminated, truncated, the trajectory id) in ``--episode-steps``-step episodes,
past the capacity so the storage has wrapped and an episode is in progress, then runs the recipe's pattern: write
``--frames-per-write`` frames (10), sample ``--samples-per-write`` batches (10, UTD 1) of ``--batch-size`` x
``--horizon`` slices, drawn at once as the recipe draws them (``sample_batches``), each batch timed as its share of
the draw (before 2026-11-30 each batch was a draw of its own: the rows of ``results/replay_sampling.jsonl`` without
``batches_per_draw``). Both buffers get the same writes, and after each write both modes sample, in alternating order,
so a busy neighbour on a shared CPU slows both alike. Prints one JSON line per buffer size:
``<mode>_ms_per_sample_median`` (and mean, p10, p90) over all timed samples, and the load average before and after.

    python benchmarks/replay_sampling.py                          # 100k and 1e6 transitions, 512 x 3 slices
    python benchmarks/replay_sampling.py --sizes 100000 --writes 200 >> benchmarks/results/replay_sampling.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for recipes.alm.utils
from alm_torchrl.replay import SAMPLING_MODES, TRAJ_KEY  # noqa: E402
from recipes.alm.utils import batches_per_draw, load_config, make_replay_buffer, sample_batches  # noqa: E402

OBSERVATION_DIM, ACTION_DIM = 17, 6  # HalfCheetah-v5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="buffer capacities")
    parser.add_argument("--modes", nargs="+", choices=SAMPLING_MODES, default=list(SAMPLING_MODES))
    parser.add_argument("--episode-steps", type=int, default=1000, help="length of every finished episode")
    parser.add_argument("--batch-size", type=int, default=512, help="slices per batch (optim.batch_size)")
    parser.add_argument("--horizon", type=int, default=3, help="slice length (loss.horizon)")
    parser.add_argument("--frames-per-write", type=int, default=10, help="collector.frames_per_batch")
    parser.add_argument("--samples-per-write", type=int, default=10, help="batches sampled after each write")
    parser.add_argument("--writes", type=int, default=300, help="timed writes per buffer size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("episode_steps", "batch_size", "horizon", "frames_per_write", "samples_per_write", "writes",
                 "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


class EpisodeStream:
    """HalfCheetah-shaped transitions in episodes of ``episode_steps`` steps, the last one ending in a truncation."""

    def __init__(self, episode_steps: int) -> None:
        self.episode_steps, self.frame = episode_steps, 0

    def next(self, frames: int) -> TensorDict:
        step = torch.arange(self.frame, self.frame + frames)
        self.frame += frames
        truncated = (step % self.episode_steps == self.episode_steps - 1).unsqueeze(-1)
        return TensorDict(
            {
                "observation": torch.randn(frames, OBSERVATION_DIM),
                "action": torch.rand(frames, ACTION_DIM) * 2 - 1,
                "next": {
                    "observation": torch.randn(frames, OBSERVATION_DIM),
                    "reward": torch.randn(frames, 1),
                    "done": truncated,
                    "terminated": torch.zeros_like(truncated),
                    "truncated": truncated.clone(),
                },
                TRAJ_KEY: step // self.episode_steps,
            },
            batch_size=[frames],
        )


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[round(q) - 1]


def measure(args: argparse.Namespace, size: int) -> dict:
    configs = {mode: load_config(f"replay_buffer.size={size}", f"replay_buffer.sampling={mode}",
                                 f"optim.batch_size={args.batch_size}", f"loss.horizon={args.horizon}",
                                 f"collector.frames_per_batch={args.frames_per_write}",
                                 f"optim.utd_ratio={args.samples_per_write / args.frames_per_write}")
               for mode in args.modes}
    buffers = {mode: make_replay_buffer(cfg, torch.device("cpu")) for mode, cfg in configs.items()}
    stream = EpisodeStream(args.episode_steps)
    # Past the capacity, half an episode into the next one: the storage has wrapped around, an episode is in progress.
    fill = size + args.episode_steps // 2
    while fill:
        chunk = stream.next(min(fill, 100_000))
        fill -= chunk.numel()
        for buffer in buffers.values():
            buffer.extend(chunk)
    durations: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for write in range(args.writes + 1):  # the first write warms up, untimed
        frames = stream.next(args.frames_per_write)
        for buffer in buffers.values():
            buffer.extend(frames)
        order = args.modes if write % 2 else args.modes[::-1]
        for mode in order:
            start = time.perf_counter()
            batches = sample_batches(configs[mode], buffers[mode])
            if write:
                durations[mode].extend([(time.perf_counter() - start) / len(batches)] * len(batches))
    result = {"buffer_size": size, "stored_trajectories": size // args.episode_steps + 1,
              "batches_per_draw": batches_per_draw(next(iter(configs.values()))),
              "samples_timed_per_mode": args.writes * args.samples_per_write}
    for mode, values in durations.items():
        ms = [1000 * value for value in values]
        result.update({f"{mode}_ms_per_sample_median": statistics.median(ms), f"{mode}_ms_per_sample_mean":
                       statistics.fmean(ms), f"{mode}_ms_per_sample_p10": percentile(ms, 10),
                       f"{mode}_ms_per_sample_p90": percentile(ms, 90)})
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    for size in args.sizes:
        result = {"benchmark": "replay_sampling", "cpu": cpu, "torch": torch.__version__, "threads": args.threads,
                  "batch_size": args.batch_size, "horizon": args.horizon, "episode_steps": args.episode_steps,
                  "frames_per_write": args.frames_per_write, "samples_per_write": args.samples_per_write,
                  "load_average_at_start": os.getloadavg()[0]}  # the machine's other work: a shared CPU is noisy
        result.update(measure(args, size))
        result["load_average_at_end"] = os.getloadavg()[0]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
