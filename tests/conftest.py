"""Shared builders for the ALM tests: tiny networks and synthetic [B, K] slice batches."""
from __future__ import annotations

import os

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import Bounded, Unbounded

from alm_torchrl import make_alm_modules
from alm_torchrl.objectives import ALMLoss

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
