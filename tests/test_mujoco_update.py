"""One optimisation step on a batch of HalfCheetah-v5 slices changes exactly the parameters it should."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrl.collectors import Collector
from torchrl.objectives import SoftUpdate

from alm_torchrl import make_alm_modules
from alm_torchrl.envs import make_env
from alm_torchrl.objectives import ALMLoss
from alm_torchrl.replay import make_replay_buffer, sample_slices

from conftest import LOSS_GROUPS, total_loss

BATCH_SIZE, HORIZON = 32, 3


@pytest.fixture(scope="module")
def cheetah_batch():
    env = make_env("HalfCheetah-v5", seed=0)
    collector = Collector(env, policy=None, frames_per_batch=100, total_frames=300)
    buffer = make_replay_buffer(size=1000, batch_size=BATCH_SIZE, slice_len=HORIZON)
    for data in collector:
        buffer.extend(data.reshape(-1))
    collector.shutdown()
    torch.manual_seed(0)
    modules = make_alm_modules(env.observation_spec_unbatched, env.action_spec_unbatched,
                               latent_dim=8, hidden_dim=32, model_hidden_dim=32)
    env.close()
    return modules, sample_slices(buffer, BATCH_SIZE, HORIZON)


def _snapshot(loss: ALMLoss) -> dict[str, torch.Tensor]:
    state = {name: p.detach().clone() for name, p in loss.named_parameters()}
    state.update({name: b.clone() for name, b in loss.named_buffers() if name.startswith("target_")})
    return state


def _changed(before: dict[str, torch.Tensor], loss: ALMLoss) -> set[str]:
    after = _snapshot(loss)
    return {name for name in before if not torch.equal(before[name], after[name])}


def _fresh_loss(modules) -> tuple[ALMLoss, SoftUpdate]:
    loss = ALMLoss(**copy.deepcopy(modules.loss_kwargs()))
    return loss, SoftUpdate(loss, tau=0.005)


@pytest.mark.parametrize("loss_key", list(LOSS_GROUPS))
def test_one_step_of_one_loss_changes_only_its_group(cheetah_batch, loss_key):
    modules, batch = cheetah_batch
    assert batch.shape == (BATCH_SIZE, HORIZON) and batch["observation"].shape[-1] == 17
    loss, _ = _fresh_loss(modules)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    before = _snapshot(loss)
    optimizer.zero_grad(set_to_none=True)
    loss(batch)[loss_key].backward()
    optimizer.step()
    changed = _changed(before, loss)
    group = {name for name in before if name.startswith(LOSS_GROUPS[loss_key])}
    assert changed == group


def test_one_step_of_all_losses_changes_every_parameter_and_targets_only_by_tau(cheetah_batch):
    modules, batch = cheetah_batch
    loss, updater = _fresh_loss(modules)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    before = _snapshot(loss)
    losses = loss(batch)
    optimizer.zero_grad(set_to_none=True)
    total_loss(losses).backward()
    optimizer.step()
    targets = {name for name in before if name.startswith("target_")}
    assert _changed(before, loss) == set(before) - targets
    updater.step()
    assert _changed(before, loss) == set(before)
    for name in ("encoder", "qvalue_network"):
        source = getattr(loss, f"{name}_params").detach()
        target = getattr(loss, f"target_{name}_params")
        for key in target.keys(True, True):
            old = before[f"target_{name}_params." + ".".join(key)]
            torch.testing.assert_close(target[key], old + 0.005 * (source[key] - old))
