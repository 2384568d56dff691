"""Time the original ALM implementation's update on this machine, to compare with ``update_speed.py``.

The original code (https://github.com/RajGhugare19/alm) is not part of this repository: point
``--reference-dir`` at a checkout of it. This script builds its ``AlmAgent`` with the paper's settings
(the original ``cfgs/agent/alm.yaml``), fills the agent's own replay memory with the original random
warm-up (5,000 uniformly random actions in the gymnasium MuJoCo env), then times ``agent.update(step)``,
the original's full update: a batch of sequences for the encoder and model, a second uniform batch for
the reward, classifier, critic and actor, four optimizers, soft target updates. Its numpy sampling runs
inside ``update``, so it is timed too and also reported on its own (``ms_per_sample_median``).
One JSON line on stdout, with the same keys as ``update_speed.py`` where they mean the same thing.

The original imports old ``gym`` (with ``mujoco-py``) in ``utils/env.py`` and ``wandb`` in the agent; neither is
used by the update, so this script puts small stand-ins for those two modules in ``sys.modules`` before importing
the agent, and leaves the rest of the original code as it is.

Example::

    git clone https://github.com/RajGhugare19/alm /tmp/alm-original
    python benchmarks/reference_update_speed.py --reference-dir /tmp/alm-original
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from alm_torchrl.runtime import configure_cpu_runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_speed import cpu_model, update_timings, work_per_call  # noqa: E402  (benchmarks/ is not a package)

# The sizes of the fixed-cost regime (--tiny, also update_speed.py --tiny): the arithmetic takes microseconds, so what
# is timed is Python, tensor-library and dispatch overhead.
TINY_SIZES = {"latent_dims": 8, "hidden_dims": 32, "model_hidden_dims": 32, "batch_size": 16}
# The original's cfgs/agent/alm.yaml (paper settings).
ORIGINAL_AGENT_CONFIG = dict(  # noqa: C408  (keywords, as the original's YAML keys read)
    env_buffer_size=100_000,
    gamma=0.99,
    tau=0.005,
    target_update_interval=1,
    lr={"model": 1e-4, "reward": 1e-4, "critic": 1e-4, "actor": 1e-4},
    max_grad_norm=100.0,
    batch_size=512,
    seq_len=3,
    lambda_cost=0.1,
    expl_start=1.0,
    expl_end=0.1,
    expl_duration=100_000,
    stddev_clip=0.3,
    latent_dims=50,
    hidden_dims=512,
    model_hidden_dims=1024,
    log_wandb=False,
    log_interval=500,
    identity_encoder=False,
    positive_reward=False,
    total_positive_reward=False,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-dir", required=True, type=Path,
                        help="a checkout of https://github.com/RajGhugare19/alm")
    parser.add_argument("--env", default="HalfCheetah-v5", help="a gymnasium MuJoCo id")
    parser.add_argument("--updates", type=int, default=30, help="timed updates")
    parser.add_argument("--warmup-updates", type=int, default=5, help="untimed updates first")
    parser.add_argument("--explore-steps", type=int, default=5_000,
                        help="random-action steps stored before timing (the original's explore_steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: one per core)")
    parser.add_argument("--tune-malloc", action="store_true",
                        help="apply this project's malloc tuning (configure_cpu_runtime) to the original too")
    parser.add_argument("--count-flops", action="store_true",
                        help="also report gflop_per_update, as torch.profiler counts it over 3 updates, "
                             "and the matrix multiplies' time against the machine's fp32 rate")
    parser.add_argument("--tiny", action="store_true",
                        help="the fixed-cost regime: latent 8, hidden 32, model hidden 32, batch 16 "
                             "(update_speed.py --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # p10 and p90 need two timings; the original's sequence sampler needs more stored steps than seq_len (3).
    for name, least in (("updates", 2), ("warmup_updates", 0), ("explore_steps", 4)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    agent_file = args.reference_dir / "agents" / "alm.py"
    if not agent_file.is_file():
        parser.error(f"--reference-dir {args.reference_dir}: no agents/alm.py there; "
                     "expected a checkout of https://github.com/RajGhugare19/alm")
    return args


def agent_config(agent_class: type, *, tiny: bool = False) -> dict:
    """The paper's settings (or the tiny sizes) for the keywords this version of ``AlmAgent`` takes.

    The repository's main branch has no ``identity_encoder`` / ``positive_reward`` switches (other versions do); the
    update is the same with them off.
    """
    config = {**ORIGINAL_AGENT_CONFIG, **(TINY_SIZES if tiny else {})}
    accepted = inspect.signature(agent_class.__init__).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in accepted.values()):
        return config
    return {key: value for key, value in config.items() if key in accepted}


def import_original_agent(reference_dir: Path):
    """The original ``AlmAgent``, with stand-ins for the two imports its update never uses."""

    def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
        return end + (1 - min(step / duration, 1)) * (start - end)

    def unused(*args, **kwargs):
        raise NotImplementedError("not needed to time the update")

    env_utils = types.ModuleType("utils.env")  # stands in for the original utils/env.py (old gym + mujoco-py)
    env_utils.linear_schedule = linear_schedule
    env_utils.register_mbpo_environments = env_utils.save_frames_as_gif = unused
    env_utils.GymPostiveRewardWrapper = object
    wandb = types.ModuleType("wandb")  # only called when logging, which this benchmark turns off
    wandb.log = unused
    sys.modules.setdefault("wandb", wandb)
    sys.modules["utils.env"] = env_utils
    sys.path.insert(0, str(reference_dir.resolve()))
    from agents.alm import AlmAgent

    return AlmAgent


def build_original_agent(reference_dir: Path, env_name: str, *, tiny: bool, explore_steps: int, seed: int):
    """The original ``AlmAgent`` with the paper's settings (or the tiny sizes), its replay memory filled by the
    original warm-up: ``explore_steps`` uniformly random actions; time-limit truncations are not stored as terminal."""
    AlmAgent = import_original_agent(reference_dir)
    np.random.seed(seed)
    torch.manual_seed(seed)
    env = gym.make(env_name)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its buffer size; stdout is for the one JSON line
        agent = AlmAgent(
            torch.device("cpu"),
            float(env.action_space.low[0]),
            float(env.action_space.high[0]),
            env.observation_space.shape[0],
            env.action_space.shape[0],
            **agent_config(AlmAgent, tiny=tiny),
        )
    state, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(explore_steps):
        action = env.action_space.sample()
        next_state, reward, terminated, truncated, _ = env.step(action)
        agent.env_buffer.push((state, action, reward, next_state, terminated))
        state = env.reset()[0] if terminated or truncated else next_state
    env.close()
    return agent


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_cpu_runtime(args.threads, keep_freed_memory=args.tune_malloc)
    agent = build_original_agent(
        args.reference_dir, args.env, tiny=args.tiny, explore_steps=args.explore_steps, seed=args.seed
    )

    durations = []
    for step in range(1, args.warmup_updates + args.updates + 1):
        start = time.perf_counter()
        agent.update(step)
        if step > args.warmup_updates:
            durations.append(time.perf_counter() - start)
    sample_durations = []
    for _ in range(args.updates):
        start = time.perf_counter()
        agent.env_buffer.sample_seq(agent.seq_len, agent.batch_size)
        agent.env_buffer.sample(agent.batch_size)
        sample_durations.append(time.perf_counter() - start)

    result = {
        "implementation": "original (RajGhugare19/alm)",
        "env": args.env,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_tuned": args.tune_malloc,
        "batch_size": agent.batch_size,
        "horizon": agent.seq_len,
        "tiny": args.tiny,
        "cpu": cpu_model(),
        **update_timings(durations, sample_durations),
    }
    if args.count_flops:
        next_step = args.warmup_updates + args.updates + 1
        result.update(work_per_call(lambda: agent.update(next_step)))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
