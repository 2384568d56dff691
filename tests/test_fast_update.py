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
    _backward_hook_check,
    make_optimizer,
    make_target_updater,
    make_update,
)

from conftest import (
    LR,
    MAX_GRAD_NORM,
    TAU,
    assert_same_state,
    reference_pair,
    sequential_update,
    slice_batch,
    tiny_loss,
)


@pytest.mark.parametrize("deactivate_vmap", [False, True], ids=["vmap", "loop"])
@pytest.mark.parametrize("cudagraphs", [False, True], ids=["eager", "cudagraph-wrapper"])
def test_fast_update_equals_sequential_update(deactivate_vmap, cudagraphs):
    reference, optimizers, fast = reference_pair(deactivate_vmap)
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
    assert_same_state(reference, fast)
    initial = tiny_loss(seed=3).parameters()
    moved = [not torch.equal(param, start) for param, start in zip(reference.parameters(), initial)]
    assert all(moved), "every parameter of every group should have been updated"


def test_compiled_update_equals_sequential_update():
    reference, optimizers, fast = reference_pair(deactivate_vmap=False)
    reference_targets = SoftUpdate(reference, tau=TAU)
    update = make_update(fast, make_optimizer(fast, LR), make_target_updater(fast, tau=TAU), MAX_GRAD_NORM,
                         compile=True)
    torch._dynamo.utils.counters.clear()
    # Inductor draws random numbers its own way unless told to use eager's generator. torch's own patch, not
    # pytest's monkeypatch, whose undo deletes the option and breaks every later compilation in the session.
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(3):  # the first call runs eagerly (warm-up), the next ones compiled
            torch.manual_seed(step)
            sequential_update(reference, optimizers, reference_targets, slice_batch(seed=10 + step))
            torch.manual_seed(step)
            update(slice_batch(seed=10 + step))  # a batch as the sampler gives it (the loss writes its priority)
        assert_same_state(reference, fast)
        # A graph break inside the compiled pass would make dynamo trace it twice at every start-up, and so would a
        # guard that the first compiled call breaks for the next one.
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])
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
        # The same for a module's backward hook on one of the loss's networks (which are not submodules of the loss;
        # the warning was said above).
        layer = next(module for module in fast.world_model.modules() if isinstance(module, torch.nn.Linear))
        handle = layer.register_full_backward_hook(lambda module, grad_input, grad_output: hook_calls.append("world"))
        update(slice_batch(seed=17))
        assert hook_calls.count("world") > 0
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


@pytest.mark.parametrize("kind", ["tensor", "post-accumulate", "module", "module-pre", "global"])
def test_the_hook_check_sees_every_kind_of_backward_hook(kind):
    """The compiled update's traced backward runs no backward hook (and with a module hook accumulates no gradient:
    upstream/pytorch/), so the update must see each kind to run eagerly while one is registered."""
    module = torch.nn.Linear(2, 1)
    hooked = _backward_hook_check([module], list(module.parameters()))
    assert not hooked()
    register = {
        "tensor": lambda: module.weight.register_hook(lambda grad: grad),
        "post-accumulate": lambda: module.bias.register_post_accumulate_grad_hook(lambda param: None),
        "module": lambda: module.register_full_backward_hook(lambda *args: None),
        "module-pre": lambda: module.register_full_backward_pre_hook(lambda *args: None),
        "global": lambda: torch.nn.modules.module.register_module_full_backward_hook(lambda *args: None),
    }[kind]
    handle = register()
    assert hooked()
    handle.remove()
    assert not hooked()


def test_a_compilation_that_fails_falls_back_to_eager_with_one_warning(monkeypatch):
    """A torch.compile failure (no C++ compiler, a dynamo bug) leaves the update eager, warned once, not a crash."""
    import alm_torchrl.update

    def failing_compile(step, **kwargs):
        def compiled(batch):
            raise torch._dynamo.exc.TorchRuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(alm_torchrl.update, "compile_with_warmup", failing_compile)
    reference, optimizers, fast = reference_pair(deactivate_vmap=False)
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
    assert_same_state(reference, fast)
