"""Environment factory for ALM: gymnasium tasks (and the paper's truncated-observation variants) and DeepMind Control
Suite tasks (``dmc/<domain>-<task>``) as TorchRL envs.

A gymnasium task is a ``GymWrapper`` around ``gymnasium.make`` (or, with ``num_envs > 1``, around copies of the task
stepped together, so that evaluation runs its episodes side by side); a DMC task is a ``DMControlWrapper`` whose
observation entries are concatenated into ``observation`` (``CatTensors``, as TorchRL's own recipes do), its copies
stepped together by a ``SerialEnv``. Both get the SOTA-script transforms: ``DoubleToFloat()`` on each copy, then
``Compose(InitTracker(), StepCounter(max_episode_steps), RewardSum())``. gymnasium's own ``TimeLimit`` is disabled so
that ``StepCounter`` alone decides when an episode is cut: a time limit then shows up as ``("next", "truncated")=True``
with ``("next", "terminated")=False``, which is what lets the TD target bootstrap through it and lets the slice sampler
keep sequences inside one episode. DMC's own time limit (1000 steps, a LAST step with discount 1) reads the same way:
TorchRL's DMC wrapper reports it as ``truncated``, never ``terminated``.

Action repeat (``frame_skip``) repeats each action for that many env steps and sums their rewards, so returns are
those of the full episode; episode lengths (``max_episode_steps``) count env steps, as the literature counts them.

Rendering: ``image_size`` adds a ``pixels`` entry (uint8, ``[H, W, 3]``) rendered off-screen at every step next to the
state ``observation``. MuJoCo picks its OpenGL backend when dm_control is first imported, so :func:`make_env` chooses
an off-screen one (``MUJOCO_GL=egl``) first when none is set and there is no display
(:func:`select_offscreen_gl_backend`); :func:`check_offscreen_rendering` says in one line what to install when that
cannot work. Render either gymnasium or DMC tasks in one process: once dm_control has rendered, gymnasium's EGL renderer
returns black frames in the same process (measured with dm-control 1.0.50, mujoco 3.17, Mesa's EGL).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
    ActionScaling,
    CatFrames,
    CatTensors,
    Compose,
    DMControlWrapper,
    DoubleToFloat,
    EnvBase,
    ExcludeTransform,
    FlattenObservation,
    GymWrapper,
    InitTracker,
    RewardSum,
    SerialEnv,
    StepCounter,
    ToTensorImage,
    TransformedEnv,
)

__all__ = [
    "DEFAULT_MAX_EPISODE_STEPS",
    "DEFAULT_REPLAY_BUFFER_SIZE",
    "DMC_PREFIX",
    "ENV_PRESETS",
    "EnvPreset",
    "SimulatorState",
    "agent_steps",
    "check_continuous_task",
    "check_env_name",
    "check_offscreen_rendering",
    "check_rendering",
    "dmc_task",
    "make_env",
    "renders_mujoco",
    "replay_buffer_size_for",
    "rollout_episodes",
    "select_offscreen_gl_backend",
    "stacked_pixels",
]

DEFAULT_MAX_EPISODE_STEPS = 1000
DEFAULT_REPLAY_BUFFER_SIZE = 100_000
DMC_PREFIX = "dmc/"
"""``env_name`` prefix of a DeepMind Control Suite task: ``dmc/<domain>-<task>``, e.g. ``dmc/cheetah-run``."""
# Rendering cameras other than 0, as DrQ-v2, TD-MPC2 and the ALM DMC fork render them.
DMC_CAMERA_IDS = {"quadruped": 2}


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


def select_offscreen_gl_backend() -> str | None:
    """Set ``MUJOCO_GL=egl`` when it is unset and there is no display (Linux); return the backend in use.

    dm_control fixes its OpenGL backend when it is first imported and, without ``MUJOCO_GL``, picks GLFW, which needs a
    display; gymnasium tries the backends in turn. Call this before dm_control is imported (:func:`make_env` does).
    """
    no_display = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if "MUJOCO_GL" not in os.environ and sys.platform.startswith("linux") and no_display:
        os.environ["MUJOCO_GL"] = "egl"
    return os.environ.get("MUJOCO_GL")


def check_offscreen_rendering() -> None:
    """Raise a one-line ``RuntimeError`` saying what to install if MuJoCo cannot render here (before heavy work).

    Makes MuJoCo's rendering context for an empty model in a tiny OpenGL context of the backend
    :func:`select_offscreen_gl_backend` leaves in place, then frees both.
    """
    backend = select_offscreen_gl_backend() or "glfw"
    try:
        if backend == "egl":
            from mujoco.egl import GLContext
        elif backend == "osmesa":
            from mujoco.osmesa import GLContext
        else:
            from mujoco.glfw import GLContext
        gl_context = GLContext(16, 16)
        try:
            gl_context.make_current()
            mujoco.MjrContext(mujoco.MjModel.from_xml_string("<mujoco/>"), mujoco.mjtFontScale.mjFONTSCALE_100).free()
        finally:
            gl_context.free()
    except Exception as err:  # missing libraries, no display or no device: each backend fails in its own way
        reason = _first_line(err)
        raise RuntimeError(
            f"MuJoCo cannot render off-screen here (MUJOCO_GL={backend}: {reason}); install EGL (Debian/Ubuntu: "
            "apt install libegl1) and use MUJOCO_GL=egl, or OSMesa (apt install libosmesa6) and MUJOCO_GL=osmesa"
        ) from None


def dmc_task(env_name: str) -> tuple[str, str] | None:
    """``(domain, task)`` of a ``dmc/<domain>-<task>`` name (not checked against the suite); None for other names."""
    if not env_name.startswith(DMC_PREFIX):
        return None
    domain, _, task = env_name[len(DMC_PREFIX):].partition("-")
    return domain, task


def _dmc_suite(env_name: str):
    select_offscreen_gl_backend()
    try:
        from dm_control import suite
    except ImportError:
        raise ValueError(
            f"{env_name!r} is a DeepMind Control Suite task, which needs dm-control: pip install 'alm-torchrl[dmc]' "
            "(from a checkout: pip install -e '.[dmc]')"
        ) from None
    return suite


def check_env_name(env_name: str, *, allow_presets: bool = True) -> None:
    """Raise a one-line ``ValueError`` if ``env_name`` is neither a preset, a registered gymnasium id nor a DMC task.

    Only looks names up in ``gymnasium.envs.registry`` or ``dm_control.suite.ALL_TASKS`` (no env is built), so a typo
    fails before any heavy work; gymnasium names never import dm_control.
    """
    task = dmc_task(env_name)
    if task is not None:
        suite = _dmc_suite(env_name)
        if task in suite.ALL_TASKS:
            return
        known = [f"{DMC_PREFIX}{domain}-{name}" for domain, name in suite.ALL_TASKS]
        close = difflib.get_close_matches(env_name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown DeepMind Control Suite task {env_name!r}: expected {DMC_PREFIX}<domain>-<task> for a task of "
            f"dm_control.suite.ALL_TASKS, e.g. {DMC_PREFIX}cheetah-run{hint}"
        )
    if allow_presets and env_name in ENV_PRESETS:
        return
    if env_name in gymnasium.envs.registry:
        return
    known = [*ENV_PRESETS, *gymnasium.envs.registry] if allow_presets else list(gymnasium.envs.registry)
    close = difflib.get_close_matches(env_name, list(dict.fromkeys(known)), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    presets = f"a preset ({', '.join(ENV_PRESETS)}), " if allow_presets else ""
    raise ValueError(
        f"Unknown environment {env_name!r}: expected {presets}any registered gymnasium id or a DeepMind Control Suite "
        f"task ({DMC_PREFIX}<domain>-<task>){hint}"
    )


def check_continuous_task(env_name: str) -> None:
    """Raise a one-line ``ValueError`` if the gymnasium task ``env_name`` (a valid name: :func:`check_env_name`) cannot
    be built here, a package it needs being missing (Box2D, say), or does not take continuous (``Box``) actions, which
    ALM needs.

    Builds the bare task once, without TorchRL (milliseconds); presets and DMC tasks, all continuous MuJoCo tasks, pass.
    """
    if env_name in ENV_PRESETS or dmc_task(env_name) is not None:
        return
    with _bare_gymnasium_task(env_name) as env:
        space = env.action_space
    if not isinstance(space, gymnasium.spaces.Box):
        raise ValueError(
            f"{env_name!r} takes {type(space).__name__} actions; ALM needs continuous (Box) actions: a MuJoCo or "
            "DMC task, or another continuous-control task such as Pendulum-v1"
        )


def check_rendering(env_name: str) -> None:
    """Raise a one-line ``RuntimeError`` saying what to install if ``env_name`` (a valid name that builds:
    :func:`check_continuous_task`) cannot render here: MuJoCo off-screen (:func:`check_offscreen_rendering`), or one
    frame of another gymnasium task (classic-control and Box2D tasks draw with pygame)."""
    if renders_mujoco(env_name):
        check_offscreen_rendering()
        return
    with _bare_gymnasium_task(env_name, render_mode="rgb_array") as env:
        env.reset(seed=0)
        try:
            env.render()
        except gymnasium.error.DependencyNotInstalled as err:
            raise RuntimeError(f"{env_name!r} cannot render here: {_first_line(err)}") from None


@contextmanager
def _bare_gymnasium_task(env_id: str, **make_kwargs: Any) -> Iterator[gymnasium.Env]:
    """``gymnasium.make(env_id)`` without a time limit, closed on exit; a missing package it needs is a ``ValueError``
    that names it (gymnasium's message says what to install)."""
    try:
        env = gymnasium.make(env_id, max_episode_steps=-1, **make_kwargs)
    except (gymnasium.error.DependencyNotInstalled, ImportError) as err:
        raise ValueError(f"{env_id!r} cannot be built here: {_first_line(err)}") from None
    try:
        yield env
    finally:
        env.close()


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def renders_mujoco(env_name: str) -> bool:
    """Whether ``env_name`` (a valid name: :func:`check_env_name`) is a MuJoCo task, rendered at any image size: a DMC
    task or a gymnasium MuJoCo task (presets included)."""
    if dmc_task(env_name) is not None:
        return True
    preset = ENV_PRESETS.get(env_name)
    env_id = preset.gym_id if preset is not None else env_name
    return "mujoco" in str(gymnasium.envs.registry[env_id].entry_point)


def stacked_pixels(num_frames: int = 3) -> Compose:
    """What an image encoder reads from an env made with ``make_env(image_size=...)``: its ``pixels`` as ``[C, H, W]``
    uint8 (``ToTensorImage`` without scaling: the frames stay bytes in the replay buffer, the encoder scales them), the
    last ``num_frames`` of them stacked along the channels (``CatFrames``, the first frame of an episode repeated), and
    no state ``observation`` (``ExcludeTransform``). DrQ-v2's protocol with ``num_frames=3`` and 84x84 images.

    Append it to the env: ``env.append_transform(stacked_pixels(3))``.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer (DrQ-v2: 3), got {num_frames!r}")
    return Compose(
        ToTensorImage(from_int=False, dtype=torch.uint8, in_keys=["pixels"]),
        CatFrames(N=num_frames, dim=-3, in_keys=["pixels"]),
        ExcludeTransform("observation"),
    )


def agent_steps(env_steps: int, frame_skip: int) -> int:
    """The agent steps that take ``env_steps`` env steps at action repeat ``frame_skip``, rounded up."""
    _check_frame_skip(frame_skip)
    return -(-env_steps // frame_skip)


def _check_frame_skip(frame_skip: int) -> None:
    if isinstance(frame_skip, bool) or not isinstance(frame_skip, int) or frame_skip < 1:
        raise ValueError(f"frame_skip must be a positive integer, got {frame_skip!r}")


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
    frame_skip: int = 1,
    image_size: tuple[int, int] | None = None,
    fast_render: bool = False,
    scale_actions: bool = False,
) -> TransformedEnv:
    """Build ``env_name`` (a preset name, any gymnasium id or a DMC task) as a seeded, float32 TorchRL env.

    Args:
        env_name: a key of ``ENV_PRESETS``, a registered gymnasium id or ``dmc/<domain>-<task>`` for a task of
            ``dm_control.suite.ALL_TASKS`` (needs the ``dmc`` extra).
        seed: seeds the env if given.
        device: device of the env's outputs.
        max_episode_steps: episode length in env steps, enforced by ``StepCounter`` (truncation) as
            ``ceil(max_episode_steps / frame_skip)`` agent steps; defaults to the preset's value, or 1000 (for a DMC
            task, the suite's own time limit of 1000 env steps ends its episodes anyway).
        from_preset: if False, ``env_name`` is always read as a gymnasium id or DMC task and preset kwargs are ignored.
        make_kwargs: extra kwargs of ``gymnasium.make`` (applied over the preset's) or of the DMC task's constructor.
        num_envs: copies of the task in one env of batch size ``[num_envs]``, stepped one after the other in this
            process (a gymnasium ``SyncVectorEnv``, else a TorchRL ``SerialEnv``); 1 (the default) gives an unbatched
            env. Seeded with ``seed``, each copy gets its own seed (``seed + i`` for copy ``i`` of a gymnasium task).
            :func:`rollout_episodes` runs one episode in each copy.
        frame_skip: action repeat: each agent step applies its action for ``frame_skip`` env steps and returns the
            sum of their rewards (TorchRL's ``frame_skip``; every copy repeats on its own).
        image_size: ``(height, width)`` of a ``pixels`` entry (uint8 RGB) rendered off-screen at every step, next to
            the state ``observation`` (the task's default camera; camera 2 for DMC quadruped, as DrQ-v2); None: no
            rendering. gymnasium tasks outside MuJoCo render at their own size.
        fast_render: render MuJoCo tasks without shadows, reflections and multisampling, 20-30x cheaper with a
            software OpenGL (Mesa's llvmpipe, what EGL gives on a machine without a GPU).
        scale_actions: the agent acts in ``[-1, 1]`` and TorchRL's ``ActionScaling`` maps its actions affinely onto
            the task's bounds, so that ALM's tanh-bounded actor reaches the whole action box. Off by default, as in the
            original ALM, where a task whose bounds are not ``[-1, 1]`` gets the actor's mean unscaled (Pendulum-v1's
            torque bound is 2: the mean then uses at most half of it) and its noisy actions clamped to the bounds.
    """
    check_env_name(env_name, allow_presets=from_preset)
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    _check_frame_skip(frame_skip)
    make_kwargs = dict(make_kwargs or {})
    if "max_episode_steps" in make_kwargs:
        raise ValueError("make_kwargs must not set max_episode_steps; pass make_env(max_episode_steps=...) instead")
    preset = ENV_PRESETS.get(env_name) if from_preset else None
    if preset is not None:
        env_id, make_kwargs = preset.gym_id, {**preset.make_kwargs, **make_kwargs}
    else:
        env_id = env_name
    if max_episode_steps is None:
        max_episode_steps = preset.max_episode_steps if preset is not None else DEFAULT_MAX_EPISODE_STEPS
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
    if image_size is not None:
        select_offscreen_gl_backend()

    task = dmc_task(env_id)
    if task is not None:
        make_copy = partial(_make_dmc_env, *task, device=device, frame_skip=frame_skip, image_size=image_size,
                            fast_render=fast_render, task_kwargs=make_kwargs)
    else:
        mujoco_task = renders_mujoco(env_id)
        if image_size is not None and mujoco_task:
            make_kwargs.update(height=image_size[0], width=image_size[1])
        make_copy = partial(_make_gym_env, env_id, device=device, frame_skip=frame_skip,
                            from_pixels=image_size is not None, fast_render=fast_render and mujoco_task,
                            make_kwargs=make_kwargs)
    if num_envs == 1:
        base_env = make_copy()
    elif task is None and frame_skip == 1 and image_size is None:
        # Not GymEnv(num_envs=n): that steps the copies in n subprocesses, which cost more than MuJoCo's step on a
        # small CPU. SAME_STEP autoreset, because TorchRL's partial steps (rollout(break_when_all_done=True)) keep
        # stepping a finished copy, its data masked, until the others finish; DISABLED refuses to step it.
        vector_env = gymnasium.vector.SyncVectorEnv(
            [partial(gymnasium.make, env_id, max_episode_steps=-1, **make_kwargs)] * num_envs,
            autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP,
        )
        base_env = TransformedEnv(GymWrapper(vector_env, device=device), DoubleToFloat(), auto_unwrap=True)
    else:
        # Copies stepped by a SerialEnv: DMC has no vector env, and TorchRL's frame-skip loop stops a gymnasium vector
        # env's step for every copy as soon as one copy's episode ends.
        base_env = SerialEnv(num_envs, make_copy)
    env = TransformedEnv(
        base_env,
        Compose(InitTracker(), StepCounter(agent_steps(max_episode_steps, frame_skip)), RewardSum()),
        auto_unwrap=True,  # a vector env comes wrapped in TorchRL's VecGymEnvTransform: ours go after it, in one env
    )
    if scale_actions:
        env.append_transform(ActionScaling())
        try:
            _ = env.action_spec  # ActionScaling checks that every bound is finite when it transforms the spec
        except RuntimeError as err:
            env.close()
            raise ValueError(
                f"scale_actions needs finite action bounds to scale to [-1, 1]; {env_name}: {err}"
            ) from None
    if seed is not None:
        env.set_seed(seed)
    return env


def _make_gym_env(
    env_id: str,
    *,
    device: torch.device | str,
    frame_skip: int,
    from_pixels: bool,
    fast_render: bool,
    make_kwargs: Mapping[str, Any],
) -> TransformedEnv:
    """One copy of a gymnasium task, in float32 (see :func:`_make_dmc_env` for why the cast happens per copy)."""
    # max_episode_steps=-1 tells gymnasium.make not to add TimeLimit: StepCounter is the only time limit. Made here
    # rather than by GymEnv, so that the model's look can change before the pixel wrapper renders its first frame.
    gym_env = gymnasium.make(env_id, max_episode_steps=-1, render_mode="rgb_array" if from_pixels else None,
                             **make_kwargs)
    if fast_render:
        _drop_costly_render_effects(gym_env.unwrapped.model)
    base_env = GymWrapper(gym_env, device=device, frame_skip=frame_skip, from_pixels=from_pixels, pixels_only=False)
    return TransformedEnv(base_env, DoubleToFloat())


def _make_dmc_env(
    domain: str,
    task: str,
    *,
    device: torch.device | str,
    frame_skip: int,
    image_size: tuple[int, int] | None,
    fast_render: bool,
    task_kwargs: Mapping[str, Any],
) -> TransformedEnv:
    """One copy of a DMC task: its state entries concatenated into a float32 ``observation``.

    The observation transforms act on each copy, not on the ``SerialEnv`` that steps several: when some copies have
    finished, TorchRL's partial step fills their slots from the batch's transformed (float32) entries, which must then
    match the copies' own outputs.
    """
    from dm_control import suite

    # suite.load wrapped, rather than TorchRL's DMControlEnv, because DMControlEnv (0.14.1) hands render_kwargs (the
    # image size) to the task's constructor, which refuses them.
    dm_env = suite.load(domain, task, task_kwargs=dict(task_kwargs))
    render_kwargs = None
    if image_size is not None:
        render_kwargs = {"height": image_size[0], "width": image_size[1], "camera_id": DMC_CAMERA_IDS.get(domain, 0)}
        if fast_render:
            _drop_costly_render_effects(dm_env.physics.model)
    base_env = DMControlWrapper(
        dm_env,
        device=device,
        frame_skip=frame_skip,
        from_pixels=image_size is not None,
        pixels_only=False,
        render_kwargs=render_kwargs,
    )
    state_keys = [key for key in base_env.observation_spec.keys() if key != "pixels"]
    # CatTensors needs flat entries: a few tasks (manipulator, stacker) observe [n, d] arrays.
    matrices = [key for key in state_keys if base_env.observation_spec[key].ndim > 1]
    flatten = [FlattenObservation(-2, -1, in_keys=matrices)] if matrices else []
    return TransformedEnv(
        base_env, Compose(*flatten, CatTensors(in_keys=state_keys, out_key="observation"), DoubleToFloat())
    )


def _drop_costly_render_effects(model: mujoco.MjModel) -> None:
    """No shadows, reflections or multisampling: what a software OpenGL spends most of a frame on (20-30x cheaper on
    Mesa's llvmpipe). Visual fields of the model only, read when its rendering context is made; the physics is
    untouched. (gymnasium's ``visual_options`` cannot do it: 1.4 applies them to the visualisation flags, not the
    rendering flags.)"""
    model.vis.quality.offsamples = 0
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0


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
    ``load_state_dict`` puts them back. :attr:`restorable` is False for a task whose state this cannot capture (a DMC
    task, or an env with a transform that remembers past steps: ``CatFrames``' stacked frames): its
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
        if not isinstance(gym_env, (gymnasium.Env, gymnasium.vector.VectorEnv)):  # none, or a DMC task's dm_env
            return []
        return [copy.unwrapped for copy in getattr(gym_env, "envs", [gym_env])]

    @property
    def restorable(self) -> bool:
        copies = self._copies()
        transforms = self.env.transform.modules() if isinstance(self.env, TransformedEnv) else ()
        remembers_steps = any(isinstance(transform, CatFrames) for transform in transforms)
        return bool(copies) and not remembers_steps and all(_simulator_kind(copy) is not None for copy in copies)

    def state_dict(self) -> dict[str, Any]:
        if not self.restorable:
            return {}
        return {"copies": [_copy_state(copy) for copy in self._copies()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # saved from a task whose state could not be captured: nothing to restore
            return
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
