"""Shared builders for the ALM tests: tiny networks and synthetic [B, K] slice batches."""
from __future__ import annotations

import os

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import Bounded, Unbounded
from torchrl.objectives import SoftUpdate

from alm_torchrl import make_alm_modules
from alm_torchrl.objectives import ALMLoss
from alm_torchrl.update import OPTIMIZER_GROUPS

# TorchRL's own test suite runs with composite log-prob aggregation off (the 0.14 default).
os.environ.setdefault("COMPOSITE_LP_AGGREGATE", "0")

OBS_DIM, ACT_DIM, LATENT_DIM, HIDDEN_DIM = 5, 2, 4, 16

# Which parameters each loss may train, by the prefix of loss.named_parameters() (the loss's own map).
LOSS_GROUPS = {
    loss_key: tuple(f"{network}_params." for network in networks)
    for loss_key, networks in ALMLoss.LOSS_NETWORKS.items()
}


# Recipe overrides for end-to-end runs that take seconds: tiny networks, short episodes, a short warm-up.
TINY_RECIPE = [
    "compile.compile=false",  # compilation takes a minute; tests/test_fast_update.py and test_recipe.py cover it
    "network.latent_dim=4",
    "network.hidden_dim=16",
    "network.model_hidden_dim=16",
    "optim.batch_size=8",
    "collector.init_random_frames=100",
    "collector.frames_per_batch=10",
    "logger.num_eval_episodes=1",
    "env.max_episode_steps=50",
]


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny networks gain nothing from intra-op threads and the 2-core CI box stalls on them.
    torch.set_num_threads(1)


def action_spec(dim: int = ACT_DIM) -> Bounded:
    return Bounded(-1.0, 1.0, shape=(dim,))


def tiny_modules(num_qvalue_nets: int = 2, **kwargs):
    kwargs = {"latent_dim": LATENT_DIM, "hidden_dim": HIDDEN_DIM, "model_hidden_dim": HIDDEN_DIM, **kwargs}
    return make_alm_modules(
        Unbounded(shape=(OBS_DIM,)), action_spec(), num_qvalue_nets=num_qvalue_nets, **kwargs
    )


def tiny_loss(num_qvalue_nets: int = 2, seed: int = 0, **loss_kwargs) -> ALMLoss:
    torch.manual_seed(seed)
    modules = tiny_modules(num_qvalue_nets)
    return ALMLoss(**modules.loss_kwargs(), **loss_kwargs)


def slice_batch(batch_size: int = 8, horizon: int = 3, seed: int = 1, terminal_every: int = 3) -> TensorDict:
    """A random [B, K] batch; every ``terminal_every``-th slice ends on a terminal."""
    generator = torch.Generator().manual_seed(seed)
    terminated = torch.zeros(batch_size, horizon, 1, dtype=torch.bool)
    terminated[::terminal_every, -1] = True
    return TensorDict(
        {
            "observation": torch.randn(batch_size, horizon, OBS_DIM, generator=generator),
            "action": torch.rand(batch_size, horizon, ACT_DIM, generator=generator) * 2 - 1,
            "next": {
                "observation": torch.randn(batch_size, horizon, OBS_DIM, generator=generator),
                "reward": torch.randn(batch_size, horizon, 1, generator=generator),
                "terminated": terminated,
                "done": terminated.clone(),
            },
        },
        batch_size=[batch_size, horizon],
    )


def total_loss(losses: TensorDict) -> torch.Tensor:
    return sum(value for key, value in losses.items() if key.startswith("loss_"))


def fixed_policy(env) -> TensorDictModule:
    """A deterministic policy that differs from state to state, so that Hopper's episodes end at different steps."""
    obs_dim = env.observation_spec["observation"].shape[-1]
    act_dim = env.action_spec.shape[-1]
    weight = torch.randn(obs_dim, act_dim, generator=torch.Generator().manual_seed(0))
    return TensorDictModule(lambda obs: torch.tanh(obs @ weight), in_keys=["observation"], out_keys=["action"])


# The straightforward update that the fast one (alm_torchrl.update.make_update) must reproduce exactly.
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
    for loss_name in LOSS_TO_OPTIMIZER:
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


def reference_pair(deactivate_vmap: bool = False, device: str | torch.device = "cpu"):
    """Two losses with the same weights on ``device``: (reference, its four plain Adams, the one to test)."""
    reference = tiny_loss(seed=3).to(device)
    fast = tiny_loss(seed=3, deactivate_vmap=deactivate_vmap).to(device)
    optimizers = {
        group: torch.optim.Adam(_group_params(reference, group), lr=LR, foreach=False) for group in OPTIMIZER_GROUPS
    }
    return reference, optimizers, fast


def assert_same_state(reference, fast) -> None:
    fast_state = fast.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(
            fast_state[name], value, rtol=1e-5, atol=1e-6, msg=lambda message, name=name: f"{name}: {message}"
        )
