"""The ALM recipe's factories: everything that reads the Hydra config (``config.yaml``) lives here.

As in TorchRL's ``sota-implementations``, ``alm.py`` reads top to bottom and calls these ``make_*`` functions; the
library (``alm_torchrl``, ``alm_torchrl.objectives``) takes plain, typed arguments and never sees the config.
Benchmarks and tests build their training objects through these same factories (``load_config`` composes the config
as ``alm.py`` gets it).

Config checking happens in three places, each value checked once:

- types: :class:`ALMConfig`, the config's structured schema (``apply_schema``);
- ranges and choices: the component that owns the value (``ALMLoss`` its ``lmbda``, ``make_alm_modules`` the noise
  schedule, ``make_replay_buffer`` the batch size, ...), whose one-line ``ValueError`` the factory re-raises naming the
  config key (:func:`naming_config_keys`);
- what involves several keys or the machine (updates per batch, episode length against the horizon, the device, the
  task's actions and packages, the logger's package, a resumed checkpoint): :func:`validate_config`.

All of them raise :class:`ConfigError`, which ``alm.py`` prints as one ``alm.py: invalid config: ...`` line.
"""

import csv
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch._inductor.config
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tensordict import TensorDict, TensorDictBase
from torchrl.collectors import Collector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import EnvBase, TransformedEnv
from torchrl.objectives import SoftUpdate
from torchrl.record.loggers import Logger, generate_exp_name, get_logger

from alm_torchrl import ALMModules, make_alm_modules
from alm_torchrl.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_PREFIX, CheckpointError, TrainingCheckpoints
from alm_torchrl.envs import (
    agent_steps,
    check_continuous_task,
    check_env_name,
    check_offscreen_rendering,
    check_rendering,
    make_env,
    renders_mujoco,
    replay_buffer_size_for,
    stacked_pixels,
)
from alm_torchrl.objectives import ALMLoss
from alm_torchrl.replay import make_replay_buffer as make_slice_replay_buffer
from alm_torchrl.replay import sample_slices
from alm_torchrl.runtime import (
    AdaptiveThreads,
    configure_cpu_runtime,
    estimate_update_gflop,
    skip_pandas_lookup_in_tensordict_from_any,
    torch_compile_failure,
)
from alm_torchrl.transforms import RandomShift
from alm_torchrl.update import make_optimizer as make_grouped_optimizer
from alm_torchrl.update import make_target_updater, make_update
from alm_torchrl.video import MP4CSVLogger, make_video_env as make_recording_env, torchcodec_can_encode

RECIPE_DIR = Path(__file__).resolve().parent
# TorchRL's logger backends (torchrl.record.loggers.get_logger) and the package each needs beyond torchrl.
LOGGER_PACKAGES = {
    "csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"
}
# The backends that take logger.video=true, and the module (and requirement) each encodes videos with: PyAV writes the
# CSV logger's mp4 files where torchcodec cannot (alm_torchrl.video); TensorBoard imports moviepy.editor (moviepy < 2).
VIDEO_ENCODERS = {"csv": ("av", "av"), "tensorboard": ("moviepy.editor", "moviepy<2"), "wandb": ("moviepy", "moviepy")}


class ConfigError(ValueError):
    """A bad config value, said in one line that names its key and what would be valid."""


# ------------------------------------------------------------------------------------------------ the config's types
@dataclass
class EnvConfig:
    name: str = MISSING
    seed: int = MISSING
    max_episode_steps: int = MISSING
    frame_skip: Optional[int] = MISSING
    scale_actions: bool = MISSING
    from_pixels: bool = MISSING
    image_size: int = MISSING
    num_frames: int = MISSING


@dataclass
class CollectorConfig:
    total_frames: int = MISSING
    init_random_frames: int = MISSING
    frames_per_batch: int = MISSING
    device: str = MISSING


@dataclass
class ReplayBufferConfig:
    size: Optional[int] = MISSING
    prefetch: Optional[int] = MISSING
    sampling: str = MISSING
    random_shift: int = MISSING


@dataclass
class OptimConfig:
    batch_size: int = MISSING
    lr: float = MISSING
    utd_ratio: float = MISSING
    gamma: float = MISSING
    max_grad_norm: float = MISSING


@dataclass
class NetworkConfig:
    latent_dim: int = MISSING
    hidden_dim: int = MISSING
    model_hidden_dim: int = MISSING
    encoder: str = MISSING
    conv_channels: int = MISSING
    conv_feature_dim: int = MISSING
    classifier: str = MISSING
    actor_std: str = MISSING


@dataclass
class LossConfig:
    horizon: int = MISSING
    lmbda: float = MISSING
    classifier_coef: float = MISSING
    noise_clip: float = MISSING
    tau: float = MISSING
    kl_term: bool = MISSING
    value_term: bool = MISSING
    actor_objective: str = MISSING
    log_reward_shift: Optional[float] = MISSING
    entropy_coef: float = MISSING


@dataclass
class ExplorationConfig:
    noise_init: float = MISSING
    noise_end: float = MISSING
    annealing_frames: int = MISSING


@dataclass
class CompileConfig:
    compile: Any = MISSING  # true, false or "auto" (validate_config)
    compile_mode: Optional[str] = MISSING
    cudagraphs: bool = MISSING
    num_threads: Optional[int] = MISSING
    cache_dir: Optional[str] = MISSING


@dataclass
class LoggerConfig:
    backend: Optional[str] = MISSING
    exp_name: str = MISSING
    eval_iter: int = MISSING
    num_eval_episodes: int = MISSING
    eval_latent: str = MISSING
    lower_bound_bias: bool = MISSING
    video: bool = MISSING
    video_every: int = MISSING
    video_fast_render: bool = MISSING


@dataclass
class CheckpointConfig:
    interval: int = MISSING
    dir: str = MISSING
    resume: Optional[str] = MISSING


@dataclass
class ALMConfig:
    """The types of ``config.yaml``'s keys (its values and their documentation are in the YAML)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    replay_buffer: ReplayBufferConfig = field(default_factory=ReplayBufferConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def apply_schema(cfg: DictConfig) -> DictConfig:
    """``cfg`` typed by :class:`ALMConfig`: numbers given as strings are converted, a wrong type is a ConfigError.

    ``env.frame_skip=null`` becomes its value: 2 with ``env.from_pixels`` (DrQ-v2's protocol), else 1.
    """
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ALMConfig), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None
    if cfg.env.frame_skip is None:
        cfg.env.frame_skip = 2 if cfg.env.from_pixels else 1
    return cfg


def load_config(*overrides: str) -> DictConfig:
    """The recipe's config with ``overrides``, composed and typed as ``alm.py`` gets it (for tests and benchmarks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPE_DIR), version_base="1.3"):
        return apply_schema(compose(config_name="config", overrides=list(overrides)))


@contextmanager
def naming_config_keys(**keys: str) -> Iterator[None]:
    """Re-raise a component's ``ValueError`` about one of its arguments as a :class:`ConfigError` naming the key.

    Components start such messages with the argument's name (``"lmbda must be a number in [0, 1] ..."``); ``keys``
    maps argument names to config keys (``lmbda="loss.lmbda"``). Other errors pass through unchanged.
    """
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        message = str(err)
        argument = message.split(" ", 1)[0]
        if argument not in keys:
            raise
        raise ConfigError(keys[argument] + message[len(argument):]) from None


# --------------------------------------------------------------------------------------------------- cross checks
def resolve_device(cfg: DictConfig) -> torch.device:
    """``collector.device``: ``auto`` is CUDA when available, else the CPU."""
    name = cfg.collector.device
    if name in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"collector.device={name!r} is not a valid torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"collector.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def compile_enabled(cfg: DictConfig, device: torch.device) -> bool:
    """Whether to ``torch.compile`` the update and the behaviour policy: ``compile.compile`` unless torch.compile does
    not work on ``device`` here, which is checked once and said in one line on stderr (the run then goes on eager).
    """
    if cfg.compile.compile is False:
        return False
    failure = torch_compile_failure(device.type)
    if failure is not None:
        _say_once(f"alm.py: compile.compile={cfg.compile.compile}: torch.compile does not work here, running eager "
                  f"({failure}; on the CPU it needs a C++ compiler and Python's headers, "
                  "e.g. apt install g++ python3-dev)")
    return failure is None


@functools.cache
def _say_once(message: str) -> None:
    print(message, file=sys.stderr)


def updates_per_batch(cfg: DictConfig) -> int:
    """Updates after each collected batch: ``collector.frames_per_batch x optim.utd_ratio``, rounded.

    :func:`validate_config` refuses a product that is not a whole number.
    """
    return round(cfg.collector.frames_per_batch * cfg.optim.utd_ratio)


def batches_per_draw(cfg: DictConfig) -> int:
    """Training batches the replay buffer draws at once: every update of a collected batch (the buffer does not change
    between them, and at small sizes one draw costs about as much as one batch), but one at a time from pixels, where
    ten batches of image stacks at once would hold ten times the memory."""
    return 1 if cfg.env.from_pixels else max(updates_per_batch(cfg), 1)


def sample_batches(cfg: DictConfig, replay_buffer: TensorDictReplayBuffer) -> list[TensorDictBase]:
    """The ``updates_per_batch(cfg)`` training batches of one collected batch, ``[optim.batch_size, loss.horizon]``
    slices each, from a buffer built by :func:`make_replay_buffer`."""
    per_draw = batches_per_draw(cfg)
    draws = (
        sample_slices(replay_buffer, cfg.optim.batch_size, cfg.loss.horizon, num_batches=per_draw)
        for _ in range(updates_per_batch(cfg) // per_draw)
    )
    return [batch for draw in draws for batch in draw.unbind(0)]


def replay_buffer_capacity(cfg: DictConfig) -> int:
    """``replay_buffer.size``, or the task's paper capacity (100k; 1e6 for Humanoid) when it is null."""
    return cfg.replay_buffer.size or replay_buffer_size_for(cfg.env.name)


def validate_config(cfg: DictConfig) -> None:
    """The checks that involve several keys, the machine or a checkpoint, before anything is built.

    A ``cfg.checkpoint.resume`` path must already be absolute (Hydra changes the working directory); ``auto`` and
    ``checkpoint.dir`` are read relative to the run directory.
    """
    try:
        check_env_name(cfg.env.name)
        check_continuous_task(cfg.env.name)
    except ValueError as err:
        raise ConfigError(f"env.name: {err}") from None
    # numpy's global seed (alm.py) and dm_control's are 32-bit; the evaluation copies and a resumed run seed their envs
    # with env.seed plus a few, or plus the frames collected.
    if not 0 <= cfg.env.seed < 2**31:
        raise ConfigError(f"env.seed must be an integer in [0, 2**31 - 1], got {cfg.env.seed}")
    if cfg.env.max_episode_steps < 1:
        raise ConfigError(f"env.max_episode_steps must be >= 1 (env steps), got {cfg.env.max_episode_steps}")
    horizon, frame_skip = cfg.loss.horizon, cfg.env.frame_skip
    with naming_config_keys(frame_skip="env.frame_skip"):
        episode = agent_steps(cfg.env.max_episode_steps, frame_skip)
    # Slices never cross an episode boundary, so no stored episode could fill a longer slice.
    if horizon > episode:
        raise ConfigError(
            f"loss.horizon={horizon} is longer than any episode (env.max_episode_steps={cfg.env.max_episode_steps} "
            f"env steps = {episode} agent steps at env.frame_skip={frame_skip}); use loss.horizon <= {episode}"
        )
    if agent_steps(cfg.collector.init_random_frames, frame_skip) < horizon:
        raise ConfigError(
            f"collector.init_random_frames={cfg.collector.init_random_frames} cannot fill one slice of "
            f"loss.horizon={horizon} before the first update; use at least {horizon * frame_skip} "
            f"(env steps, at env.frame_skip={frame_skip})"
        )
    product = cfg.collector.frames_per_batch * cfg.optim.utd_ratio
    if cfg.collector.frames_per_batch < 1 or updates_per_batch(cfg) < 1 or not math.isclose(product, round(product)):
        raise ConfigError(
            f"collector.frames_per_batch={cfg.collector.frames_per_batch} x optim.utd_ratio={cfg.optim.utd_ratio} = "
            f"{product} updates per collected batch; choose them so that this is a whole number >= 1"
        )
    buffer_size = cfg.replay_buffer.size
    if buffer_size is not None and buffer_size < cfg.optim.batch_size * horizon:
        raise ConfigError(
            f"replay_buffer.size={buffer_size} is smaller than one batch of optim.batch_size x loss.horizon = "
            f"{cfg.optim.batch_size * horizon} transitions; raise replay_buffer.size or lower the batch"
        )
    if cfg.loss.entropy_coef > 0 and cfg.network.actor_std != "learned":
        raise ConfigError(
            f"loss.entropy_coef={cfg.loss.entropy_coef} (ALM-ENT) needs an actor that learns its std: add "
            "network.actor_std=learned"
        )
    if cfg.collector.total_frames < 1:
        raise ConfigError(f"collector.total_frames must be >= 1, got {cfg.collector.total_frames}")
    for key in ("logger.eval_iter", "logger.num_eval_episodes", "logger.video_every", "checkpoint.interval"):
        value = OmegaConf.select(cfg, key)
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if cfg.compile.compile not in (True, False, "auto"):
        raise ConfigError(f"compile.compile must be true, false or auto, got {cfg.compile.compile!r}")
    modes = list(torch._inductor.list_mode_options())  # torch.compile's modes, "default" first
    if cfg.compile.compile_mode not in (None, *modes):
        raise ConfigError(
            f"compile.compile_mode must be null or one of {', '.join(modes)}, got {cfg.compile.compile_mode!r}"
        )
    device = resolve_device(cfg)
    if cfg.compile.cudagraphs and device.type != "cuda":
        raise ConfigError(
            f"compile.cudagraphs=true needs a CUDA device (collector.device={cfg.collector.device!r} resolves to the "
            "CPU here); use compile.cudagraphs=false"
        )
    backend = cfg.logger.backend
    if backend:
        if backend not in LOGGER_PACKAGES:
            raise ConfigError(
                f"logger.backend={backend!r} is not one of {', '.join(LOGGER_PACKAGES)}, or empty (no logging)"
            )
        package = LOGGER_PACKAGES[backend]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logger.backend={backend!r} needs the {package} package: pip install {package}")
    if cfg.env.from_pixels:
        validate_pixels(cfg)
    if cfg.logger.video:
        validate_video(cfg)
    resume = resume_checkpoint(cfg)
    if resume is not None:
        validate_resume(cfg, resume)
    own = Path(cfg.checkpoint.dir)
    if _holds_checkpoints(own) and (resume is None or not _is_within(resume, own)):
        raise ConfigError(
            f"checkpoint.dir={cfg.checkpoint.dir!r} already holds a checkpoint of a run, which this run would replace "
            f"(checkpoint.resume={cfg.checkpoint.resume}); continue that run with checkpoint.resume=auto, or run in "
            "another directory (hydra.run.dir=...)"
        )


RESUME_AUTO = "auto"
"""``checkpoint.resume=auto`` (the default): continue from the run directory's own checkpoint when it holds one."""
LEGACY_CHECKPOINT = "checkpoint.pt"
"""The one file in ``checkpoint.dir`` that held a run's checkpoint before the ``checkpoint-<frames>`` directories."""


def validate_pixels(cfg: DictConfig) -> None:
    """``env.from_pixels=true``: a MuJoCo task, images the encoder can take, and MuJoCo rendering off-screen."""
    if not renders_mujoco(cfg.env.name):
        raise ConfigError(
            f"env.from_pixels=true renders DMC and gymnasium MuJoCo tasks, not env.name={cfg.env.name!r}"
        )
    if cfg.env.image_size < 15:
        raise ConfigError(
            f"env.image_size={cfg.env.image_size} is too small for the image encoder's four 3x3 convolutions; use at "
            "least 15 (DrQ-v2: 84)"
        )
    if cfg.env.num_frames < 1:
        raise ConfigError(f"env.num_frames must be >= 1 (frames stacked; DrQ-v2: 3), got {cfg.env.num_frames}")
    if cfg.replay_buffer.random_shift < 0:
        raise ConfigError(
            f"replay_buffer.random_shift must be >= 0 (pixels; DrQ: 4, 0: none), got {cfg.replay_buffer.random_shift}"
        )
    try:
        check_offscreen_rendering()
    except RuntimeError as err:
        raise ConfigError(f"env.from_pixels=true: {err}") from None


def validate_video(cfg: DictConfig) -> None:
    """``logger.video=true``: a backend that takes videos, its encoder's package, and rendering: MuJoCo's off-screen,
    or the task's own renderer (pygame, for classic-control tasks)."""
    backend = cfg.logger.backend
    if backend not in VIDEO_ENCODERS:
        raise ConfigError(
            f"logger.video=true needs logger.backend={' or '.join(VIDEO_ENCODERS)}, not logger.backend={backend!r}"
        )
    module, requirement = VIDEO_ENCODERS[backend]
    if not (backend == "csv" and torchcodec_can_encode()) and not _module_exists(module):
        raise ConfigError(
            f"logger.video=true with logger.backend={backend} encodes videos with {requirement}, which is not "
            "installed: pip install -e \".[video]\""
        )
    try:
        check_rendering(cfg.env.name)
    except RuntimeError as err:
        raise ConfigError(f"logger.video=true: {err}") from None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint(s) this run continues from, or None for a fresh start.

    ``checkpoint.resume=auto``: the run's own ``checkpoint.dir`` (relative to the run directory, Hydra's working
    directory) if it holds a checkpoint: a requeued SLURM job, or the same command run again in the same run directory;
    an older version's checkpoint there (:data:`LEGACY_CHECKPOINT`) is a ConfigError, not a fresh start. A path
    (absolute: ``alm.py`` makes it so): that checkpoint, or the newest one in that directory. null: none.
    """
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume == RESUME_AUTO:
        own = Path(cfg.checkpoint.dir)
        if _holds_checkpoints(own):
            return own
        if (own / LEGACY_CHECKPOINT).exists():  # said, rather than a fresh run started beside it
            raise ConfigError(
                f"checkpoint.resume=auto: {(own / LEGACY_CHECKPOINT).resolve()} is a checkpoint of alm_torchrl before "
                "its torchrl.checkpoint directories, which this version cannot resume; to start afresh, move it out of "
                f"checkpoint.dir={cfg.checkpoint.dir!r} or run in another directory (hydra.run.dir=...)"
            )
        return None
    return Path(resume)


def _holds_checkpoints(directory: Path) -> bool:
    """Whether ``directory`` holds a published checkpoint (damaged ones included: those must not be replaced)."""
    return directory.is_dir() and any(
        entry.is_dir() and not entry.name.startswith(".") for entry in directory.glob(f"{CHECKPOINT_PREFIX}-*")
    )


def _is_within(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def validate_resume(cfg: DictConfig, resume: Path) -> None:
    """``resume`` must hold an undamaged checkpoint of this task, network sizes and buffer capacity.

    A finished run (all ``collector.total_frames`` collected) is refused, except with ``checkpoint.resume=auto``, where
    ``alm.py`` reports it and exits. The manifest's metadata is checked first (networks of other sizes would fail to
    load with a page of tensor shapes, a buffer of another capacity would load silently wrong), then every file
    (:meth:`TrainingCheckpoints.verify <alm_torchrl.checkpoint.TrainingCheckpoints.verify>`: sizes, checksums, and no
    file whose loading could run code).
    """
    name = f"checkpoint.resume={cfg.checkpoint.resume!r}"
    if cfg.checkpoint.resume == RESUME_AUTO:
        name += f" ({resume})"
    try:
        stored = TrainingCheckpoints.metadata(resume)
    except FileNotFoundError:
        raise ConfigError(
            f"{name}: no checkpoint there; pass a checkpoint directory (checkpoint-<frames>) or the directory "
            "holding them"
        ) from None
    except CheckpointError as err:
        raise ConfigError(f"{name}: {err}") from None
    if stored.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{name}: {TrainingCheckpoints.find(resume) / 'manifest.json'} has checkpoint format "
            f"{stored.get('format')!r}; this version reads {CHECKPOINT_FORMAT!r}"
        )
    if stored["env_name"] != cfg.env.name:
        raise ConfigError(
            f"{name} was trained on env.name={stored['env_name']!r}, not env.name={cfg.env.name!r}; resume with "
            f"env.name={stored['env_name']}"
        )
    if stored["collected_frames"] >= cfg.collector.total_frames and cfg.checkpoint.resume != RESUME_AUTO:
        raise ConfigError(
            f"{name} already holds {stored['collected_frames']} frames, >= "
            f"collector.total_frames={cfg.collector.total_frames}; raise collector.total_frames to continue"
        )
    # A resumed run goes on with the checkpoint's random streams: another env.seed would be recorded, not run with.
    if stored["config"]["env"]["seed"] != cfg.env.seed:
        raise ConfigError(
            f"{name} was trained with env.seed={stored['config']['env']['seed']}, not env.seed={cfg.env.seed}; resume "
            f"with env.seed={stored['config']['env']['seed']}"
        )
    # What the agent observes and how often it acts; defaults for checkpoints from before these keys existed.
    # The replay buffer holds actions in the agent's space, [-1, 1] under env.scale_actions.
    for key, default in (
        ("frame_skip", 1), ("scale_actions", False), ("from_pixels", False), ("image_size", 84), ("num_frames", 3)
    ):
        stored_value = stored["config"]["env"].get(key, default)
        # image_size and num_frames matter only from pixels
        applies = key in ("frame_skip", "scale_actions", "from_pixels") or cfg.env.from_pixels
        if stored_value != cfg.env[key] and applies:
            raise ConfigError(
                f"{name} was trained with env.{key}={stored_value}, not env.{key}={cfg.env[key]}; resume with "
                f"env.{key}={stored_value}"
            )
    for key, value in stored["network"].items():
        if cfg.network.get(key) != value:
            raise ConfigError(
                f"{name} was trained with network.{key}={value!r}, not network.{key}={cfg.network.get(key)!r}; "
                f"resume with network.{key}={value}"
            )
    if stored["replay_buffer_size"] != replay_buffer_capacity(cfg):
        raise ConfigError(
            f"{name} holds a replay buffer of {stored['replay_buffer_size']} transitions, not "
            f"replay_buffer.size={replay_buffer_capacity(cfg)}; resume with "
            f"replay_buffer.size={stored['replay_buffer_size']}"
        )
    try:
        TrainingCheckpoints.verify(resume, components=checkpoint_components(cfg))
    except CheckpointError as err:
        raise ConfigError(f"{name}: {err}") from None


# ------------------------------------------------------------------------------------------------------- factories
def configure_runtime(cfg: DictConfig) -> None:
    """torch's intra-op threads when ``compile.num_threads`` fixes them (with ``compile.num_threads=null``,
    :func:`make_adaptive_threads` chooses them), glibc's malloc tuning, inductor's cache directory
    (``compile.cache_dir``) and the tensordict workaround of ``alm_torchrl.runtime``."""
    with naming_config_keys(num_threads="compile.num_threads"):
        configure_cpu_runtime(cfg.compile.num_threads)
    if cfg.compile.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cfg.compile.cache_dir).expanduser().absolute())
    if cfg.compile.num_threads is None:
        # Threads that follow the machine must reach compiled code too: inductor's CPU kernels otherwise keep the
        # thread count they were compiled with.
        torch._inductor.config.cpp.dynamic_threads = True
    skip_pandas_lookup_in_tensordict_from_any()


def make_adaptive_threads(cfg: DictConfig, learner: "Learner", device: torch.device) -> AdaptiveThreads | None:
    """With ``compile.num_threads=null``, torch's threads follow the machine (:class:`AdaptiveThreads
    <alm_torchrl.runtime.AdaptiveThreads>`): the cores other processes leave free, one for a small update, and one on
    CUDA, where the update runs on the GPU. None when ``compile.num_threads`` fixes them."""
    if cfg.compile.num_threads is not None:
        return None
    num_parameters = sum(parameter.numel() for parameter in learner.loss.parameters())
    transitions = cfg.optim.batch_size * cfg.loss.horizon
    gflop = 0.0 if device.type == "cuda" else estimate_update_gflop(num_parameters, transitions)
    return AdaptiveThreads(gflop)


def make_environment(cfg: DictConfig) -> tuple[TransformedEnv, TransformedEnv]:
    """The training env, and the evaluation env: ``logger.num_eval_episodes`` copies of the task stepped together.

    With ``env.from_pixels``, both observe ``env.num_frames`` stacked ``pixels`` only (:func:`~alm_torchrl.envs.
    stacked_pixels`), rendered at ``env.image_size``.
    """
    image_size = (cfg.env.image_size, cfg.env.image_size) if cfg.env.from_pixels else None
    with naming_config_keys(max_episode_steps="env.max_episode_steps", num_envs="logger.num_eval_episodes",
                            frame_skip="env.frame_skip", num_frames="env.num_frames",
                            scale_actions="env.scale_actions"):
        train_env = make_env(cfg.env.name, seed=cfg.env.seed, max_episode_steps=cfg.env.max_episode_steps,
                             frame_skip=cfg.env.frame_skip, image_size=image_size,
                             scale_actions=cfg.env.scale_actions)
        eval_env = make_env(
            cfg.env.name,
            seed=cfg.env.seed + 1,
            max_episode_steps=cfg.env.max_episode_steps,
            num_envs=cfg.logger.num_eval_episodes,
            frame_skip=cfg.env.frame_skip,
            image_size=image_size,
            scale_actions=cfg.env.scale_actions,
        )
        if cfg.env.from_pixels:
            train_env.append_transform(stacked_pixels(cfg.env.num_frames))
            eval_env.append_transform(stacked_pixels(cfg.env.num_frames))
    return train_env, eval_env


def observation_key(env: EnvBase) -> str:
    """The entry ALM encodes: the env's ``observation``, or its ``pixels`` when it has no ``observation`` (a task
    observed from pixels only)."""
    keys = env.observation_spec.keys()
    return "pixels" if "observation" not in keys and "pixels" in keys else "observation"


def make_video_env(cfg: DictConfig, logger: Logger | None) -> TransformedEnv | None:
    """With ``logger.video=true``, one more copy of the task that renders, recorded into ``logger`` (else None).

    Seeded with ``env.seed + 1 + logger.num_eval_episodes``, so that its episodes start elsewhere than the evaluation
    copies' (seeded from ``env.seed + 1`` on). From pixels the video is what the agent sees: its own
    ``env.image_size`` frames, recorded before they are stacked, rendered as in training (``video_fast_render`` does
    not apply).
    """
    if not cfg.logger.video:
        return None
    pixels = cfg.env.from_pixels
    video_env = make_recording_env(
        cfg.env.name,
        logger,
        seed=cfg.env.seed + 1 + cfg.logger.num_eval_episodes,
        max_episode_steps=cfg.env.max_episode_steps,
        frame_skip=cfg.env.frame_skip,
        **({"image_size": (cfg.env.image_size, cfg.env.image_size)} if pixels else {}),
        fast_render=cfg.logger.video_fast_render and not pixels,
        scale_actions=cfg.env.scale_actions,
    )
    return video_env.append_transform(stacked_pixels(cfg.env.num_frames)) if pixels else video_env


def make_alm_agent(cfg: DictConfig, env: EnvBase, device: torch.device) -> ALMModules:
    """ALM's networks and its behaviour and evaluation policies for ``env`` (reading :func:`observation_key`)."""
    with naming_config_keys(
        latent_dim="network.latent_dim",
        hidden_dim="network.hidden_dim",
        model_hidden_dim="network.model_hidden_dim",
        encoder_type="network.encoder",
        conv_channels="network.conv_channels",
        conv_feature_dim="network.conv_feature_dim",
        classifier_type="network.classifier",
        actor_std="network.actor_std",
        noise_init="exploration.noise_init",
        noise_end="exploration.noise_end",
        noise_annealing_frames="exploration.annealing_frames",
        eval_latent="logger.eval_latent",
    ):
        return make_alm_modules(
            env.observation_spec_unbatched,
            env.action_spec_unbatched,
            latent_dim=cfg.network.latent_dim,
            hidden_dim=cfg.network.hidden_dim,
            model_hidden_dim=cfg.network.model_hidden_dim,
            encoder_type=cfg.network.encoder,
            conv_channels=cfg.network.conv_channels,
            conv_feature_dim=cfg.network.conv_feature_dim,
            classifier_type=cfg.network.classifier,
            actor_std=cfg.network.actor_std,
            noise_init=cfg.exploration.noise_init,
            noise_end=cfg.exploration.noise_end,
            noise_annealing_frames=cfg.exploration.annealing_frames,
            observation_key=observation_key(env),
            eval_latent=cfg.logger.eval_latent,
            device=device,
        )


def make_loss_module(
    cfg: DictConfig, agent: ALMModules, device: torch.device, *, deactivate_vmap: bool | None = None
) -> ALMLoss:
    """The :class:`ALMLoss` of ``agent``'s networks, with its discount set through ``make_value_estimator``.

    ``deactivate_vmap=None`` chooses: on the CPU without ``torch.compile`` the critics run in a Python loop instead of
    ``vmap``, which costs more there in eager mode (``benchmarks/README.md``); compiled, or on CUDA, vmap.
    """
    if deactivate_vmap is None:
        deactivate_vmap = device.type == "cpu" and not compile_enabled(cfg, device)
    with naming_config_keys(
        lmbda="loss.lmbda",
        classifier_coef="loss.classifier_coef",
        noise_clip="loss.noise_clip",
        actor_objective="loss.actor_objective",
        log_reward_shift="loss.log_reward_shift",
        entropy_coef="loss.entropy_coef",
        actor_std="exploration.noise_init",
        gamma="optim.gamma",
    ):
        loss = ALMLoss(
            **agent.loss_kwargs(),
            lmbda=cfg.loss.lmbda,
            classifier_coef=cfg.loss.classifier_coef,
            noise_clip=cfg.loss.noise_clip,
            actor_std=cfg.exploration.noise_init,
            deactivate_vmap=deactivate_vmap,
            kl_term=cfg.loss.kl_term,
            value_term=cfg.loss.value_term,
            actor_objective=cfg.loss.actor_objective,
            log_reward_shift=cfg.loss.log_reward_shift,
            entropy_coef=cfg.loss.entropy_coef,
        )
        loss.set_keys(observation=agent.observation_key)
        loss.make_value_estimator(gamma=cfg.optim.gamma)
    return loss


def make_optimizer(cfg: DictConfig, loss: ALMLoss, *, fused: bool = True) -> torch.optim.Adam:
    """ALM's four optimisers as the param groups of one Adam (``alm_torchrl.update.make_optimizer``)."""
    with naming_config_keys(lr="optim.lr"):
        return make_grouped_optimizer(loss, cfg.optim.lr, capturable=cfg.compile.cudagraphs, fused=fused)


@dataclass
class Learner:
    """What learns: the networks and policies, the loss, its target updater, the optimizer and the update step."""

    agent: ALMModules
    loss: ALMLoss
    target_updater: SoftUpdate
    optimizer: torch.optim.Optimizer
    update: Callable[[TensorDictBase], TensorDictBase]
    """``update(batch)``: one gradient step on a ``[B, K]`` slice batch, returning detached metrics."""


def make_learner(
    cfg: DictConfig,
    env: EnvBase,
    device: torch.device,
    *,
    deactivate_vmap: bool | None = None,
    fused_optimizer: bool = True,
    check_every: int | None = None,
) -> Learner:
    """The networks (:func:`make_alm_agent`), the loss (:func:`make_loss_module`), its ``SoftUpdate``, the optimizer
    (:func:`make_optimizer`) and the update step, which compiles and CUDA-graphs as ``compile.*`` say.

    The update reads the gradient norms on the host once per collected batch (``check_every``, default
    :func:`updates_per_batch`): fused Adam skips a non-finite step on the device meanwhile; a non-fused optimizer
    (``fused_optimizer=False``) is checked before every step.
    """
    agent = make_alm_agent(cfg, env, device)
    loss = make_loss_module(cfg, agent, device, deactivate_vmap=deactivate_vmap)
    with naming_config_keys(tau="loss.tau"):
        target_updater = make_target_updater(loss, cfg.loss.tau)
    optimizer = make_optimizer(cfg, loss, fused=fused_optimizer)
    if check_every is None:
        check_every = updates_per_batch(cfg) if fused_optimizer else 1
    with naming_config_keys(max_grad_norm="optim.max_grad_norm"):
        update = make_update(
            loss,
            optimizer,
            target_updater,
            max_grad_norm=cfg.optim.max_grad_norm,
            compile=compile_enabled(cfg, device),
            compile_mode=cfg.compile.compile_mode,
            cudagraphs=cfg.compile.cudagraphs,
            check_every=check_every,
        )
    return Learner(agent, loss, target_updater, optimizer, update)


def make_replay_buffer(cfg: DictConfig, device: torch.device) -> TensorDictReplayBuffer:
    """The slice replay buffer on ``device``; ``replay_buffer.prefetch=null`` prefetches 3 batches on CUDA only.

    With ``env.from_pixels``, each frame is stored once (:class:`~alm_torchrl.frames.FrameStackStorage`) and sampled
    observations are shifted by up to ``replay_buffer.random_shift`` pixels (:class:`~alm_torchrl.transforms.
    RandomShift`, after the stacks are rebuilt).
    """
    prefetch = cfg.replay_buffer.prefetch
    if prefetch is None:
        prefetch = 3 if device.type == "cuda" else 0
    pixels = cfg.env.from_pixels
    with naming_config_keys(
        size="replay_buffer.size",
        prefetch="replay_buffer.prefetch",
        batch_size="optim.batch_size",
        slice_len="loss.horizon",
        sampling="replay_buffer.sampling",
    ):
        replay_buffer = make_slice_replay_buffer(
            size=replay_buffer_capacity(cfg),
            batch_size=cfg.optim.batch_size,
            slice_len=cfg.loss.horizon,
            device=device,
            prefetch=prefetch,
            sampling=cfg.replay_buffer.sampling,
            batches_per_draw=batches_per_draw(cfg),
            pixels_key="pixels" if pixels else None,
            num_frames=cfg.env.num_frames,
        )
    if pixels and cfg.replay_buffer.random_shift:
        replay_buffer.append_transform(RandomShift(pad=cfg.replay_buffer.random_shift))
    return replay_buffer


def make_collector(cfg: DictConfig, env: EnvBase, policy: Callable, device: torch.device) -> Collector:
    """The training collector: random actions for the first ``init_random_frames``, then ``policy``.

    A resumed run restores its frame count (and the episode in progress) from the checkpoint
    (:class:`~alm_torchrl.checkpoint.CollectorState`). The config counts env steps and the Collector agent steps: both
    budgets are divided by ``env.frame_skip`` (rounded up). The env steps on the CPU; the policy runs and the batches
    are stored on ``device``. ``compile.compile`` and ``compile.cudagraphs`` also compile the behaviour policy and
    replay it as a CUDA graph, as TorchRL's ``sota-implementations`` do.
    """
    frame_skip = cfg.env.frame_skip
    # Two eager calls before compiling the policy, not TorchRL's one: the input keeps changing keys until then (it
    # picks up the policy's own outputs of the step before), and a graph compiled on the earlier keys would be traced
    # again at the next call, about 2 s more at every start-up.
    return Collector(
        env,
        policy,
        frames_per_batch=cfg.collector.frames_per_batch,
        total_frames=agent_steps(cfg.collector.total_frames, frame_skip),
        init_random_frames=agent_steps(cfg.collector.init_random_frames, frame_skip),
        env_device="cpu",
        policy_device=device,
        storing_device=device,
        compile_policy={"mode": cfg.compile.compile_mode, "warmup": 2} if compile_enabled(cfg, device) else False,
        cudagraph_policy={"warmup": 10} if cfg.compile.cudagraphs else False,
    )


class UpdateMetrics:
    """Running sums of the update metrics since they were last logged, averaged when logged.

    Sums, not a list of every update's output: keeping those alive pins freed activation memory on the CPU heap (RSS
    grew by ~3 MB per update in our measurements). A checkpoint component, so that a resumed run logs the same
    averages as an uninterrupted one.
    """

    def __init__(self) -> None:
        self.sums: TensorDictBase | None = None
        self.count = 0

    def add(self, metrics: TensorDictBase) -> None:
        self.sums = metrics.clone() if self.sums is None else self.sums.add_(metrics)
        self.count += 1

    def pop_means(self) -> dict[str, float]:
        """The averages since the last call (empty if no update ran), then start again."""
        if self.sums is None:
            return {}
        means = {key: (value / self.count).item() for key, value in self.sums.items()}
        self.sums, self.count = None, 0
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sums": self.sums.to_dict() if self.sums is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.sums = TensorDict(state["sums"]) if state["sums"] else None


def make_checkpoints(
    cfg: DictConfig,
    learner: Learner,
    replay_buffer: TensorDictReplayBuffer,
    *,
    collector: Collector | None = None,
    eval_env: EnvBase | None = None,
    update_metrics: UpdateMetrics | None = None,
) -> TrainingCheckpoints:
    """The run's checkpoints in ``checkpoint.dir``: the loss, optimizer, noise schedule, RNGs and replay buffer, and
    (what a resumed run needs to repeat the uninterrupted one) the collector, the evaluation env and the pending
    update metrics."""
    return TrainingCheckpoints(
        cfg.checkpoint.dir,
        loss=learner.loss,
        optimizer=learner.optimizer,
        replay_buffer=replay_buffer,
        exploration_noise=learner.agent.exploration_noise,
        collector=collector,
        eval_env=eval_env,
        extra_state={"update_metrics": update_metrics} if update_metrics is not None else None,
    )


def checkpoint_components(cfg: DictConfig) -> list[str]:
    """The components the recipe's checkpoints hold (:func:`make_checkpoints` with a collector, the evaluation env and
    the update metrics), each of which a checkpoint to resume must hold: the noise schedule unless the actor learns its
    std."""
    noise = [] if cfg.network.actor_std == "learned" else ["exploration_noise"]
    return ["loss", "rng", "optimizer", "replay_buffer", *noise, "collector", "eval_env", "update_metrics"]


def checkpoint_metadata(
    cfg: DictConfig, collected_frames: int, num_updates: int, logger: Logger | None = None
) -> dict[str, Any]:
    """What identifies a checkpoint of this run: :func:`validate_resume` compares it with the config on resume.

    With the run's ``logger``, also its state (TorchRL's ``Logger.state_dict``: experiment name and directory, a W&B
    run's id; not the CSV logger's copy of every scalar, which its files hold), so that a run resumed in the same run
    directory goes on writing the same logs (:func:`make_logger`).
    """
    logger_state = None
    if logger is not None:
        logger_state = logger.state_dict()
        logger_state.get("local", {}).pop("scalars", None)
    return {
        "env_name": cfg.env.name,
        "collected_frames": collected_frames,
        "num_updates": num_updates,
        "network": OmegaConf.to_container(cfg.network, resolve=True),
        "replay_buffer_size": replay_buffer_capacity(cfg),
        "logger": logger_state,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


LOG_DIR = "alm_logging"


def make_logger(cfg: DictConfig, resumed: dict[str, Any] | None = None) -> Logger | None:
    """TorchRL's logger for ``logger.backend`` (None when it is empty), writing to ``alm_logging/<experiment>``.

    ``resumed``: the metadata of the checkpoint the run resumed from. When that run logged to this run directory with
    this backend (a run resumed in place: a requeued job, the same command run again), the logger goes on with the same
    experiment (TorchRL's ``get_logger(state_dict=...)``; a W&B run is resumed); with the CSV backend the rows the
    stopped run logged after its checkpoint are removed first, so that the resumed run's rows follow without a gap or a
    repeat. Otherwise the logs start in a new experiment directory, their steps continuing from the checkpoint's frame
    count. The experiment name has no ``/`` (DMC tasks are ``dmc/<domain>-<task>``): it names one folder.
    """
    if not cfg.logger.backend:
        return None
    state = (resumed or {}).get("logger")
    in_place = (
        state is not None
        and resumed["config"]["logger"]["backend"] == cfg.logger.backend
        and state.get("log_dir") == os.path.abspath(LOG_DIR)
    )
    if in_place and cfg.logger.backend == "csv":
        for scalars in (Path(LOG_DIR) / state["exp_name"] / "scalars").rglob("*.csv"):
            _drop_rows_after(scalars, resumed["collected_frames"])
    experiment_name = generate_exp_name("ALM", cfg.logger.exp_name.replace("/", "_"))
    if cfg.logger.backend == "csv":
        # TorchRL's CSVLogger, its mp4 videos written with PyAV where torchcodec cannot (alm_torchrl.video); built
        # here as get_logger builds a CSVLogger, from the saved state when resumed in place.
        if not in_place:
            return MP4CSVLogger(experiment_name, log_dir=LOG_DIR)
        logger = MP4CSVLogger(state["exp_name"], log_dir=state["log_dir"])
        logger.load_state_dict(state)
        return logger
    return get_logger(
        cfg.logger.backend,
        logger_name=LOG_DIR,
        experiment_name=experiment_name,
        state_dict=state if in_place else None,
        wandb_kwargs={"config": OmegaConf.to_container(cfg, resolve=True), "project": "alm"},
    )


def _drop_rows_after(scalars: Path, last_step: int) -> None:
    """Keep the rows of one of TorchRL's CSV scalar files (``step,value``) up to ``last_step``; replaced atomically."""
    with scalars.open(newline="") as file:
        rows = [row for row in csv.reader(file) if row and int(row[0]) <= last_step]
    staged = scalars.with_name(f".{scalars.name}.trim")
    with staged.open("w", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)
    os.replace(staged, scalars)


class MetricsLog:
    """Logs scalars through the run's TorchRL logger; a backend that fails mid-run is switched off with one line.

    A full disk, a removed log directory or a lost W&B connection must not end a run that hours of training and its
    checkpoints depend on: the first failure prints one line on stderr and training goes on without logging.
    TorchRL's CSV logger keeps its files open and would write on into removed ones without an error (and recreate their
    directories empty), so this also checks that each of its open files still has a name on disk (one ``fstat`` each).
    """

    def __init__(self, logger: Logger | None, announce: Callable[[str], None] | None = None) -> None:
        self.logger = logger
        self.announce = announce or functools.partial(print, file=sys.stderr)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is None or not metrics:
            return
        try:
            for key, value in metrics.items():
                self.logger.log_scalar(key, value, step=step)
            for path, file in getattr(self.logger.experiment, "files", {}).items():  # TorchRL's CSV experiment
                if os.fstat(file.fileno()).st_nlink == 0:
                    raise FileNotFoundError(f"{path} was removed while the logger was writing it")
        except Exception as err:  # noqa: BLE001 - whatever the backend raises, training must go on
            self.announce(
                f"alm.py: the {type(self.logger).__name__} failed at frame {step} ({type(err).__name__}: {err}); "
                "metrics are no longer logged, training and its checkpoints go on"
            )
            self.logger = None
