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
  logger's package, a resumed checkpoint): :func:`validate_config`.

All of them raise :class:`ConfigError`, which ``alm.py`` prints as one ``alm.py: invalid config: ...`` line.
"""

import importlib.util
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.data import TensorDictReplayBuffer
from torchrl.envs import EnvBase, TransformedEnv
from torchrl.objectives import SoftUpdate
from torchrl.record.loggers import Logger, generate_exp_name, get_logger

from alm_torchrl import ALMModules, make_alm_modules
from alm_torchrl.checkpoint import CheckpointError, TrainingCheckpoints
from alm_torchrl.envs import agent_steps, check_env_name, check_offscreen_rendering, make_env, replay_buffer_size_for
from alm_torchrl.objectives import ALMLoss
from alm_torchrl.replay import make_replay_buffer as make_slice_replay_buffer
from alm_torchrl.runtime import configure_cpu_runtime
from alm_torchrl.update import make_optimizer as make_grouped_optimizer
from alm_torchrl.update import make_target_updater, make_update
from alm_torchrl.video import MP4CSVLogger, make_video_env as make_recording_env, torchcodec_can_encode

RECIPE_DIR = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "alm-torchrl/1"
"""Written into every checkpoint's metadata; a checkpoint of another format is refused on resume."""
# TorchRL's logger backends (torchrl.record.loggers.get_logger) and the package each needs beyond torchrl.
LOGGER_PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
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
    frame_skip: int = MISSING


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
    compile: bool = MISSING
    compile_mode: Optional[str] = MISSING
    cudagraphs: bool = MISSING
    num_threads: Optional[int] = MISSING


@dataclass
class LoggerConfig:
    backend: Optional[str] = MISSING
    exp_name: str = MISSING
    eval_iter: int = MISSING
    num_eval_episodes: int = MISSING
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
    """``cfg`` typed by :class:`ALMConfig`: numbers given as strings are converted, a wrong type is a ConfigError."""
    try:
        return OmegaConf.merge(OmegaConf.structured(ALMConfig), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{key}: {reason}") from None


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


def updates_per_batch(cfg: DictConfig) -> int:
    """Updates after each collected batch: ``collector.frames_per_batch x optim.utd_ratio``, rounded.

    :func:`validate_config` refuses a product that is not a whole number.
    """
    return round(cfg.collector.frames_per_batch * cfg.optim.utd_ratio)


def replay_buffer_capacity(cfg: DictConfig) -> int:
    """``replay_buffer.size``, or the task's paper capacity (100k; 1e6 for Humanoid) when it is null."""
    return cfg.replay_buffer.size or replay_buffer_size_for(cfg.env.name)


def validate_config(cfg: DictConfig) -> None:
    """The checks that involve several keys, the machine or a checkpoint, before anything is built.

    ``cfg.checkpoint.resume`` must already be an absolute path (Hydra changes the working directory).
    """
    try:
        check_env_name(cfg.env.name)
    except ValueError as err:
        raise ConfigError(f"env.name: {err}") from None
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
    if cfg.logger.video:
        validate_video(cfg)
    if cfg.checkpoint.resume:
        validate_resume(cfg)


def validate_video(cfg: DictConfig) -> None:
    """``logger.video=true``: a backend that takes videos, its encoder's package, and MuJoCo rendering off-screen."""
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
        check_offscreen_rendering()
    except RuntimeError as err:
        raise ConfigError(f"logger.video=true: {err}") from None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def validate_resume(cfg: DictConfig) -> None:
    """``checkpoint.resume`` must hold a checkpoint of this task, network sizes and buffer capacity, not finished.

    Read from the checkpoint's manifest alone: networks of other sizes would fail to load with a page of tensor
    shapes, and a buffer of another capacity would load silently wrong.
    """
    resume = cfg.checkpoint.resume
    try:
        stored = TrainingCheckpoints.metadata(resume)
    except FileNotFoundError:
        raise ConfigError(
            f"checkpoint.resume={resume!r}: no checkpoint there; pass a checkpoint directory (checkpoint-<frames>) or "
            "the directory holding them"
        ) from None
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.resume={resume!r}: unreadable checkpoint: {err}") from None
    if stored.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint.resume={resume!r} has checkpoint format {stored.get('format')!r}; this version reads "
            f"{CHECKPOINT_FORMAT!r}"
        )
    if stored["env_name"] != cfg.env.name:
        raise ConfigError(
            f"checkpoint.resume={resume!r} was trained on env.name={stored['env_name']!r}, not "
            f"env.name={cfg.env.name!r}; resume with env.name={stored['env_name']}"
        )
    if stored["collected_frames"] >= cfg.collector.total_frames:
        raise ConfigError(
            f"checkpoint.resume={resume!r} already holds {stored['collected_frames']} frames, >= "
            f"collector.total_frames={cfg.collector.total_frames}; raise collector.total_frames to continue"
        )
    stored_frame_skip = stored["config"]["env"].get("frame_skip", 1)  # checkpoints from before frame_skip existed
    if stored_frame_skip != cfg.env.frame_skip:
        raise ConfigError(
            f"checkpoint.resume={resume!r} was trained with env.frame_skip={stored_frame_skip}, not "
            f"env.frame_skip={cfg.env.frame_skip}; resume with env.frame_skip={stored_frame_skip}"
        )
    for key, value in stored["network"].items():
        if cfg.network.get(key) != value:
            raise ConfigError(
                f"checkpoint.resume={resume!r} was trained with network.{key}={value!r}, not "
                f"network.{key}={cfg.network.get(key)!r}; resume with network.{key}={value}"
            )
    if stored["replay_buffer_size"] != replay_buffer_capacity(cfg):
        raise ConfigError(
            f"checkpoint.resume={resume!r} holds a replay buffer of {stored['replay_buffer_size']} transitions, not "
            f"replay_buffer.size={replay_buffer_capacity(cfg)}; resume with "
            f"replay_buffer.size={stored['replay_buffer_size']}"
        )


# ------------------------------------------------------------------------------------------------------- factories
def configure_runtime(cfg: DictConfig) -> None:
    """torch's intra-op threads (``compile.num_threads``) and glibc's malloc tuning (``alm_torchrl.runtime``)."""
    with naming_config_keys(num_threads="compile.num_threads"):
        configure_cpu_runtime(cfg.compile.num_threads)


def make_environment(cfg: DictConfig) -> tuple[TransformedEnv, TransformedEnv]:
    """The training env, and the evaluation env: ``logger.num_eval_episodes`` copies of the task stepped together."""
    with naming_config_keys(max_episode_steps="env.max_episode_steps", num_envs="logger.num_eval_episodes",
                            frame_skip="env.frame_skip"):
        train_env = make_env(cfg.env.name, seed=cfg.env.seed, max_episode_steps=cfg.env.max_episode_steps,
                             frame_skip=cfg.env.frame_skip)
        eval_env = make_env(
            cfg.env.name,
            seed=cfg.env.seed + 1,
            max_episode_steps=cfg.env.max_episode_steps,
            num_envs=cfg.logger.num_eval_episodes,
            frame_skip=cfg.env.frame_skip,
        )
    return train_env, eval_env


def make_video_env(cfg: DictConfig, logger: Logger | None) -> TransformedEnv | None:
    """With ``logger.video=true``, one more copy of the task that renders, recorded into ``logger`` (else None).

    Seeded with ``env.seed + 1 + logger.num_eval_episodes``, so that its episodes start elsewhere than the evaluation
    copies' (seeded from ``env.seed + 1`` on).
    """
    if not cfg.logger.video:
        return None
    return make_recording_env(
        cfg.env.name,
        logger,
        seed=cfg.env.seed + 1 + cfg.logger.num_eval_episodes,
        max_episode_steps=cfg.env.max_episode_steps,
        frame_skip=cfg.env.frame_skip,
        fast_render=cfg.logger.video_fast_render,
    )


def make_alm_agent(cfg: DictConfig, env: EnvBase, device: torch.device) -> ALMModules:
    """ALM's networks and its behaviour and evaluation policies for ``env``."""
    with naming_config_keys(
        latent_dim="network.latent_dim",
        hidden_dim="network.hidden_dim",
        model_hidden_dim="network.model_hidden_dim",
        encoder_type="network.encoder",
        classifier_type="network.classifier",
        actor_std="network.actor_std",
        noise_init="exploration.noise_init",
        noise_end="exploration.noise_end",
        noise_annealing_frames="exploration.annealing_frames",
    ):
        return make_alm_modules(
            env.observation_spec_unbatched,
            env.action_spec_unbatched,
            latent_dim=cfg.network.latent_dim,
            hidden_dim=cfg.network.hidden_dim,
            model_hidden_dim=cfg.network.model_hidden_dim,
            encoder_type=cfg.network.encoder,
            classifier_type=cfg.network.classifier,
            actor_std=cfg.network.actor_std,
            noise_init=cfg.exploration.noise_init,
            noise_end=cfg.exploration.noise_end,
            noise_annealing_frames=cfg.exploration.annealing_frames,
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
        deactivate_vmap = device.type == "cpu" and not cfg.compile.compile
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
            compile=cfg.compile.compile,
            compile_mode=cfg.compile.compile_mode,
            cudagraphs=cfg.compile.cudagraphs,
            check_every=check_every,
        )
    return Learner(agent, loss, target_updater, optimizer, update)


def make_replay_buffer(cfg: DictConfig, device: torch.device) -> TensorDictReplayBuffer:
    """The slice replay buffer on ``device``; ``replay_buffer.prefetch=null`` prefetches 3 batches on CUDA only."""
    prefetch = cfg.replay_buffer.prefetch
    if prefetch is None:
        prefetch = 3 if device.type == "cuda" else 0
    with naming_config_keys(size="replay_buffer.size", batch_size="optim.batch_size", slice_len="loss.horizon"):
        return make_slice_replay_buffer(
            size=replay_buffer_capacity(cfg),
            batch_size=cfg.optim.batch_size,
            slice_len=cfg.loss.horizon,
            device=device,
            prefetch=prefetch,
        )


def make_collector(
    cfg: DictConfig, env: EnvBase, policy: Callable, device: torch.device, collected_frames: int = 0
) -> Collector:
    """The training collector: random actions for the first ``init_random_frames``, then ``policy``.

    ``collected_frames`` (on resume) shortens the run and the warm-up by what was already collected. The config counts
    env steps and the Collector agent steps: both budgets are divided by ``env.frame_skip`` (rounded up). The env
    steps on the CPU; the policy runs and the batches are stored on ``device``. ``compile.compile`` and
    ``compile.cudagraphs`` also compile the behaviour policy and replay it as a CUDA graph, as TorchRL's
    ``sota-implementations`` do.
    """
    frame_skip = cfg.env.frame_skip
    return Collector(
        env,
        policy,
        frames_per_batch=cfg.collector.frames_per_batch,
        total_frames=agent_steps(cfg.collector.total_frames - collected_frames, frame_skip),
        init_random_frames=agent_steps(max(cfg.collector.init_random_frames - collected_frames, 0), frame_skip),
        env_device="cpu",
        policy_device=device,
        storing_device=device,
        compile_policy={"mode": cfg.compile.compile_mode, "warmup": 1} if cfg.compile.compile else False,
        cudagraph_policy={"warmup": 10} if cfg.compile.cudagraphs else False,
    )


def make_checkpoints(cfg: DictConfig, learner: Learner, replay_buffer: TensorDictReplayBuffer) -> TrainingCheckpoints:
    """The run's checkpoints in ``checkpoint.dir``: the loss, optimizer, noise schedule, RNGs and replay buffer."""
    return TrainingCheckpoints(
        cfg.checkpoint.dir,
        loss=learner.loss,
        optimizer=learner.optimizer,
        replay_buffer=replay_buffer,
        exploration_noise=learner.agent.exploration_noise,
    )


def checkpoint_metadata(cfg: DictConfig, collected_frames: int, num_updates: int) -> dict[str, Any]:
    """What identifies a checkpoint of this run: :func:`validate_resume` compares it with the config on resume."""
    return {
        "format": CHECKPOINT_FORMAT,
        "env_name": cfg.env.name,
        "collected_frames": collected_frames,
        "num_updates": num_updates,
        "network": OmegaConf.to_container(cfg.network, resolve=True),
        "replay_buffer_size": replay_buffer_capacity(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def make_logger(cfg: DictConfig) -> Logger | None:
    """TorchRL's logger for ``logger.backend`` (None when it is empty); csv writes its videos as mp4 files anywhere.

    ``exp_name`` has no ``/`` (DMC tasks are ``dmc/<domain>-<task>``): it names one folder.
    """
    if not cfg.logger.backend:
        return None
    experiment_name = generate_exp_name("ALM", cfg.logger.exp_name.replace("/", "_"))
    if cfg.logger.backend == "csv":
        return MP4CSVLogger(experiment_name, log_dir="alm_logging")
    return get_logger(
        cfg.logger.backend,
        logger_name="alm_logging",
        experiment_name=experiment_name,
        wandb_kwargs={"config": OmegaConf.to_container(cfg, resolve=True), "project": "alm"},
    )


def log_metrics(logger: Logger | None, metrics: dict[str, float], step: int) -> None:
    if logger is not None:
        for key, value in metrics.items():
            logger.log_scalar(key, value, step=step)
