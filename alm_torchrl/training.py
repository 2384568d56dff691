"""Factories and loop helpers for the ALM training recipe (``recipes/alm/alm.py``).

The recipe stays a short, top-to-bottom script in the style of TorchRL's ``sota-implementations``; everything that is
worth testing on its own (optimizer groups, the update step, evaluation, checkpointing, config validation) lives here.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from copy import copy
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tensordict import TensorDictBase
from tensordict.nn import CudaGraphModule
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer, TensorDictReplayBuffer
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl._utils import compile_with_warmup
from torchrl.objectives import LossModule, SoftUpdate

from alm_torchrl.envs import check_env_name, replay_buffer_size_for, rollout_episodes
from alm_torchrl.modules import ALMModules, make_alm_modules
from alm_torchrl.objectives import ALMLoss
from alm_torchrl.replay import make_replay_buffer

__all__ = [
    "CHECKPOINT_FILENAME",
    "GROUP_LOSSES",
    "OPTIMIZER_GROUPS",
    "NonFiniteGradientError",
    "checkpoint_file",
    "checkpoint_state",
    "configure_cpu_runtime",
    "evaluate",
    "load_checkpoint",
    "make_collector",
    "make_loss",
    "make_modules",
    "make_optimizers",
    "make_recipe_replay_buffer",
    "make_update",
    "resolve_device",
    "restore_replay_buffer",
    "resume_training",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "updates_per_batch",
    "validate_config",
]

CHECKPOINT_FILENAME = "checkpoint.pt"
# TorchRL's logger backends (torchrl.record.loggers.get_logger) and the package each needs beyond torchrl.
LOGGER_PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}

# ALM's four optimizers (spec, "Order and optimizers"), by the prefix of ``loss.named_parameters()``.
OPTIMIZER_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("encoder_params.", "world_model_params."),
    "reward_classifier": ("reward_model_params.", "classifier_params."),
    "qvalue": ("qvalue_network_params.",),
    "actor": ("actor_network_params.",),
}


# The losses whose gradients each optimizer group receives (ALMLoss isolates the rest).
GROUP_LOSSES: dict[str, tuple[str, ...]] = {
    "model": ("loss_model",),
    "reward_classifier": ("loss_reward", "loss_classifier"),
    "qvalue": ("loss_qvalue",),
    "actor": ("loss_actor",),
}


class NonFiniteGradientError(RuntimeError):
    """Raised by the update when a parameter group's gradient norm is NaN or infinite; names the group and its losses.

    ``skipped_updates`` counts the updates since the last check whose optimizer step was skipped for it (0 when the
    error was raised before stepping).
    """

    def __init__(self, group: str, norm: float, skipped_updates: int = 0) -> None:
        losses = " + ".join(GROUP_LOSSES.get(group, ()))
        message = f"non-finite gradient norm ({norm}) from {losses or 'the losses'} in optimizer group {group!r}"
        if skipped_updates:
            message += f"; the optimizer step of {skipped_updates} update(s) since the last check was skipped"
        super().__init__(message)
        self.group = group
        self.norm = norm
        self.skipped_updates = skipped_updates


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; any other name as a ``torch.device``, refusing cuda without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"collector.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def configure_cpu_runtime(num_threads: int | None = None, *, keep_freed_memory: bool = True) -> None:
    """Set torch's intra-op threads and keep freed heap memory in the process (glibc only).

    One ALM update allocates and frees a few hundred MB of activations. glibc's default
    malloc hands large blocks back to the kernel (mmap'd chunks, heap trimming), so every update
    page-faults them in again: about 12,000 minor faults and 13 ms per update on a 2-core CPU
    (benchmarks/README.md). Raising the mmap and trim thresholds keeps that memory in the
    process; PyTorch's CPU tuning guide gets the same effect by swapping in jemalloc or tcmalloc.
    ``num_threads=None`` keeps torch's default (one thread per physical core).
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if not keep_freed_memory or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value on 64-bit
    mallopt(m_trim_threshold, 2**30)


def make_modules(cfg: Any, env: EnvBase, device: torch.device) -> ALMModules:
    """ALM's networks and policies for ``env``, sized and scheduled by the recipe config."""
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


def make_recipe_replay_buffer(cfg: Any, device: torch.device) -> TensorDictReplayBuffer:
    """The slice replay buffer on ``device``; ``replay_buffer.prefetch=null`` prefetches 3 batches on CUDA only."""
    prefetch = cfg.replay_buffer.prefetch
    if prefetch is None:
        prefetch = 3 if device.type == "cuda" else 0
    return make_replay_buffer(
        size=cfg.replay_buffer.size or replay_buffer_size_for(cfg.env.name),
        batch_size=cfg.optim.batch_size,
        slice_len=cfg.loss.horizon,
        device=device,
        prefetch=prefetch,
    )


def make_collector(
    cfg: Any, env: EnvBase, policy: Callable, device: torch.device, collected_frames: int = 0
) -> Collector:
    """The training collector: random actions for the first ``init_random_frames``, then ``policy``.

    ``collected_frames`` (on resume) shortens the run and the warm-up by what was already collected. The env steps
    on the CPU; the policy runs and the batches are stored on ``device``. ``compile.compile`` and
    ``compile.cudagraphs`` also compile the behaviour policy and replay it as a CUDA graph, as TorchRL's
    ``sota-implementations`` do: on a GPU, one env step's policy call is otherwise a dozen kernel launches and
    TensorDict bookkeeping in Python.
    """
    return Collector(
        env,
        policy,
        frames_per_batch=cfg.collector.frames_per_batch,
        total_frames=cfg.collector.total_frames - collected_frames,
        init_random_frames=max(cfg.collector.init_random_frames - collected_frames, 0),
        env_device="cpu",
        policy_device=device,
        storing_device=device,
        compile_policy={"mode": cfg.compile.compile_mode, "warmup": 1} if cfg.compile.compile else False,
        cudagraph_policy={"warmup": 10} if cfg.compile.cudagraphs else False,
    )


def updates_per_batch(cfg: Any) -> int:
    """Updates after each collected batch: ``collector.frames_per_batch x optim.utd_ratio``, rounded.

    ``validate_config`` refuses a product that is not a whole number.
    """
    return round(cfg.collector.frames_per_batch * cfg.optim.utd_ratio)


def make_loss(cfg: Any, modules: ALMModules, device: torch.device) -> ALMLoss:
    """The recipe's :class:`ALMLoss`, with its discount set through ``make_value_estimator``.

    On the CPU without ``torch.compile`` the critics run in a Python loop instead of ``vmap``:
    eager vmap over two critics adds about 30 ms of Python and strided-kernel overhead per update
    at the paper's sizes (benchmarks/README.md). Compiled, or on CUDA, vmap is the faster choice.
    """
    loss = ALMLoss(
        **modules.loss_kwargs(),
        lmbda=cfg.loss.lmbda,
        classifier_coef=cfg.loss.classifier_coef,
        noise_clip=cfg.loss.noise_clip,
        actor_std=cfg.exploration.noise_init,
        deactivate_vmap=device.type == "cpu" and not cfg.compile.compile,
        kl_term=cfg.loss.kl_term,
        value_term=cfg.loss.value_term,
        actor_objective=cfg.loss.actor_objective,
        log_reward_shift=cfg.loss.log_reward_shift,
        entropy_coef=cfg.loss.entropy_coef,
    )
    loss.make_value_estimator(gamma=cfg.optim.gamma)
    return loss


def make_optimizers(loss: LossModule, lr: float, *, capturable: bool = False) -> torch.optim.Adam:
    """One Adam holding ALM's four optimizers as named param groups (what ``group_optimizers`` would build).

    A single optimizer gives the update one ``step()`` call site while keeping per-group gradient clipping (each
    group carries its ``"name"``). Raises if a loss parameter belongs to no group, so new parameters are never
    silently left untrained.
    """
    named = dict(loss.named_parameters())
    groups = []
    for group_name, prefixes in OPTIMIZER_GROUPS.items():
        params = [p for name, p in named.items() if name.startswith(prefixes)]
        if not params:
            raise ValueError(f"optimizer group {group_name!r} matched no parameter of the loss ({prefixes})")
        groups.append({"params": params, "name": group_name})
    grouped = {id(p) for group in groups for p in group["params"]}
    orphans = [name for name, p in named.items() if id(p) not in grouped]
    if orphans:
        raise ValueError(f"loss parameters in no optimizer group: {orphans}")
    # fused Adam: one kernel per group on CUDA; on the CPU its step alone takes 1.3 ms for ALM's 3M parameters on
    # 2 cores, against 11.5 ms foreach (within the noise of a whole update there; benchmarks/README.md).
    # capturable keeps the step count on the device, which replaying the step as a CUDA graph needs.
    return torch.optim.Adam(groups, lr=lr, fused=True, capturable=capturable)


def make_update(
    loss: LossModule,
    optimizer: torch.optim.Optimizer,
    target_updater: SoftUpdate,
    max_grad_norm: float = 100.0,
    *,
    compile: bool = False,
    compile_mode: str | None = None,
    cudagraphs: bool = False,
    check_every: int = 1,
) -> Callable[[TensorDictBase], TensorDictBase]:
    """Return ``update(batch)``: one ALM gradient step on a ``[B, K]`` slice batch, returning detached metrics.

    All five losses are summed and back-propagated once (ALMLoss isolates each loss's gradient to its own group),
    each optimizer group's gradient norm is clipped to ``max_grad_norm`` as in the reference code, then one optimizer
    step and the Polyak target update.

    A non-finite gradient norm raises :class:`NonFiniteGradientError` and never reaches the parameters. With a fused
    optimizer (``make_optimizers`` builds one) the step of such an update is skipped on the device (fused Adam's
    ``found_inf``, the protocol ``GradScaler`` uses), so the host need not read the norms before stepping: it reads
    them every ``check_every`` updates, one sync each time, and the error comes at most ``check_every - 1`` updates
    late (the finite updates in between are applied; the Polyak update runs on a skipped one, toward unchanged
    parameters). On a GPU that lets the host queue several updates; on the CPU a sync is free. Any other optimizer is
    checked before every step (``check_every`` must then be 1). A CUDA graph cannot branch on a value, so
    ``cudagraphs`` needs the fused optimizer.

    ``compile`` wraps the loss and backward in ``torch.compile`` (TorchRL's ``compile_with_warmup``, one eager
    warm-up call); ``cudagraphs`` records the whole step as a CUDA graph (``CudaGraphModule``; the optimizer must be
    built with ``capturable=True``). Both follow TorchRL's ``sota-implementations``.
    """
    if check_every < 1:
        raise ValueError(f"check_every={check_every}: must be a number of updates >= 1")
    skips_on_device = bool(optimizer.defaults.get("fused"))
    if not skips_on_device and (cudagraphs or check_every > 1):
        raise ValueError(
            f"cudagraphs={cudagraphs}, check_every={check_every} need a fused optimizer (make_optimizers builds one), "
            "which skips a non-finite step on the device; use cudagraphs=False, check_every=1 with this one"
        )
    group_names = [group["name"] for group in optimizer.param_groups]
    device = optimizer.param_groups[0]["params"][0].device
    # Per group since the last check: how many updates had a non-finite norm, and the last such norm. Device tensors
    # updated in place, so a CUDA graph replays the writes.
    nonfinite_counts = torch.zeros(len(group_names), dtype=torch.int64, device=device)
    nonfinite_norms = torch.zeros(len(group_names), device=device)
    skip_step = torch.zeros((), device=device)
    if skips_on_device:
        optimizer.found_inf = skip_step  # read by fused Adam's step(); 1 skips it and undoes its step count

    def gradient_pass(batch: TensorDictBase) -> TensorDictBase:
        losses = loss(batch)
        total = sum(value for key, value in losses.items() if key.startswith("loss_"))
        total.backward()
        losses = losses.detach()
        norms = []
        for group in optimizer.param_groups:
            norm = torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm, error_if_nonfinite=False)
            losses.set(f"grad_norm_{group['name']}", norm)
            norms.append(norm)
        norms = torch.stack(norms)
        nonfinite = ~torch.isfinite(norms)
        nonfinite_counts.add_(nonfinite)
        nonfinite_norms.copy_(torch.where(nonfinite, norms, nonfinite_norms))
        skip_step.copy_(nonfinite.any())
        return losses

    def parameter_pass() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        target_updater.step()

    def raise_if_nonfinite(skipped: bool) -> None:
        if not nonfinite_counts.any():  # the one host sync of a check, for all groups
            return
        bad = int(nonfinite_counts.nonzero()[0])
        count, norm = int(nonfinite_counts[bad]), nonfinite_norms[bad].item()
        nonfinite_counts.zero_()
        raise NonFiniteGradientError(group_names[bad], norm, skipped_updates=count if skipped else 0)

    if compile:
        gradient_pass = compile_with_warmup(gradient_pass, mode=compile_mode, warmup=1)

    if cudagraphs:

        def full_step(batch: TensorDictBase) -> TensorDictBase:
            metrics = gradient_pass(batch)
            parameter_pass()
            return metrics

        graph_step = CudaGraphModule(full_step, in_keys=[], out_keys=[], warmup=5)

    num_updates = 0

    def update(batch: TensorDictBase) -> TensorDictBase:
        nonlocal num_updates
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            metrics = graph_step(batch).clone()  # the graph's output buffers are overwritten by the next replay
        else:
            metrics = gradient_pass(batch)
            if not skips_on_device:
                try:
                    raise_if_nonfinite(skipped=False)
                except NonFiniteGradientError:
                    optimizer.zero_grad(set_to_none=True)
                    raise
            parameter_pass()
        num_updates += 1
        if skips_on_device and num_updates % check_every == 0:
            raise_if_nonfinite(skipped=True)
        return metrics

    return update


def evaluate(env: EnvBase, eval_policy: Callable, num_episodes: int, max_steps: int) -> dict[str, float]:
    """Mean return and length of ``num_episodes`` episodes of the deterministic (mean-action) policy.

    A batched ``env`` (``make_env(num_envs=n)``) runs ``n`` of the episodes side by side, one policy call per step
    for all of them; ``num_episodes = n`` is one rollout.
    """
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        episodes = rollout_episodes(env, eval_policy, max_steps, num_episodes)
    returns = [episode["next", "reward"].sum().item() for episode in episodes]
    return {"return_mean": float(np.mean(returns)), "length_mean": float(np.mean([len(e) for e in episodes]))}


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file for ``path``: the path itself if it is a file, else ``<path>/checkpoint.pt``."""
    path = Path(path)
    return path if path.is_file() else path / CHECKPOINT_FILENAME


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, fsync'd, then ``os.replace``.

    A process killed mid-write leaves the previous checkpoint untouched (and at worst a stray ``*.tmp`` file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(dict(state), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU (``mmap=True`` for a cheap peek).

    ``weights_only=False`` because the state holds numpy/python RNG states; only load checkpoints you wrote.
    """
    return torch.load(checkpoint_file(path), map_location="cpu", weights_only=False, mmap=mmap)


def restore_replay_buffer(buffer: ReplayBuffer, state: Mapping[str, Any], device: torch.device) -> None:
    """Load ``buffer.state_dict()`` output into a fresh buffer whose storage lives on ``device``.

    A fresh lazy storage adopts the device of the loaded tensors (CPU, from :func:`load_checkpoint`), so the stored
    transitions are moved to ``device`` first; the sampler and writer states stay as saved.
    """
    storage_state = dict(state["_storage"])
    storage_state["_storage"] = _state_to_device(storage_state["_storage"], device)
    buffer.load_state_dict({**state, "_storage": storage_state})


def _state_to_device(state: Any, device: torch.device, *, copy_tensors: bool = False) -> Any:
    """Move the tensors of a (nested) state dict to ``device``, copying each dict so its attributes survive.

    TensorDict state dicts carry their structure in a ``_metadata`` attribute, which pytree mapping would drop.
    ``copy_tensors`` copies tensors already on ``device`` too.
    """
    if isinstance(state, torch.Tensor):
        return state.to(device, copy=copy_tensors)
    if isinstance(state, dict):
        moved = copy(state)
        for key, value in moved.items():
            moved[key] = _state_to_device(value, device, copy_tensors=copy_tensors)
        return moved
    if isinstance(state, list):
        return [_state_to_device(value, device, copy_tensors=copy_tensors) for value in state]
    return state


def checkpoint_state(
    cfg: Any,
    *,
    collected_frames: int,
    num_updates: int,
    loss: LossModule,
    optimizer: torch.optim.Optimizer,
    exploration_noise: torch.nn.Module | None,
    replay_buffer: ReplayBuffer,
) -> dict[str, Any]:
    """What a recipe checkpoint holds, for :func:`save_checkpoint`; :func:`resume_training` reads it back."""
    return {
        "env_name": cfg.env.name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "collected_frames": collected_frames,
        "num_updates": num_updates,
        "loss": loss.state_dict(),
        "optimizer": optimizer.state_dict(),
        "exploration_noise": exploration_noise.state_dict() if exploration_noise is not None else None,
        "replay_buffer": replay_buffer.state_dict(),
        "rng": rng_state(),
    }


def resume_training(
    path: str | os.PathLike,
    *,
    loss: LossModule,
    optimizer: torch.optim.Optimizer,
    exploration_noise: torch.nn.Module | None,
    replay_buffer: ReplayBuffer,
    device: torch.device,
) -> tuple[int, int]:
    """Load a recipe checkpoint into fresh training objects and the RNGs; returns ``(collected_frames, num_updates)``.

    The optimizer gets the checkpoint's state (moments, step counts) but keeps its own settings: the learning rate
    and ``capturable``, which the config (``compile.cudagraphs``) decides, are not taken from the checkpoint as
    ``Optimizer.load_state_dict`` would (a run resumed with CUDA graphs would fail to capture a non-capturable step).

    The checkpoint is memory-mapped (a 1e6-transition buffer is ~3 GB: mapped, not read into memory) and released on
    return. Nothing may keep a tensor of it: the mapping would keep every page the buffer's copy touched resident for
    the rest of the run (another 2.9 GB for Humanoid). ``Optimizer.load_state_dict`` keeps CPU tensors of the right
    dtype as they are, so its state is copied first.
    """
    state = load_checkpoint(path, mmap=True)
    loss.load_state_dict(state["loss"])
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(_state_to_device(state["optimizer"], torch.device("cpu"), copy_tensors=True))
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    if exploration_noise is not None:  # None when the actor learns its std (ALM-ENT)
        exploration_noise.load_state_dict(state["exploration_noise"])
    restore_replay_buffer(replay_buffer, state["replay_buffer"], device)
    set_rng_state(state["rng"])
    return state["collected_frames"], state["num_updates"]


def rng_state() -> dict[str, Any]:
    """The torch (and CUDA), numpy and python RNG states, for checkpoints."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def validate_config(cfg: Any) -> None:
    """Check the recipe config before any heavy work; each problem is a one-line ``ValueError``.

    ``cfg.checkpoint.resume`` must already be an absolute path (Hydra changes the working directory).
    """
    check_env_name(cfg.env.name)
    if cfg.loss.horizon < 1:
        raise ValueError(f"loss.horizon must be >= 1 (the slice length K; paper: 3), got {cfg.loss.horizon}")
    if cfg.optim.batch_size < 1:
        raise ValueError(f"optim.batch_size must be >= 1 (paper: 512), got {cfg.optim.batch_size}")
    # Slices never cross an episode boundary, so no stored episode could fill a longer slice.
    if cfg.loss.horizon > cfg.env.max_episode_steps:
        raise ValueError(
            f"loss.horizon={cfg.loss.horizon} is longer than any episode (env.max_episode_steps="
            f"{cfg.env.max_episode_steps}); use loss.horizon <= env.max_episode_steps"
        )
    if cfg.collector.init_random_frames < cfg.loss.horizon:
        raise ValueError(
            f"collector.init_random_frames={cfg.collector.init_random_frames} cannot fill one slice of "
            f"loss.horizon={cfg.loss.horizon} before the first update; use at least {cfg.loss.horizon}"
        )
    product = cfg.collector.frames_per_batch * cfg.optim.utd_ratio
    if cfg.collector.frames_per_batch < 1 or updates_per_batch(cfg) < 1 or not math.isclose(product, round(product)):
        raise ValueError(
            f"collector.frames_per_batch={cfg.collector.frames_per_batch} x optim.utd_ratio={cfg.optim.utd_ratio} = "
            f"{product} updates per collected batch; choose them so that this is a whole number >= 1"
        )
    buffer_size = cfg.replay_buffer.size
    if buffer_size is not None and buffer_size < cfg.optim.batch_size * cfg.loss.horizon:
        raise ValueError(
            f"replay_buffer.size={buffer_size} is smaller than one batch of optim.batch_size x loss.horizon = "
            f"{cfg.optim.batch_size * cfg.loss.horizon} transitions; raise replay_buffer.size or lower the batch"
        )
    if cfg.collector.device not in ("auto", None):
        try:
            resolve_device(cfg.collector.device)
        except RuntimeError as err:
            raise ValueError(f"collector.device={cfg.collector.device!r} is not a valid torch device: {err}") from None
    for key, value, valid in (
        ("network.encoder", cfg.network.encoder, ("mlp", "identity")),
        ("network.classifier", cfg.network.classifier, ("mlp", "linear")),
        ("loss.actor_objective", cfg.loss.actor_objective, ("svg", "td3")),
        ("network.actor_std", cfg.network.actor_std, ("scheduled", "learned")),
    ):
        if value not in valid:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(valid)}")
    shift = cfg.loss.log_reward_shift
    if shift is not None and not shift > 0:
        raise ValueError(f"loss.log_reward_shift must be positive (paper: 10000) or null, got {shift!r}")
    if cfg.loss.entropy_coef < 0:
        raise ValueError(f"loss.entropy_coef must be >= 0, got {cfg.loss.entropy_coef}")
    if cfg.loss.entropy_coef > 0 and cfg.network.actor_std != "learned":
        raise ValueError(
            f"loss.entropy_coef={cfg.loss.entropy_coef} (ALM-ENT) needs an actor that learns its std: "
            "add network.actor_std=learned"
        )
    # Out-of-range numbers either fail later without naming the key (Adam, SoftUpdate) or train silently wrong.
    number_ranges = (
        ("collector.total_frames", cfg.collector.total_frames, lambda x: x >= 1, ">= 1"),
        ("optim.lr", cfg.optim.lr, lambda x: x > 0, "> 0 (paper: 1e-4)"),
        ("optim.gamma", cfg.optim.gamma, lambda x: 0 < x <= 1, "in (0, 1] (paper: 0.99)"),
        ("optim.max_grad_norm", cfg.optim.max_grad_norm, lambda x: x > 0, "> 0 (paper: 100)"),
        ("loss.tau", cfg.loss.tau, lambda x: 0 < x <= 1, "in (0, 1] (paper: 0.005)"),
        ("loss.lmbda", cfg.loss.lmbda, lambda x: 0 <= x <= 1, "in [0, 1] (paper: 0.95)"),
        ("loss.classifier_coef", cfg.loss.classifier_coef, lambda x: x >= 0, ">= 0 (paper: 0.1; 0 drops the bonus)"),
        ("loss.noise_clip", cfg.loss.noise_clip, lambda x: x >= 0, ">= 0 (paper: 0.3)"),
        ("exploration.noise_end", cfg.exploration.noise_end, lambda x: x >= 0, ">= 0 (paper: 0.1)"),
        ("exploration.noise_init", cfg.exploration.noise_init, lambda x: x >= cfg.exploration.noise_end,
         f">= exploration.noise_end={cfg.exploration.noise_end} (paper: 1.0)"),
        ("exploration.annealing_frames", cfg.exploration.annealing_frames, lambda x: x >= 1, ">= 1 (paper: 100000)"),
    )
    for key, value, valid, expected in number_ranges:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ValueError(f"{key} must be a number {expected}, got {value!r}")
    backend = cfg.logger.backend
    if backend:
        if backend not in LOGGER_PACKAGES:
            raise ValueError(
                f"logger.backend={backend!r} is not one of {', '.join(LOGGER_PACKAGES)}, or empty (no logging)"
            )
        package = LOGGER_PACKAGES[backend]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"logger.backend={backend!r} needs the {package} package: pip install {package}")
    for key, value in (
        ("logger.eval_iter", cfg.logger.eval_iter),
        ("logger.num_eval_episodes", cfg.logger.num_eval_episodes),
        ("checkpoint.interval", cfg.checkpoint.interval),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    num_threads = cfg.compile.num_threads
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"compile.num_threads must be a positive integer or null (one per core), got {num_threads!r}")
    if cfg.compile.cudagraphs and resolve_device(cfg.collector.device or "auto").type != "cuda":
        raise ValueError(
            "compile.cudagraphs=true needs a CUDA device (collector.device="
            f"{cfg.collector.device!r} resolves to the CPU here); use compile.cudagraphs=false"
        )
    if cfg.checkpoint.resume:
        resume = checkpoint_file(cfg.checkpoint.resume)
        if not resume.is_file():
            raise ValueError(
                f"checkpoint.resume={cfg.checkpoint.resume!r}: no checkpoint at {str(resume)!r}; "
                f"pass a checkpoint file or a directory holding {CHECKPOINT_FILENAME}"
            )
        stored = load_checkpoint(resume, mmap=True)
        if stored["env_name"] != cfg.env.name:
            raise ValueError(
                f"checkpoint.resume={cfg.checkpoint.resume!r} was trained on env.name={stored['env_name']!r}, "
                f"not env.name={cfg.env.name!r}; resume with env.name={stored['env_name']}"
            )
        if stored["collected_frames"] >= cfg.collector.total_frames:
            raise ValueError(
                f"checkpoint.resume={cfg.checkpoint.resume!r} already holds {stored['collected_frames']} frames, "
                f">= collector.total_frames={cfg.collector.total_frames}; raise collector.total_frames to continue"
            )
        # Networks of other sizes would fail to load with a page of tensor shapes; a buffer of another capacity would
        # load silently, its storage keeping the checkpoint's rows while the buffer's max_size says the config's.
        stored_config = stored["config"]
        for key, value in stored_config["network"].items():
            if cfg.network.get(key) != value:
                raise ValueError(
                    f"checkpoint.resume={cfg.checkpoint.resume!r} was trained with network.{key}={value!r}, not "
                    f"network.{key}={cfg.network.get(key)!r}; resume with network.{key}={value}"
                )
        stored_capacity = stored_config["replay_buffer"]["size"] or replay_buffer_size_for(stored["env_name"])
        capacity = cfg.replay_buffer.size or replay_buffer_size_for(cfg.env.name)
        if capacity != stored_capacity:
            raise ValueError(
                f"checkpoint.resume={cfg.checkpoint.resume!r} holds a replay buffer of {stored_capacity} transitions, "
                f"not replay_buffer.size={capacity}; resume with replay_buffer.size={stored_capacity}"
            )
