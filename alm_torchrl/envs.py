"""Environment factory for ALM: gymnasium tasks (and the paper's truncated-observation variants) as TorchRL envs.

Every env is a ``GymEnv`` (or, with ``num_envs > 1``, a ``GymWrapper`` around copies of the task stepped together, so
that evaluation runs its episodes side by side) wrapped in the SOTA-script transform stack
``Compose(InitTracker(), StepCounter(max_episode_steps), DoubleToFloat(), RewardSum())``. gymnasium's own
``TimeLimit`` is disabled so that ``StepCounter`` alone decides when an episode is cut: a time limit then shows up as
``("next", "truncated")=True`` with ``("next", "terminated")=False``, which is what lets the TD target bootstrap through
it and lets the slice sampler keep sequences inside one episode.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gymnasium
import mujoco
import numpy as np
import torch
from gymnasium.envs.mujoco import MujocoEnv
from tensordict import TensorDictBase
from torchrl.envs import (
    Compose,
    DoubleToFloat,
    EnvBase,
    GymEnv,
    GymWrapper,
    InitTracker,
    RewardSum,
    StepCounter,
    TransformedEnv,
)

__all__ = [
    "DEFAULT_MAX_EPISODE_STEPS",
    "DEFAULT_REPLAY_BUFFER_SIZE",
    "ENV_PRESETS",
    "EnvPreset",
    "SimulatorState",
    "check_env_name",
    "make_env",
    "replay_buffer_size_for",
    "rollout_episodes",
]

DEFAULT_MAX_EPISODE_STEPS = 1000
DEFAULT_REPLAY_BUFFER_SIZE = 100_000


@dataclass(frozen=True)
class EnvPreset:
    """A named task from the ALM paper: which gymnasium env to build, with which kwargs, and its buffer size."""

    gym_id: str
    make_kwargs: Mapping[str, Any] = field(default_factory=dict)
    replay_buffer_size: int = DEFAULT_REPLAY_BUFFER_SIZE
    max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS


# T-Ant / T-Humanoid (paper Table 1) drop the contact and inertia terms: 27 and 45 observation dims.
ENV_PRESETS: dict[str, EnvPreset] = {
    "HalfCheetah-v5": EnvPreset("HalfCheetah-v5"),
    "Walker2d-v5": EnvPreset("Walker2d-v5"),
    "Hopper-v5": EnvPreset("Hopper-v5"),
    "Ant-v5": EnvPreset("Ant-v5"),
    "Humanoid-v5": EnvPreset("Humanoid-v5", replay_buffer_size=1_000_000),
    "T-Ant": EnvPreset("Ant-v5", {"include_cfrc_ext_in_observation": False}),
    "T-Humanoid": EnvPreset(
        "Humanoid-v5",
        {
            "include_cinert_in_observation": False,
            "include_cvel_in_observation": False,
            "include_qfrc_actuator_in_observation": False,
            "include_cfrc_ext_in_observation": False,
        },
        replay_buffer_size=1_000_000,
    ),
}


def check_env_name(env_name: str, *, allow_presets: bool = True) -> None:
    """Raise a one-line ``ValueError`` if ``env_name`` is neither a preset nor a registered gymnasium id.

    Only looks names up in ``gymnasium.envs.registry`` (no env is built), so a typo fails before any heavy work.
    """
    if allow_presets and env_name in ENV_PRESETS:
        return
    if env_name in gymnasium.envs.registry:
        return
    known = [*ENV_PRESETS, *gymnasium.envs.registry] if allow_presets else list(gymnasium.envs.registry)
    close = difflib.get_close_matches(env_name, list(dict.fromkeys(known)), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    presets = f"a preset ({', '.join(ENV_PRESETS)}) or " if allow_presets else ""
    raise ValueError(f"Unknown environment {env_name!r}: expected {presets}any registered gymnasium id{hint}")


def replay_buffer_size_for(env_name: str) -> int:
    """Replay buffer capacity the paper uses for ``env_name``: the preset's, else 100,000 transitions."""
    preset = ENV_PRESETS.get(env_name)
    return preset.replay_buffer_size if preset is not None else DEFAULT_REPLAY_BUFFER_SIZE


def make_env(
    env_name: str,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    max_episode_steps: int | None = None,
    from_preset: bool = True,
    make_kwargs: Mapping[str, Any] | None = None,
    num_envs: int = 1,
) -> TransformedEnv:
    """Build ``env_name`` (a preset name or any gymnasium id) as a seeded, float32 TorchRL env.

    Args:
        env_name: a key of ``ENV_PRESETS`` or a registered gymnasium id.
        seed: seeds the env if given.
        device: device of the env's outputs.
        max_episode_steps: episode length enforced by ``StepCounter`` (truncation); defaults to the preset's
            value, or 1000 for a plain gymnasium id.
        from_preset: if False, ``env_name`` is always read as a gymnasium id and preset kwargs are ignored.
        make_kwargs: extra ``gymnasium.make`` kwargs, applied over the preset's.
        num_envs: copies of the task in one env of batch size ``[num_envs]``, stepped one after the other in this
            process (a gymnasium ``SyncVectorEnv``); 1 (the default) gives an unbatched env. Seeded with ``seed``,
            copy ``i`` gets ``seed + i``. :func:`rollout_episodes` runs one episode in each copy.
    """
    check_env_name(env_name, allow_presets=from_preset)
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    make_kwargs = dict(make_kwargs or {})
    if "max_episode_steps" in make_kwargs:
        raise ValueError("make_kwargs must not set max_episode_steps; pass make_env(max_episode_steps=...) instead")
    preset = ENV_PRESETS.get(env_name) if from_preset else None
    if preset is not None:
        gym_id, make_kwargs = preset.gym_id, {**preset.make_kwargs, **make_kwargs}
    else:
        gym_id = env_name
    if max_episode_steps is None:
        max_episode_steps = preset.max_episode_steps if preset is not None else DEFAULT_MAX_EPISODE_STEPS
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")

    # max_episode_steps=-1 tells gymnasium.make not to add TimeLimit: StepCounter is the only time limit.
    if num_envs == 1:
        base_env = GymEnv(gym_id, device=device, max_episode_steps=-1, **make_kwargs)
    else:
        # Not GymEnv(num_envs=n): that steps the copies in n subprocesses, which cost more than MuJoCo's step on a
        # small CPU. SAME_STEP autoreset, because TorchRL's partial steps (rollout(break_when_all_done=True)) keep
        # stepping a finished copy, its data masked, until the others finish; DISABLED refuses to step it.
        vector_env = gymnasium.vector.SyncVectorEnv(
            [partial(gymnasium.make, gym_id, max_episode_steps=-1, **make_kwargs)] * num_envs,
            autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP,
        )
        base_env = GymWrapper(vector_env, device=device)
    env = TransformedEnv(
        base_env,
        Compose(InitTracker(), StepCounter(max_episode_steps), DoubleToFloat(), RewardSum()),
        auto_unwrap=True,  # a vector env comes wrapped in TorchRL's VecGymEnvTransform: ours go after it, in one env
    )
    if seed is not None:
        env.set_seed(seed)
    return env


def rollout_episodes(
    env: EnvBase, policy: Callable, max_steps: int, num_episodes: int | None = None
) -> list[TensorDictBase]:
    """Episodes of ``policy`` in ``env``, each at most ``max_steps`` long, as tensordicts of shape ``[T_i]``.

    One rollout gives one episode per copy of ``env`` (one for an unbatched env), in the order of the copies: a
    batched env (:func:`make_env` with ``num_envs > 1``) runs its copies side by side until the last one is done, and
    a copy that finished earlier repeats its last step meanwhile (TorchRL's partial steps), which is cut off here.
    ``num_episodes`` runs as many rollouts as it takes and returns the first ``num_episodes``; None: one rollout.
    """
    batched = len(env.batch_size) > 0
    episodes: list[TensorDictBase] = []
    while not episodes or (num_episodes is not None and len(episodes) < num_episodes):
        rollout = env.rollout(
            max_steps,
            policy,
            auto_cast_to_device=True,
            break_when_any_done=not batched,
            break_when_all_done=batched,
        )
        rollout = rollout.reshape(-1, rollout.shape[-1])
        done = rollout.get(("next", "done")).reshape(rollout.shape)
        lengths = torch.where(done.any(-1), done.int().argmax(-1) + 1, rollout.shape[-1])
        episodes += [episode[:length] for episode, length in zip(rollout.unbind(0), lengths.tolist())]
    return episodes if num_episodes is None else episodes[:num_episodes]


class SimulatorState:
    """The state of an env's simulators that its next steps and resets depend on, as a checkpoint component.

    ``state_dict()`` holds, for each copy of the task in ``env`` (one, or ``num_envs`` from :func:`make_env`), the
    random generator its resets draw from (gymnasium's ``np_random``) and the simulator's state: MuJoCo's full
    integration state (``mj_getState(mjSTATE_INTEGRATION)``, the state from which MuJoCo reproduces the next step
    bitwise) for gymnasium's MuJoCo tasks, the ``state`` array for classic-control tasks such as Pendulum.
    ``load_state_dict`` puts them back. :attr:`restorable` is False for a task whose state this cannot capture: its
    ``state_dict()`` is then empty and the caller must start a fresh episode after loading.
    TorchRL's own per-step state (the observation, step count, episode return) lives in the tensordict a
    collector carries from step to step, not here.
    """

    def __init__(self, env: EnvBase) -> None:
        self.env = env

    def _copies(self) -> list[gymnasium.Env]:
        base = getattr(self.env, "base_env", self.env)
        # GymLikeEnv keeps the gymnasium env it wraps in ``_env`` (a vector env for make_env(num_envs > 1)).
        gym_env = getattr(base, "_env", None)
        if gym_env is None:
            return []
        return [copy.unwrapped for copy in getattr(gym_env, "envs", [gym_env])]

    @property
    def restorable(self) -> bool:
        copies = self._copies()
        return bool(copies) and all(_simulator_kind(copy) is not None for copy in copies)

    def state_dict(self) -> dict[str, Any]:
        if not self.restorable:
            return {}
        return {"copies": [_copy_state(copy) for copy in self._copies()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        copies = self._copies()
        saved = state.get("copies")
        if saved is None or len(saved) != len(copies) or not self.restorable:
            raise ValueError(
                f"cannot restore the simulator state of {len(saved or [])} env copies into {type(self.env).__name__} "
                f"with {len(copies)} restorable copies"
            )
        for copy, copy_state in zip(copies, saved):
            _load_copy_state(copy, copy_state)


def _simulator_kind(env: gymnasium.Env) -> str | None:
    if isinstance(env, MujocoEnv):
        return "mujoco"
    if isinstance(getattr(env, "state", None), np.ndarray):
        return "state"
    return None


def _copy_state(env: gymnasium.Env) -> dict[str, Any]:
    kind = _simulator_kind(env)
    if kind == "mujoco":
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        simulator = np.empty(mujoco.mj_stateSize(env.model, spec))
        mujoco.mj_getState(env.model, env.data, simulator, spec)
    else:
        simulator = env.state
    # np_random's bit generator state: plain ints (PCG64) or arrays (MT19937), both stored without pickle.
    return {"np_random": env.np_random.bit_generator.state, kind: torch.from_numpy(simulator.copy())}


def _load_copy_state(env: gymnasium.Env, state: dict[str, Any]) -> None:
    env.np_random.bit_generator.state = state["np_random"]
    kind = _simulator_kind(env)
    simulator = state[kind].cpu().numpy()
    if kind == "mujoco":
        mujoco.mj_setState(env.model, env.data, simulator, mujoco.mjtState.mjSTATE_INTEGRATION)
    else:
        env.state = simulator.astype(env.state.dtype, copy=True)
