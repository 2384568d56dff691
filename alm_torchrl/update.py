"""ALM's update step: its four optimisers as parameter groups of one Adam, and one gradient step.

The reference code steps four Adam optimisers (encoder + world model, reward model + classifier, critics, actor),
each clipping its own gradient norm. Here they are the named parameter groups of one fused Adam, filled from
:attr:`ALMLoss.LOSS_NETWORKS <alm_torchrl.objectives.ALMLoss.LOSS_NETWORKS>` through
:meth:`~alm_torchrl.objectives.ALMLoss.trained_parameters`, and one backward of the summed losses replaces four
(ALMLoss isolates each loss's gradient to its own networks): ``tests/test_fast_update.py`` checks that this moves
every parameter exactly as the sequential five-loss, four-optimiser update does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch._dynamo
from tensordict import TensorDictBase
from tensordict.nn import CudaGraphModule
from torch.nn.modules import module as nn_module
from torchrl._utils import compile_with_warmup
from torchrl.objectives import SoftUpdate

from alm_torchrl.objectives import ALMLoss

__all__ = [
    "OPTIMIZER_GROUPS",
    "ForeachSoftUpdate",
    "NonFiniteGradientError",
    "make_optimizer",
    "make_target_updater",
    "make_update",
]

# ALM's four optimisers (spec, "Order and optimizers"), by the loss terms whose parameters each one steps.
OPTIMIZER_GROUPS: dict[str, tuple[str, ...]] = {
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
        losses = " + ".join(OPTIMIZER_GROUPS.get(group, ()))
        message = f"non-finite gradient norm ({norm}) from {losses or 'the losses'} in optimizer group {group!r}"
        if skipped_updates:
            message += f"; the optimizer step of {skipped_updates} update(s) since the last check was skipped"
        super().__init__(message)
        self.group = group
        self.norm = norm
        self.skipped_updates = skipped_updates


def make_optimizer(
    loss: ALMLoss, lr: float = 1e-4, *, capturable: bool = False, fused: bool = True
) -> torch.optim.Adam:
    """One Adam holding ALM's four optimisers as the named param groups of :data:`OPTIMIZER_GROUPS`.

    A single optimizer gives the update one ``step()`` call site while keeping per-group gradient clipping (each group
    carries its ``"name"``); what ``torchrl.objectives.group_optimizers`` would build from four Adams. Raises if a loss
    parameter belongs to no group, so new parameters are never silently left untrained.

    ``fused`` (the default) runs one kernel per group and lets :func:`make_update` skip a non-finite step on the
    device; ``fused=False`` gives torch's foreach Adam. ``capturable`` keeps the step count on the device, which
    replaying the step as a CUDA graph needs.
    """
    if not lr > 0:
        raise ValueError(f"lr must be a number > 0 (paper: 1e-4), got {lr!r}")
    groups = []
    for group_name, loss_keys in OPTIMIZER_GROUPS.items():
        params = [param for key in loss_keys for param in loss.trained_parameters(key).values()]
        if not params:
            raise ValueError(f"optimizer group {group_name!r} matched no parameter of the loss ({loss_keys})")
        groups.append({"params": params, "name": group_name})
    grouped = {id(param) for group in groups for param in group["params"]}
    orphans = [name for name, param in loss.named_parameters() if id(param) not in grouped]
    if orphans:
        raise ValueError(f"loss parameters in no optimizer group: {orphans}")
    if fused:
        return torch.optim.Adam(groups, lr=lr, fused=True, capturable=capturable)
    return torch.optim.Adam(groups, lr=lr, foreach=True, capturable=capturable)


class ForeachSoftUpdate(SoftUpdate):
    """TorchRL's :class:`~torchrl.objectives.SoftUpdate`, moving every target with one ``torch._foreach_lerp_``.

    Workaround for torchrl <= 0.14.1, whose ``step`` builds detached TensorDicts and lerps them network by network:
    about 1 ms of Python per update for ALM's encoder and critic targets, against 0.03 ms here, where the tensors are
    also listed only once (``benchmarks/README.md``). Same arithmetic, same checks. The fix for torchrl itself is in
    ``upstream/torchrl/``; drop this class when a torchrl release has it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._leaves: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def step(self) -> None:
        if not self.initialized:
            raise RuntimeError(f"{type(self).__name__} must be initialized (init_()) before calling step()")
        if self._leaves is None:
            # Listed once: the tensors of the TensorDicts TorchRL's updater itself keeps for its lifetime (``_sources``,
            # ``_targets``), which moving, casting or loading the loss changes in place. Walking them cost 0.25-0.35
            # ms a step, more than the step (0.08 ms compiled, tiny sizes), and the step runs eagerly.
            sources, targets = [], []
            for key, source in self._sources.items():
                target = self._targets.get(f"target_{key}")
                for leaf_key in source.keys(True, True):
                    sources.append(source.get(leaf_key))
                    targets.append(target.get(leaf_key))
            self._leaves = targets, sources
        targets, sources = self._leaves
        if any(target.requires_grad for target in targets):
            raise RuntimeError("the target parameter is part of a graph.")
        with torch.no_grad():
            torch._foreach_lerp_(targets, sources, 1 - self.eps)


def make_target_updater(loss: ALMLoss, tau: float = 0.005) -> SoftUpdate:
    """A :class:`~torchrl.objectives.SoftUpdate` moving the target encoder and critics by ``tau`` per step.

    Refuses ``tau = 0`` (the targets would never move), which ``SoftUpdate`` accepts. Returns a
    :class:`ForeachSoftUpdate`, the same update with less Python per step.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ValueError(f"tau must be a number in (0, 1] (paper: 0.005), got {tau!r}")
    return ForeachSoftUpdate(loss, tau=tau)


def _backward_hook_check(modules: list[torch.nn.Module], params: list[torch.Tensor]) -> Callable[[], bool]:
    """A check of whether a backward hook would run: on one of ``params`` (gradient or post-accumulate hooks), on one
    of ``modules``, or on every module (``register_module_full_backward_hook``)."""

    def hooked() -> bool:
        # Private attributes: torch has no public query for registered hooks.
        if nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
            return True
        if any(module._backward_hooks or module._backward_pre_hooks for module in modules):
            return True
        return any(param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None) for param in params)

    return hooked


def _compiled_or_eager(
    step: Callable[[TensorDictBase], TensorDictBase],
    compile_mode: str | None,
    on_failure: Callable[[], None],
    hooked: Callable[[], bool],
) -> Callable[[TensorDictBase], TensorDictBase]:
    """``step`` compiled as TorchRL's recipes compile it (one eager warm-up call, then ``torch.compile``).

    If compiling fails, ``step`` runs eagerly from then on, after one warning line naming the cause: a missing
    toolchain must not end a training run. ``on_failure`` undoes what a partly run compiled step left (its gradients).
    While ``hooked()`` (a backward hook is registered) and dynamo traces the backward, ``step`` runs eagerly, said
    once in a warning.
    """
    compiled = compile_with_warmup(step, mode=compile_mode, warmup=1)
    # Dynamo traces ``backward()`` into the graph instead of breaking it there: one graph and one set of guards fewer
    # per update. A dynamo option read while tracing, so it is set around every call rather than for the process; torch
    # < 2.11 lacks it and breaks the graph at ``backward()``, which runs eagerly, hooks included. The traced backward
    # skips backward hooks without a word, and with a module hook accumulates no gradient either (torch 2.13;
    # upstream/pytorch/), hence ``hooked``.
    traces_backward = hasattr(torch._dynamo.config, "trace_autograd_ops")
    if traces_backward:
        compiled = torch._dynamo.config.patch(trace_autograd_ops=True)(compiled)
    use_compiled, warned_hooks = True, False

    def compiled_or_eager(batch: TensorDictBase) -> TensorDictBase:
        nonlocal use_compiled, warned_hooks
        if use_compiled and traces_backward and hooked():
            if not warned_hooks:
                warned_hooks = True
                warnings.warn("a backward hook is registered in the loss: the update runs eagerly while it is "
                              "(the compiled update's traced backward would skip it)", stacklevel=2)
        elif use_compiled:
            try:
                return compiled(batch)
            except torch._dynamo.exc.TorchDynamoException as err:
                use_compiled = False
                on_failure()
                cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(f"torch.compile failed, the update runs eagerly: {cause}", stacklevel=2)
        return step(batch)

    return compiled_or_eager


def loss_networks(loss: ALMLoss) -> list[torch.nn.Module]:
    """The networks ``loss`` calls (encoder, world model, ...), each once."""
    names = dict.fromkeys(name for names in loss.LOSS_NETWORKS.values() for name in names)
    return [getattr(loss, name) for name in names]


def make_update(
    loss: ALMLoss,
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
    optimizer (``make_optimizer`` builds one) the step of such an update is skipped on the device (fused Adam's
    ``found_inf``, the protocol ``GradScaler`` uses), so the host need not read the norms before stepping: it reads
    them every ``check_every`` updates, one sync each time, and the error comes at most ``check_every - 1`` updates
    late (the finite updates in between are applied; the Polyak update runs on a skipped one, toward unchanged
    parameters). On a GPU that lets the host queue several updates; on the CPU a sync is free. Any other optimizer is
    checked before every step (``check_every`` must then be 1). A CUDA graph cannot branch on a value, so
    ``cudagraphs`` needs the fused optimizer.

    ``compile`` wraps the gradient pass (losses, backward, clipping) in ``torch.compile`` (TorchRL's
    ``compile_with_warmup``, one eager warm-up call), with ``backward()`` traced into the graph (dynamo's
    ``trace_autograd_ops``, torch >= 2.11); the optimizer step and the target update run eagerly after it. That traced
    backward would skip backward hooks, so while one is registered on the loss's parameters or modules the update runs
    eagerly, with a warning.
    ``cudagraphs`` records the whole step as a CUDA graph (``CudaGraphModule``; the optimizer must be built with
    ``capturable=True``). Both follow TorchRL's ``sota-implementations``.
    """
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be a number > 0 (paper: 100), got {max_grad_norm!r}")
    if check_every < 1:
        raise ValueError(f"check_every must be a number of updates >= 1, got {check_every!r}")
    skips_on_device = bool(optimizer.defaults.get("fused"))
    if not skips_on_device and (cudagraphs or check_every > 1):
        raise ValueError(
            f"cudagraphs={cudagraphs}, check_every={check_every} need a fused optimizer (make_optimizer builds one), "
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

    # Only the gradient pass is compiled. The fused optimizer step breaks dynamo's graph anyway (torch runs it
    # eagerly), and a graph break inside a compiled function makes dynamo trace that function a second time, up to
    # the break: about 40 s more at every start-up at the paper's sizes.
    gradient_step = gradient_pass
    if compile:
        gradient_step = _compiled_or_eager(
            gradient_pass,
            compile_mode,
            on_failure=lambda: optimizer.zero_grad(set_to_none=True),
            hooked=_backward_hook_check(
                # TorchRL keeps a loss's networks outside its submodules (convert_to_functional), so list them.
                [*loss.modules(), *(module for network in loss_networks(loss) for module in network.modules())],
                [param for group in optimizer.param_groups for param in group["params"]],
            ),
        )

    def full_step(batch: TensorDictBase) -> TensorDictBase:
        metrics = gradient_step(batch)
        parameter_pass()
        return metrics

    # A fused optimizer needs no host check between the two passes, so the whole step (losses, backward, clipping,
    # optimizer, target update) is one function to graph; any other one is checked before stepping.
    step = full_step if skips_on_device else gradient_step
    if cudagraphs:
        step = CudaGraphModule(step, in_keys=[], out_keys=[], warmup=5)

    num_updates = 0

    def update(batch: TensorDictBase) -> TensorDictBase:
        nonlocal num_updates
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            metrics = step(batch).clone()  # the graph's output buffers are overwritten by the next replay
        elif skips_on_device:
            metrics = step(batch)
        else:
            metrics = step(batch)
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
