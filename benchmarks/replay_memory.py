"""Resident memory of a full Humanoid-sized replay buffer: filling it, checkpointing it, restoring it.

Run twice, as the recipe would: ``save`` fills a 1e6-transition buffer with Humanoid-v5-shaped transitions
(obs 348, action 17; the keys the recipe stores) and writes a checkpoint like the recipe's; ``restore`` is a fresh
process that loads that checkpoint memory-mapped and restores the buffer, as ``checkpoint.resume`` does. Each prints
one JSON line with the process's peak resident set and, at the end, its anonymous and file-backed parts.

    python benchmarks/replay_memory.py save /tmp/alm_ckpt && python benchmarks/replay_memory.py restore /tmp/alm_ckpt
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from alm_torchrl.replay import TRAJ_KEY, make_replay_buffer
from alm_torchrl.training import configure_cpu_runtime, load_checkpoint, restore_replay_buffer, save_checkpoint

CAPACITY, OBS_DIM, ACTION_DIM, EPISODE = 1_000_000, 348, 17, 1000


def memory_gib() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status[key].split()[0]) if key in status else 0  # noqa: E731
    return {
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_anon_gib": kib("RssAnon") / 2**20,
        "rss_file_gib": kib("RssFile") / 2**20,
    }


def main(mode: str, directory: str) -> None:
    configure_cpu_runtime()
    buffer = make_replay_buffer(size=CAPACITY, batch_size=512, slice_len=3)
    start = time.perf_counter()
    if mode == "save":
        episode = TensorDict(
            {
                "observation": torch.randn(EPISODE, OBS_DIM),
                "action": torch.rand(EPISODE, ACTION_DIM),
                "next": {
                    "observation": torch.randn(EPISODE, OBS_DIM),
                    "reward": torch.randn(EPISODE, 1),
                    "done": torch.zeros(EPISODE, 1, dtype=torch.bool),
                    "terminated": torch.zeros(EPISODE, 1, dtype=torch.bool),
                },
                TRAJ_KEY: torch.zeros(EPISODE, dtype=torch.long),
            },
            batch_size=[EPISODE],
        )
        for index in range(CAPACITY // EPISODE):
            episode.get(TRAJ_KEY).fill_(index)
            buffer.extend(episode)
        save_checkpoint(Path(directory) / "checkpoint.pt", {"replay_buffer": buffer.state_dict()})
    elif mode == "restore":
        state = load_checkpoint(directory, mmap=True)
        restore_replay_buffer(buffer, state["replay_buffer"], torch.device("cpu"))
        del state
    else:
        sys.exit(f"replay_memory.py: mode must be 'save' or 'restore', got {mode!r}")
    stored = buffer.storage._storage
    bytes_per_transition = sum(t.element_size() * t[0].numel() for t in stored.values(True, True))
    print(json.dumps({"mode": mode, "transitions": len(buffer), "bytes_per_transition": bytes_per_transition,
                      "seconds": time.perf_counter() - start, **memory_gib()}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
