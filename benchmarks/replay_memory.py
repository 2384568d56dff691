"""Resident memory of a Humanoid run with its full 1e6-transition replay buffer: checkpointing it, resuming it.

Run twice, as a resumed run would: ``save`` builds the recipe's modules, loss, optimizer and buffer for Humanoid-v5
at the paper's settings, fills the whole buffer with Humanoid-shaped transitions (obs 348, action 17; the keys the
recipe stores), runs a few updates and writes the recipe's checkpoint; ``restore`` is a fresh process that resumes
from it as ``checkpoint.resume`` does (:func:`alm_torchrl.training.resume_training`: the checkpoint memory-mapped,
the buffer copied out of it) and then trains. Each prints one JSON line with the seconds it took to fill (save) or
to resume (restore), the process's peak resident set and, at the end, its anonymous and file-backed parts.

    python benchmarks/replay_memory.py save /tmp/alm_ckpt && python benchmarks/replay_memory.py restore /tmp/alm_ckpt
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from torchrl.objectives import SoftUpdate

from alm_torchrl.envs import make_env
from alm_torchrl.replay import TRAJ_KEY, sample_slices
from alm_torchrl.training import (
    CHECKPOINT_FILENAME,
    checkpoint_state,
    configure_cpu_runtime,
    make_loss,
    make_modules,
    make_optimizers,
    make_recipe_replay_buffer,
    make_update,
    resume_training,
    save_checkpoint,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import fill_buffer, torchrl_logs_to_stderr  # noqa: E402  (benchmarks/ is not a package)

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "alm"
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
    with initialize_config_dir(config_dir=str(RECIPE_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"env.name={ENV_NAME}", "collector.device=cpu"])
    configure_cpu_runtime(cfg.compile.num_threads)
    device = torch.device("cpu")
    env = make_env(cfg.env.name)
    modules = make_modules(cfg, env, device)
    loss = make_loss(cfg, modules, device)
    optimizer = make_optimizers(loss, cfg.optim.lr)
    update = make_update(loss, optimizer, SoftUpdate(loss, tau=cfg.loss.tau), max_grad_norm=cfg.optim.max_grad_norm)
    replay_buffer = make_recipe_replay_buffer(cfg, device)
    checkpoint = Path(directory) / CHECKPOINT_FILENAME

    start = time.perf_counter()
    if mode == "save":
        episode = synthetic_episode(env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1])
        replay_buffer.extend(episode)
        fill_buffer(replay_buffer, episode, EPISODE)
    else:
        resume_training(checkpoint, loss=loss, optimizer=optimizer, exploration_noise=modules.exploration_noise,
                        replay_buffer=replay_buffer, device=device)
    seconds = time.perf_counter() - start
    for _ in range(UPDATES):
        update(sample_slices(replay_buffer, cfg.optim.batch_size, cfg.loss.horizon))
    if mode == "save":
        save_checkpoint(checkpoint, checkpoint_state(
            cfg, collected_frames=len(replay_buffer), num_updates=UPDATES, loss=loss, optimizer=optimizer,
            exploration_noise=modules.exploration_noise, replay_buffer=replay_buffer,
        ))
    stored = replay_buffer.storage._storage
    bytes_per_transition = sum(t.element_size() * t[0].numel() for t in stored.values(True, True))
    print(json.dumps({"mode": mode, "env": ENV_NAME, "transitions": len(replay_buffer),
                      "bytes_per_transition": bytes_per_transition, "seconds": seconds,
                      "updates_after": UPDATES, **memory_gib()}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
