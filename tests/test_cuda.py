"""The GPU path, where CUDA is (skipped elsewhere; ``benchmarks/device_check.sh`` runs these on a lent GPU machine).

On the CPU, ``CudaGraphModule`` falls back to eager, so only these tests capture and replay the update as a CUDA graph
(random draws, the fused optimizer's device-side skip of a non-finite step and the target update inside the graph),
and run the recipe with the networks, the replay buffer and the sampling on the device.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._inductor.config
from torchrl.objectives import SoftUpdate

from alm_torchrl.update import NonFiniteGradientError, make_optimizer, make_target_updater, make_update

from conftest import (
    LR,
    MAX_GRAD_NORM,
    TAU,
    TINY_RECIPE,
    assert_same_state,
    reference_pair,
    sequential_update,
    slice_batch,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# make_update's CudaGraphModule runs 5 eager warm-up calls, captures on the 6th and replays from the 7th.
UPDATES = 9


def _update(loss, compile: bool, cudagraphs: bool, check_every: int = 1):
    optimizer = make_optimizer(loss, LR, capturable=cudagraphs)
    return make_update(loss, optimizer, make_target_updater(loss, tau=TAU), MAX_GRAD_NORM, compile=compile,
                       cudagraphs=cudagraphs, check_every=check_every)


@pytest.mark.parametrize(
    "compile, cudagraphs", [(False, False), (False, True), (True, False), (True, True)],
    ids=["eager", "cudagraphs", "compiled", "compiled-cudagraphs"],
)
def test_update_on_cuda_equals_sequential_update(compile, cudagraphs):
    reference, optimizers, fast = reference_pair(device=CUDA)
    reference_targets = SoftUpdate(reference, tau=TAU)
    update = _update(fast, compile, cudagraphs)
    # Inductor draws random numbers its own way unless told to use eager's generator.
    with torch._inductor.config.patch(fallback_random=True):
        for step in range(UPDATES):
            batch = slice_batch(seed=10 + step).to(CUDA)
            torch.manual_seed(step)  # the same draws in both, also when the update is a replayed graph
            sequential_update(reference, optimizers, reference_targets, batch)
            torch.manual_seed(step)
            metrics = update(batch)
    assert metrics["loss_model"].device.type == "cuda"
    assert_same_state(reference, fast)


def test_a_replayed_cuda_graph_skips_a_non_finite_step_on_the_device():
    _, _, loss = reference_pair(device=CUDA)
    update = _update(loss, compile=False, cudagraphs=True, check_every=2)
    for step in range(8):  # the last two replayed
        update(slice_batch(seed=10 + step).to(CUDA))
    # The graph reads the parameters' memory: a NaN written in place reaches the next replays.
    with torch.no_grad():
        next(iter(loss.qvalue_network_params.values(True, True))).view(-1)[0] = float("nan")
    before = {name: param.detach().clone() for name, param in loss.named_parameters()}
    update(slice_batch(seed=30).to(CUDA))  # update 9: skipped on the device, not checked yet
    with pytest.raises(NonFiniteGradientError, match="optimizer group 'model'") as raised:
        update(slice_batch(seed=31).to(CUDA))  # update 10: skipped, then the check
    assert raised.value.skipped_updates == 2
    assert all(torch.equal(before[name].nan_to_num(), param.nan_to_num()) for name, param in loss.named_parameters())


def test_recipe_on_cuda_compiled_and_graphed(tmp_path):
    """The recipe as a GPU user runs it: everything on the device, the update compiled and replayed as a CUDA graph,
    the behaviour policy compiled, batches prefetched; then a resume from its checkpoint."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "alm" / "alm.py"
    overrides = [
        *(override for override in TINY_RECIPE if not override.startswith("compile.compile")),
        "env.name=Pendulum-v1", "collector.device=cuda", "compile.compile=true", "compile.cudagraphs=true",
        "collector.total_frames=300", "logger.eval_iter=150", "checkpoint.interval=150",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    first = subprocess.run([sys.executable, str(recipe), *overrides, f"hydra.run.dir={tmp_path / 'first'}"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "runs eagerly" not in first.stderr, first.stderr[-3000:]  # compiled, not fallen back
    (scalars,) = (tmp_path / "first").glob("alm_logging/*/scalars")
    eval_rows = (scalars / "eval" / "return_mean.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in eval_rows] == ["150", "300"]
    assert all(abs(float(row.split(",")[1])) < float("inf") for row in eval_rows)
    resumed = subprocess.run(
        [sys.executable, str(recipe), *overrides, "collector.total_frames=400", f"hydra.run.dir={tmp_path / 'resumed'}",
         f"checkpoint.resume={tmp_path / 'first' / 'checkpoints'}"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [path.name for path in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["checkpoint-000000000400"]
