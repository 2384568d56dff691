"""Time and memory of ALM's update from pixels, and of the frame-efficient replay buffer that feeds it.

Builds the learner with the recipe's config and factories (``make_learner``) for a stand-in pixel task (random
``uint8`` frames, ``--frames`` of them stacked by ``CatFrames``, episodes of 500 transitions as DMC's 1000 steps with
action repeat 2, 6-d actions), fills a frame buffer (``alm_torchrl.replay.make_replay_buffer(pixels_key="pixels")``,
the storage the recipe will use for pixels) through a TorchRL ``Collector``, then prints one JSON line:

- ``ms_per_update_median`` (p10, p90): one update (five losses, one backward, Adam, target update) on a ``[B, K]``
  batch: the online encoder sees ``B`` images (s_0), the target encoder ``B * (K + 1)`` (s_0..s_K);
- ``ms_per_sample_median``: sampling that batch, its stacks rebuilt from the frame store; ``ms_per_shift_median``:
  DrQ's random shift (``RandomShift(pad=4)``) of its observations and next observations; ``sample_share``: both
  as a share of sample + shift + update;
- ``bytes_per_transition``: the frame ring and the transitions' other fields, per stored transition, and
  ``buffer_gib`` for ``--buffer-size`` transitions; ``rss_gib_filling``: what the process's resident set grew by
  while filling it; ``max_rss_gib``: its peak;
- ``gflop_per_update`` with ``--count-flops`` (``torch.profiler``'s count: convolutions and matrix products).

The recipe's pixel environments are not built here (rendering is ``env.from_pixels``'s business): the update's cost
depends on the sizes only.

Examples::

    python benchmarks/pixel_update.py                               # DrQ-v2's: 84x84, 3 frames, batch 256, 32 channels
    python benchmarks/pixel_update.py --cpu-size                    # the reduced CPU size (64x64, batch 64)
    python benchmarks/pixel_update.py --buffer-size 100000 --updates 0   # the memory of a 100k-transition buffer
    python benchmarks/pixel_update.py --device cuda --updates 20    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import CatFrames, Compose, EnvBase, InitTracker, TransformedEnv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import cpu_model, synchronize, torchrl_logs_to_stderr, work_per_call  # noqa: E402

from alm_torchrl.replay import TRAJ_KEY, make_replay_buffer, sample_slices  # noqa: E402
from alm_torchrl.transforms import RandomShift  # noqa: E402
from recipes.alm.utils import ConfigError, configure_runtime, load_config, make_learner, resolve_device  # noqa: E402

EPISODE_LENGTH, ACTION_DIM = 500, 6
# The reduced CPU size (--cpu-size): 64x64 frames, 64 slices per batch; channels, frames and K as DrQ-v2 / ALM.
CPU_SIZE = {"image_size": 64, "batch_size": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=84, help="frame height and width (DrQ-v2: 84)")
    parser.add_argument("--frames", type=int, default=3, help="stacked frames (DrQ-v2: 3)")
    parser.add_argument("--conv-channels", type=int, default=32, help="network.conv_channels (DrQ-v2: 32)")
    parser.add_argument("--batch-size", type=int, default=256, help="optim.batch_size, slices per update (DrQ-v2: 256)")
    parser.add_argument("--cpu-size", action="store_true", help=f"the reduced CPU size: {CPU_SIZE}")
    parser.add_argument("--device", default="cpu", help="collector.device: cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="compile.num_threads (default: one per core)")
    parser.add_argument("--updates", type=int, default=5, help="timed updates (0: measure the buffer only)")
    parser.add_argument("--warmup-updates", type=int, default=1, help="untimed updates first")
    parser.add_argument("--buffer-size", type=int, default=5000, help="transitions to store (and the capacity)")
    parser.add_argument("--count-flops", action="store_true", help="also report gflop_per_update")
    parser.add_argument("overrides", nargs="*", help="more recipe config overrides, e.g. network.hidden_dim=256")
    args = parser.parse_args(argv)
    if args.cpu_size:
        for name, value in CPU_SIZE.items():
            setattr(args, name, value)
    for name, least in (("image_size", 15), ("frames", 1), ("batch_size", 1), ("updates", 0), ("warmup_updates", 0),
                        ("buffer_size", EPISODE_LENGTH)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.updates == 1:
        parser.error("--updates must be 0 or >= 2 (p10 and p90 need two)")
    return args


class RandomFramesEnv(EnvBase):
    """A stand-in pixel task: random ``uint8`` RGB frames, episodes of ``EPISODE_LENGTH`` steps, reward 0."""

    def __init__(self, image_size: int) -> None:
        super().__init__(batch_size=[])
        self.observation_spec = Composite(pixels=Bounded(0, 255, shape=(3, image_size, image_size), dtype=torch.uint8))
        self.action_spec = Bounded(-1.0, 1.0, shape=(ACTION_DIM,))
        self.reward_spec = Unbounded(shape=(1,))
        self.image_size, self.steps = image_size, 0

    def _frame(self) -> torch.Tensor:
        return torch.randint(0, 256, (3, self.image_size, self.image_size), dtype=torch.uint8)

    def _reset(self, tensordict):
        self.steps = 0
        flag = torch.zeros(1, dtype=torch.bool)
        return TensorDict({"pixels": self._frame(), "done": flag, "terminated": flag.clone()}, [])

    def _step(self, tensordict):
        self.steps += 1
        flag = torch.tensor([self.steps >= EPISODE_LENGTH])  # DMC's time limit: truncation, not termination
        return TensorDict({"pixels": self._frame(), "reward": torch.zeros(1), "done": flag,
                           "terminated": torch.zeros(1, dtype=torch.bool), "truncated": flag.clone()}, [])

    def _set_seed(self, seed):
        torch.manual_seed(seed)


def resident_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torchrl_logs_to_stderr()
    try:
        cfg = load_config(
            "compile.compile=false",  # eager: the time is the convolutions', compilation adds little to them
            f"collector.device={args.device}",
            f"optim.batch_size={args.batch_size}",
            f"network.conv_channels={args.conv_channels}",
            *([f"compile.num_threads={args.threads}"] if args.threads else []),
            *args.overrides,
        )
        device = resolve_device(cfg)
        configure_runtime(cfg)
    except ConfigError as err:
        sys.exit(f"pixel_update.py: invalid config: {err}")
    torch.manual_seed(cfg.env.seed)
    env = TransformedEnv(
        RandomFramesEnv(args.image_size), Compose(InitTracker(), CatFrames(N=args.frames, dim=-3, in_keys=["pixels"]))
    )
    learner = make_learner(cfg, env, device)
    horizon, batch_size = cfg.loss.horizon, cfg.optim.batch_size
    replay_buffer = make_replay_buffer(
        size=args.buffer_size, batch_size=batch_size, slice_len=horizon, device=device, pixels_key="pixels",
        num_frames=args.frames,
    )
    shift = RandomShift(pad=4)
    result: dict = {
        "image": [3 * args.frames, args.image_size, args.image_size],
        "conv_channels": cfg.network.conv_channels,
        "batch_size": batch_size,
        "horizon": horizon,
        "images_per_update": batch_size * (horizon + 2),  # online encoder: s_0; target encoder: s_0..s_K
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

    rss_before, start = resident_gib(), time.perf_counter()
    collector = Collector(
        env, None, frames_per_batch=min(1000, args.buffer_size), total_frames=args.buffer_size, storing_device=device
    )
    for data in collector:
        replay_buffer.extend(data.select(*learner.loss.in_keys, TRAJ_KEY))
    collector.shutdown()
    storage = replay_buffer.storage
    frames, capacity = storage._ring
    transition_bytes = sum(t.element_size() * t[0].numel() for t in storage._storage.values(True, True))
    frame_bytes = frames[0].numel() * frames.element_size()
    result.update({
        "buffer_transitions": len(replay_buffer),
        "buffer_fill_s": time.perf_counter() - start,
        "frames_written": storage.frames_written,
        "frame_capacity": capacity,
        "bytes_per_frame": frame_bytes,
        # The ring is allocated for frame_capacity frames: one per transition, and the reserve for episode starts.
        "bytes_per_transition": (capacity * frame_bytes) / storage.max_size + transition_bytes,
        "buffer_gib": (capacity * frame_bytes + storage.max_size * transition_bytes) / 2**30,
        "rss_gib_filling": resident_gib() - rss_before,
    })

    if args.updates:
        durations, sample_durations, shift_durations = [], [], []
        for step in range(args.warmup_updates + args.updates):
            start = time.perf_counter()
            batch = sample_slices(replay_buffer, batch_size, horizon)
            synchronize(device)
            sampled = time.perf_counter()
            batch = shift(batch)
            synchronize(device)
            shifted = time.perf_counter()
            learner.update(batch)
            synchronize(device)
            if step >= args.warmup_updates:
                sample_durations.append(sampled - start)
                shift_durations.append(shifted - sampled)
                durations.append(time.perf_counter() - shifted)
        deciles = statistics.quantiles(durations, n=10)
        update_ms = 1000 * statistics.median(durations)
        sample_ms = 1000 * statistics.median(sample_durations)
        shift_ms = 1000 * statistics.median(shift_durations)
        result.update({
            "ms_per_update_median": update_ms,
            "ms_per_update_p10": 1000 * deciles[0],
            "ms_per_update_p90": 1000 * deciles[-1],
            "ms_per_sample_median": sample_ms,
            "ms_per_shift_median": shift_ms,
            "sample_share": (sample_ms + shift_ms) / (sample_ms + shift_ms + update_ms),
            "updates_timed": len(durations),
        })
        if args.count_flops:
            # The work only: from pixels most of it is in convolutions, which the matmul figures leave out.
            result["gflop_per_update"] = work_per_call(
                lambda: learner.update(shift(sample_slices(replay_buffer, batch_size, horizon))), calls=2, on_cpu=False
            )["gflop_per_update"]
    result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
