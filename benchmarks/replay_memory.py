"""Resident memory of a Humanoid run with its full 1e6-transition replay buffer: checkpointing it, resuming it.

Run twice, as a resumed run would: ``save`` builds the recipe's modules, loss, optimizer and buffer for Humanoid-v5
at the paper's settings, fills the whole buffer with Humanoid-shaped transitions (obs 348, action 17; the keys the
recipe stores), runs a few updates and writes the recipe's checkpoint (``save_seconds``); ``restore`` is a fresh
process that resumes from it as ``checkpoint.resume`` does (``TrainingCheckpoints.load``: the buffer's memory-mapped
files copied into its storage, then released) and then trains. Each prints one JSON line with the seconds it took to
fill (save) or to resume (restore), the process's peak resident set and, at the end, its anonymous and file-backed
parts. Everything is built by the recipe's factories (``recipes/alm/utils.py``).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import fill_buffer, torchrl_logs_to_stderr  # noqa: E402  (benchmarks/ is not a package)

from alm_torchrl.envs import make_env  # noqa: E402
from alm_torchrl.replay import TRAJ_KEY  # noqa: E402
from recipes.alm.utils import (  # noqa: E402  (update_speed puts the repository root on sys.path)
    checkpoint_metadata,
    configure_runtime,
    load_config,
    make_checkpoints,
    make_learner,
    make_replay_buffer,
    sample_batches,
)

ENV_NAME, EPISODE, UPDATES = "Humanoid-v5", 1000, 3


def memory_gib() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status[key].split()[0]) if key in status else 0  # noqa: E731
    return {
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_anon_gib": kib("RssAnon") / 2**20,
        "rss_file_gib": kib("RssFile") / 2**20,
    }


def synthetic_episode(obs_dim: int, action_dim: int) -> TensorDict:
    """An episode of ``EPISODE`` random transitions with the keys the recipe stores (trajectory id 0)."""
    return TensorDict(
        {
            "observation": torch.randn(EPISODE, obs_dim),
            "action": torch.rand(EPISODE, action_dim) * 2 - 1,
            "next": {
                "observation": torch.randn(EPISODE, obs_dim),
                "reward": torch.randn(EPISODE, 1),
                "done": torch.zeros(EPISODE, 1, dtype=torch.bool),
                "terminated": torch.zeros(EPISODE, 1, dtype=torch.bool),
            },
            TRAJ_KEY: torch.zeros(EPISODE, dtype=torch.long),
        },
        batch_size=[EPISODE],
    )


def main(mode: str, directory: str) -> None:
    if mode not in ("save", "restore"):
        sys.exit(f"replay_memory.py: mode must be 'save' or 'restore', got {mode!r}")
    torchrl_logs_to_stderr()
    cfg = load_config(f"env.name={ENV_NAME}", "collector.device=cpu", f"checkpoint.dir={directory}")
    configure_runtime(cfg)
    device = torch.device("cpu")
    env = make_env(cfg.env.name)
    learner = make_learner(cfg, env, device, check_every=1)
    replay_buffer = make_replay_buffer(cfg, device)
    checkpoints = make_checkpoints(cfg, learner, replay_buffer)

    start = time.perf_counter()
    if mode == "save":
        episode = synthetic_episode(env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1])
        replay_buffer.extend(episode)
        fill_buffer(replay_buffer, episode, EPISODE)
    else:
        checkpoints.load(directory, device=device)
    seconds = time.perf_counter() - start
    for batch in sample_batches(cfg, replay_buffer)[:UPDATES]:
        learner.update(batch)
    save_seconds = None
    if mode == "save":
        start = time.perf_counter()
        checkpoints.save(len(replay_buffer), checkpoint_metadata(cfg, len(replay_buffer), UPDATES))
        save_seconds = time.perf_counter() - start
    stored = replay_buffer.storage._storage
    bytes_per_transition = sum(t.element_size() * t[0].numel() for t in stored.values(True, True))
    print(json.dumps({"mode": mode, "env": ENV_NAME, "transitions": len(replay_buffer),
                      "bytes_per_transition": bytes_per_transition, "seconds": seconds, "save_seconds": save_seconds,
                      "updates_after": UPDATES, **memory_gib()}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
