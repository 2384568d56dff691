"""The fast update (one summed backward, one grouped Adam, vmap or loop critics, optional compile / CUDA-graph
wrapper) moves every parameter exactly as a straightforward sequential update does: each of the five losses
differentiated on its own into its own group, four separate plain Adam optimizers, then the Polyak update."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._inductor.config
from torchrl.objectives import SoftUpdate

from alm_torchrl.update import (
    OPTIMIZER_GROUPS,
    NonFiniteGradientError,
    make_optimizer,
    make_target_updater,
    make_update,
)

from conftest import LOSS_GROUPS, slice_batch, tiny_loss

LR, MAX_GRAD_NORM, TAU = 1e-3, 100.0, 0.005
# Which optimizer (the reference code's four) steps each loss's parameters.
LOSS_TO_OPTIMIZER = {loss_key: group for group, loss_keys in OPTIMIZER_GROUPS.items() for loss_key in loss_keys}


def _group_params(loss, group: str) -> list[torch.nn.Parameter]:
    prefixes = tuple(prefix for loss_key in OPTIMIZER_GROUPS[group] for prefix in LOSS_GROUPS[loss_key])
    return [p for name, p in loss.named_parameters() if name.startswith(prefixes)]


def sequential_update(loss, optimizers: dict, target_updater: SoftUpdate, batch) -> None:
    """The reference organisation: each loss's own gradient, per-group clipping, four optimizer steps."""
    losses = loss(batch)
    named = dict(loss.named_parameters())
    for loss_name, group in LOSS_TO_OPTIMIZER.items():
        params = [p for name, p in named.items() if name.startswith(LOSS_GROUPS[loss_name])]
        grads = torch.autograd.grad(losses[loss_name], params, retain_graph=True)
        for param, grad in zip(params, grads):
            param.grad = grad if param.grad is None else param.grad + grad
        # Gradient isolation: this loss reaches no other group's parameters.
        others = [p for name, p in named.items() if not name.startswith(LOSS_GROUPS[loss_name])]
        stray = torch.autograd.grad(losses[loss_name], others, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in stray), f"{loss_name} leaks into another group"
    for group, optimizer in optimizers.items():
        torch.nn.utils.clip_grad_norm_(_group_params(loss, group), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    target_updater.step()


def _pair(deactivate_vmap: bool):
    reference = tiny_loss(seed=3)
    fast = tiny_loss(seed=3, deactivate_vmap=deactivate_vmap)  # the same weights
    optimizers = {
        group: torch.optim.Adam(_group_params(reference, group), lr=LR, foreach=False) for group in OPTIMIZER_GROUPS
    }
    return reference, optimizers, fast


def _assert_same_state(reference, fast) -> None:
    fast_state = fast.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("deactivate_vmap", [False, True], ids=["vmap", "loop"])
@pytest.mark.parametrize("cudagraphs", [False, True], ids=["eager", "cudagraph-wrapper"])
def test_fast_update_equals_sequential_update(deactivate_vmap, cudagraphs):
    reference, optimizers, fast = _pair(deactivate_vmap)
    reference_targets = SoftUpdate(reference, tau=TAU)
    with warnings.catch_warnings():
        # Without CUDA, CudaGraphModule warns and runs eagerly: this checks the wrapper's plumbing on the CPU.
        warnings.simplefilter("ignore", UserWarning)
        update = make_update(
            fast, make_optimizer(fast, LR), make_target_updater(fast, tau=TAU), MAX_GRAD_NORM, cudagraphs=cudagraphs
        )
        for step in range(3):
            batch = slice_batch(seed=10 + step)
            torch.manual_seed(step)  # the same random draws in both
            sequential_update(reference, optimizers, reference_targets, batch)
            torch.manual_seed(step)
            metrics = update(batch)
    assert {f"grad_norm_{group}" for group in OPTIMIZER_GROUPS} <= set(metrics.keys())
    _assert_same_state(reference, fast)
    moved = [
        not torch.equal(p, q) for (name, p), (_, q) in zip(reference.named_parameters(), tiny_loss(seed=3).named_parameters())
    ]
    assert all(moved), "every parameter of every group should have been updated"


def test_compiled_update_equals_sequential_update():
    reference, optimizers, fast = _pair(deactivate_vmap=False)
    reference_targets = SoftUpdate(reference, tau=TAU)
    update = make_update(fast, make_optimizer(fast, LR), make_target_updater(fast, tau=TAU), MAX_GRAD_NORM,
                         compile=True)
    # Inductor draws random numbers its own way unless told to use eager's generator. torch's own patch, not
    # pytest's monkeypatch, whose undo deletes the option and breaks every later compilation in the session.
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(3):  # the first call runs eagerly (warm-up), the next ones compiled
            batch = slice_batch(seed=10 + step)
            torch.manual_seed(step)
            sequential_update(reference, optimizers, reference_targets, batch)
            torch.manual_seed(step)
            update(batch)
        _assert_same_state(reference, fast)
        # The compiled backward is traced, and a traced backward skips backward hooks: while one is registered, the
        # update runs eagerly (said once), and the hook runs.
        critic_weight = next(iter(fast.qvalue_network_params.values(True, True)))
        hook_calls = []
        handle = critic_weight.register_hook(lambda grad: hook_calls.append(grad.shape))
        with pytest.warns(UserWarning, match="a backward hook is registered in the loss: the update runs eagerly"):
            update(slice_batch(seed=15))
        update(slice_batch(seed=16))
        assert hook_calls == [critic_weight.shape] * 2
        handle.remove()
        # The compiled pass flags a non-finite norm on the device as well: the step is skipped, then the update raises.
        # A NaN critic weight: the model loss reads the critic too, and the first group in OPTIMIZER_GROUPS with a
        # bad norm is named.
        with torch.no_grad():
            next(iter(fast.qvalue_network_params.values(True, True))).view(-1)[0] = float("nan")
        before = {name: p.detach().clone() for name, p in fast.named_parameters()}
        with pytest.raises(NonFiniteGradientError, match="optimizer group 'model'"):
            update(slice_batch(seed=20))
    assert all(torch.equal(before[name].nan_to_num(), p.nan_to_num()) for name, p in fast.named_parameters())
    assert torch._inductor.config.fallback_random is False


def test_a_compilation_that_fails_falls_back_to_eager_with_one_warning(monkeypatch):
    """A torch.compile failure (no C++ compiler, a dynamo bug) leaves the update eager, warned once, not a crash."""
    import alm_torchrl.update

    def failing_compile(step, **kwargs):
        def compiled(batch):
            raise torch._dynamo.exc.TorchRuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(alm_torchrl.update, "compile_with_warmup", failing_compile)
    reference, optimizers, fast = _pair(deactivate_vmap=False)
    reference_targets = SoftUpdate(reference, tau=TAU)
    update = make_update(fast, make_optimizer(fast, LR), make_target_updater(fast, tau=TAU), MAX_GRAD_NORM,
                         compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed, the update runs eagerly: .*InvalidCxxCompiler") as seen:
        for step in range(3):
            batch = slice_batch(seed=10 + step)
            torch.manual_seed(step)
            sequential_update(reference, optimizers, reference_targets, batch)
            torch.manual_seed(step)
            update(batch)
    assert len([w for w in seen if "torch.compile failed" in str(w.message)]) == 1
    _assert_same_state(reference, fast)
