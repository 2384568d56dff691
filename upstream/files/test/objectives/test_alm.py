# Copyright (c) Meta Platforms, Inc. and affiliates.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import pickle

import pytest
import torch
from _objectives_common import (
    _check_td_steady,
    _has_functorch,
    FUNCTORCH_ERR,
    LossModuleTestBase,
)

from tensordict import assert_allclose_td, TensorDict
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule as ProbMod,
    ProbabilisticTensorDictSequential as ProbSeq,
    TensorDictModule as Mod,
)
from torch import nn

from torchrl._utils import rl_warnings
from torchrl.data import (
    Bounded,
    LazyTensorStorage,
    PrioritizedSliceSampler,
    TensorDictReplayBuffer,
    Unbounded,
)
from torchrl.modules import Actor, IndependentNormal, ValueOperator
from torchrl.objectives import ALMLoss
from torchrl.objectives.utils import SoftUpdate, ValueEstimators
from torchrl.objectives.value import TD0Estimator
from torchrl.testing import get_default_devices

# Warnings are errors (pytestmark in test/objectives/conftest.py does not reach the
# test modules: pytest reads pytestmark from test modules only). pytest>=9 warns about
# the class-scoped fixture of LossModuleTestBase.
pytestmark = [
    pytest.mark.filterwarnings("error"),
    pytest.mark.filterwarnings(
        "ignore:Class-scoped fixtures defined as instance methods are deprecated"
    ),
]

# The public method computing each loss term: "loss_model" -> "model_loss".
LOSS_METHODS = {key: f"{key[len('loss_'):]}_loss" for key in ALMLoss.LOSS_NETWORKS}
TRAJ_KEY = ("collector", "traj_ids")


def _has_segment_trees():
    # Prioritized samplers need torchrl's C++ segment trees.
    try:
        PrioritizedSliceSampler(max_capacity=2, alpha=1.0, beta=1.0, slice_len=1)
    except RuntimeError:
        return False
    return True


_has_prioritized_samplers = _has_segment_trees()


def _suffix(key, suffix):
    """``"latent"`` -> ``"latent_loc"``; ``("z", "latent")`` -> ``("z", "latent_loc")``."""
    if isinstance(key, str):
        return f"{key}_{suffix}"
    return (*key[:-1], f"{key[-1]}_{suffix}")


class _NormalParams(nn.Module):
    """Concatenates its inputs and maps them to the loc and scale of a Normal."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, *inputs):
        loc, scale = self.linear(torch.cat(inputs, -1)).chunk(2, -1)
        return loc, nn.functional.softplus(scale) + 0.1


class _CatMLP(nn.Module):
    """Concatenates its inputs and applies Linear, Tanh, Dropout, Linear."""

    def __init__(self, in_features, out_features, num_cells=8, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, num_cells),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(num_cells, out_features),
        )

    def forward(self, *inputs):
        return self.net(torch.cat(inputs, -1))


class _TanhMeanAndStd(nn.Module):
    """A tanh mean and a std in [0.1, 1] (an actor that learns its noise)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, latent):
        mean, std = self.linear(latent).chunk(2, -1)
        return mean.tanh(), 0.1 + 0.9 * std.sigmoid()


@pytest.mark.skipif(
    not _has_functorch, reason=f"functorch not installed: {FUNCTORCH_ERR}"
)
class TestALM(LossModuleTestBase):
    seed = 0
    obs_dim = 3
    action_dim = 2
    latent_dim = 4

    def _create_mock_encoder(
        self,
        device="cpu",
        observation_key="observation",
        latent_key="latent",
        observation_shape=None,
    ):
        # observation_shape: observations with several feature dims (e.g. [C, H, W]
        # images), flattened by the encoder.
        if observation_shape is None:
            params = _NormalParams(self.obs_dim, self.latent_dim)
        else:
            params = nn.Sequential(
                nn.Flatten(-len(observation_shape)),
                _NormalParams(math.prod(observation_shape), self.latent_dim),
            )
        return ProbSeq(
            Mod(
                params,
                in_keys=[observation_key],
                out_keys=[_suffix(latent_key, "loc"), _suffix(latent_key, "scale")],
            ),
            ProbMod(
                in_keys={
                    "loc": _suffix(latent_key, "loc"),
                    "scale": _suffix(latent_key, "scale"),
                },
                out_keys=[latent_key],
                distribution_class=IndependentNormal,
                default_interaction_type=InteractionType.RANDOM,
            ),
        ).to(device)

    def _create_mock_world_model(
        self,
        device="cpu",
        latent_key="latent",
        action_key="action",
        next_latent_key="next_latent",
        latent_dim=None,
    ):
        latent_dim = self.latent_dim if latent_dim is None else latent_dim
        return ProbSeq(
            Mod(
                _NormalParams(self.latent_dim + self.action_dim, latent_dim),
                in_keys=[latent_key, action_key],
                out_keys=[
                    _suffix(next_latent_key, "loc"),
                    _suffix(next_latent_key, "scale"),
                ],
            ),
            ProbMod(
                in_keys={
                    "loc": _suffix(next_latent_key, "loc"),
                    "scale": _suffix(next_latent_key, "scale"),
                },
                out_keys=[next_latent_key],
                distribution_class=IndependentNormal,
                default_interaction_type=InteractionType.RANDOM,
            ),
        ).to(device)

    def _create_mock_reward_model(
        self,
        device="cpu",
        latent_key="latent",
        action_key="action",
        out_key="predicted_reward",
    ):
        return Mod(
            _CatMLP(self.latent_dim + self.action_dim, 1),
            in_keys=[latent_key, action_key],
            out_keys=[out_key],
        ).to(device)

    def _create_mock_classifier(
        self,
        device="cpu",
        latent_key="latent",
        action_key="action",
        next_latent_key="next_latent",
        out_key="classifier_logits",
    ):
        return Mod(
            _CatMLP(2 * self.latent_dim + self.action_dim, 2),
            in_keys=[latent_key, action_key, next_latent_key],
            out_keys=[out_key],
        ).to(device)

    def _create_mock_qvalue(
        self,
        device="cpu",
        latent_key="latent",
        action_key="action",
        out_key="state_action_value",
        dropout=0.0,
    ):
        return ValueOperator(
            _CatMLP(self.latent_dim + self.action_dim, 1, dropout=dropout),
            in_keys=[latent_key, action_key],
            out_keys=[out_key],
        ).to(device)

    def _create_mock_actor(
        self,
        device="cpu",
        latent_key="latent",
        action_key="action",
        action_std_key=None,
    ):
        spec = Bounded(-1.0, 1.0, shape=(self.action_dim,), device=device)
        if action_std_key is not None:
            return Actor(
                _TanhMeanAndStd(self.latent_dim, self.action_dim),
                in_keys=[latent_key],
                out_keys=[action_key, action_std_key],
                spec=spec,
            ).to(device)
        return Actor(
            nn.Sequential(nn.Linear(self.latent_dim, self.action_dim), nn.Tanh()),
            in_keys=[latent_key],
            out_keys=[action_key],
            spec=spec,
        ).to(device)

    def _create_mock_networks(
        self,
        device="cpu",
        num_qvalue_nets=2,
        qvalue_as_list=True,
        dropout=0.0,
        learned_std=False,
        keys=None,
    ):
        """The six networks of ALMLoss, reading and writing the entries of ``keys``."""
        keys = {} if keys is None else keys
        latent = keys.get("latent", "latent")
        next_latent = keys.get("next_latent", "next_latent")
        action = keys.get("action", "action")
        qvalue_kwargs = {
            "device": device,
            "latent_key": latent,
            "action_key": action,
            "out_key": keys.get("state_action_value", "state_action_value"),
            "dropout": dropout,
        }
        if qvalue_as_list:
            qvalue_network = [
                self._create_mock_qvalue(**qvalue_kwargs)
                for _ in range(num_qvalue_nets)
            ]
        else:
            qvalue_network = self._create_mock_qvalue(**qvalue_kwargs)
        return {
            "encoder": self._create_mock_encoder(
                device,
                observation_key=keys.get("observation", "observation"),
                latent_key=latent,
            ),
            "world_model": self._create_mock_world_model(
                device,
                latent_key=latent,
                action_key=action,
                next_latent_key=next_latent,
            ),
            "reward_model": self._create_mock_reward_model(
                device,
                latent_key=latent,
                action_key=action,
                out_key=keys.get("predicted_reward", "predicted_reward"),
            ),
            "classifier": self._create_mock_classifier(
                device,
                latent_key=latent,
                action_key=action,
                next_latent_key=next_latent,
                out_key=keys.get("classifier_logits", "classifier_logits"),
            ),
            "qvalue_network": qvalue_network,
            "actor_network": self._create_mock_actor(
                device,
                latent_key=latent,
                action_key=action,
                action_std_key=(
                    keys.get("action_std", "action_std") if learned_std else None
                ),
            ),
        }

    def _create_mock_alm(
        self,
        device="cpu",
        num_qvalue_nets=2,
        qvalue_as_list=True,
        dropout=0.0,
        learned_std=False,
        keys=None,
        networks=None,
        target_updater=True,
        **kwargs,
    ):
        if networks is None:
            networks = self._create_mock_networks(
                device,
                num_qvalue_nets=num_qvalue_nets,
                qvalue_as_list=qvalue_as_list,
                dropout=dropout,
                learned_std=learned_std,
                keys=keys,
            )
        if not qvalue_as_list:
            kwargs["num_qvalue_nets"] = num_qvalue_nets
        loss_fn = ALMLoss(**networks, **kwargs)
        if keys:
            loss_fn.set_keys(**keys)
        loss_fn.make_value_estimator(gamma=0.9)
        if target_updater:
            SoftUpdate(loss_fn, tau=0.05)
        return loss_fn

    def _create_mock_data_alm(
        self,
        batch=8,
        T=3,
        device="cpu",
        observation_key="observation",
        action_key="action",
        reward_key="reward",
        done_key="done",
        terminated_key="terminated",
    ):
        # [batch, T] slices of T consecutive transitions.
        total_obs = torch.randn(batch, T + 1, self.obs_dim, device=device)
        action = torch.rand(batch, T, self.action_dim, device=device) * 2 - 1
        reward = torch.randn(batch, T, 1, device=device)
        done = torch.zeros(batch, T, 1, dtype=torch.bool, device=device)
        terminated = torch.zeros(batch, T, 1, dtype=torch.bool, device=device)
        # One slice ends on a terminal state: no bootstrap there.
        done[0, -1] = terminated[0, -1] = True
        td = TensorDict(
            {
                observation_key: total_obs[:, :T],
                action_key: action,
                "next": {
                    observation_key: total_obs[:, 1:],
                    reward_key: reward,
                    done_key: done,
                    terminated_key: terminated,
                },
            },
            batch_size=[batch, T],
            names=[None, "time"],
            device=device,
        )
        return td

    @staticmethod
    def _loss_keys(loss_td):
        return [key for key in loss_td.keys() if key.startswith("loss_")]

    def _assert_routing(self, loss_fn, loss_key):
        """Only the networks of ``loss_key`` got a gradient, every one of their tensors did."""
        own = ALMLoss.LOSS_NETWORKS[loss_key]
        all_networks = {
            name for names in ALMLoss.LOSS_NETWORKS.values() for name in names
        }
        for network in sorted(all_networks):
            params = getattr(loss_fn, f"{network}_params").values(True, True)
            if network in own:
                assert not any(
                    (p.grad is None) or (p.grad == 0).all() for p in params
                ), f"{loss_key} does not reach every parameter of {network}"
            else:
                assert all(
                    (p.grad is None) or (p.grad == 0).all() for p in params
                ), f"{loss_key} leaks a gradient into {network}"
        for name, buffer in loss_fn.named_buffers():
            if name.startswith("target_"):
                assert buffer.grad is None and not buffer.requires_grad, name

    def test_reset_parameters_recursive(self):
        loss_fn = self._create_mock_alm(num_qvalue_nets=2)
        self.reset_parameters_recursive_test(loss_fn)

    @pytest.mark.parametrize("device", get_default_devices())
    @pytest.mark.parametrize("num_qvalue_nets", [1, 2, 3])
    @pytest.mark.parametrize("qvalue_as_list", [True, False])
    @pytest.mark.parametrize("actor_objective", ["svg", "td3"])
    @pytest.mark.parametrize("dropout", [0.0, 0.1])
    def test_alm(
        self, device, num_qvalue_nets, qvalue_as_list, actor_objective, dropout
    ):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm(
            device,
            num_qvalue_nets=num_qvalue_nets,
            qvalue_as_list=qvalue_as_list,
            dropout=dropout,
            actor_objective=actor_objective,
        )
        td = self._create_mock_data_alm(device=device)
        with _check_td_steady(td):
            loss = loss_fn(td)

        assert set(loss.keys()) == set(loss_fn.out_keys)
        assert set(self._loss_keys(loss)) == set(ALMLoss.LOSS_NETWORKS)
        for key, value in loss.items():
            assert value.shape == torch.Size([]), key
            assert torch.isfinite(value), key
            assert value.requires_grad == key.startswith("loss_"), key
        assert loss_fn.tensor_keys.priority in td.keys()

        registered = {id(p) for p in loss_fn.parameters()}
        for network in ALMLoss.LOSS_NETWORKS.values():
            for name in network:
                params = getattr(loss_fn, f"{name}_params").values(True, True)
                assert all(id(p) in registered for p in params), (
                    f"{name}_params holds tensors that are not parameters of the loss: "
                    "an optimizer over loss.parameters() would not train them"
                )
        for p in loss_fn.parameters():
            assert p.grad is None
        # check that the losses are independent
        for key in self._loss_keys(loss):
            loss[key].backward(retain_graph=True)
            self._assert_routing(loss_fn, key)
            loss_fn.zero_grad()

        sum(loss[key] for key in self._loss_keys(loss)).backward()
        named_parameters = list(loss_fn.named_parameters())
        named_buffers = list(loss_fn.named_buffers())
        assert len({p for n, p in named_parameters}) == len(named_parameters)
        assert len({p for n, p in named_buffers}) == len(named_buffers)
        for name, p in named_parameters:
            assert not name.startswith("target_"), name
            assert (
                p.grad is not None and p.grad.norm() > 0.0
            ), f"parameter {name} (shape: {p.shape}) has a null gradient"
        for name, p in named_buffers:
            if name.startswith("target_"):
                assert p.grad is None, f"target buffer {name} has a gradient"

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"kl_term": False},
            {"value_term": False},
            {"classifier_coef": 0.0},
            {"log_reward_shift": 10.0},
            {"lmbda": 0.0},
            {"lmbda": 1.0},
            {"noise_clip": None},
            {"entropy_coef": 0.1},
        ],
        ids=lambda kwargs: "-".join(f"{k}={v}" for k, v in kwargs.items()),
    )
    def test_alm_options(self, kwargs):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm(learned_std="entropy_coef" in kwargs, **kwargs)
        td = self._create_mock_data_alm()
        loss = loss_fn(td)
        assert set(loss.keys()) == set(loss_fn.out_keys)
        for key, value in loss.items():
            assert torch.isfinite(value), key
        for key in self._loss_keys(loss):
            loss[key].backward(retain_graph=True)
            self._assert_routing(loss_fn, key)
            loss_fn.zero_grad()

    def test_alm_entropy_needs_learned_std(self):
        loss_fn = self._create_mock_alm(entropy_coef=0.1)
        with pytest.raises(ValueError, match="action_std"):
            loss_fn(self._create_mock_data_alm())

    @pytest.mark.parametrize("td_est", list(ValueEstimators) + [None])
    def test_alm_value_estimators(self, td_est):
        loss_fn = self._create_mock_alm()
        if td_est not in (ValueEstimators.TD0, None):
            with pytest.raises(NotImplementedError):
                loss_fn.make_value_estimator(td_est)
            return
        loss_fn.make_value_estimator(td_est, gamma=0.5)
        assert loss_fn.value_estimator.gamma == 0.5
        loss = loss_fn(self._create_mock_data_alm())
        assert all(torch.isfinite(value) for value in loss.values())

    def test_alm_value_estimator_instance(self):
        td = self._create_mock_data_alm()
        losses = []
        for estimator in (TD0Estimator(gamma=0.5, value_network=None), None):
            torch.manual_seed(self.seed)
            loss_fn = self._create_mock_alm()
            if estimator is None:
                loss_fn.make_value_estimator(gamma=0.5)
            else:
                # the loss's keys are forwarded to the estimator
                loss_fn.make_value_estimator(estimator)
            torch.manual_seed(1)
            losses.append(loss_fn(td.clone())["loss_qvalue"])
        torch.testing.assert_close(losses[0], losses[1])

    def test_alm_networks_keep_their_parameters_hooks_and_modes(self):
        networks = self._create_mock_networks()
        loss_fn = self._create_mock_alm(networks=networks)
        own = {
            name: list(network.parameters())
            for name, network in networks.items()
            if isinstance(network, nn.Module)
        }
        td = self._create_mock_data_alm()
        loss_fn(td.clone())
        # the networks hold their own parameters after a call
        for name, network in networks.items():
            if name in own:
                assert all(a is b for a, b in zip(network.parameters(), own[name]))
        # a hook registered or a mode set after the first call takes effect
        modes = []
        networks["reward_model"].register_forward_hook(
            lambda module, args, output: modes.append(module.training)
        )
        loss_fn(td.clone())
        networks["reward_model"].eval()
        loss_fn(td.clone())
        assert modes and True in modes and modes[-1] is False

    def test_alm_pickle_and_deepcopy(self):
        loss_fn = self._create_mock_alm()
        td = self._create_mock_data_alm()
        loss_fn(td.clone())
        for copied in (pickle.loads(pickle.dumps(loss_fn)), copy.deepcopy(loss_fn)):
            torch.manual_seed(1)
            loss = loss_fn(td.clone())
            torch.manual_seed(1)
            assert_allclose_td(loss, copied(td.clone()))
            # the copy's vmapped critics call its own module
            assert copied._vmap_qvalue_networkN0 is not loss_fn._vmap_qvalue_networkN0

    def test_alm_cast_after_call(self):
        # a list of critics gives locked parameters: their detached copies must follow a cast
        loss_fn = self._create_mock_alm(qvalue_as_list=True)
        td = self._create_mock_data_alm()
        loss_fn(td.clone())
        loss_fn = loss_fn.double()
        td = td.apply(lambda x: x.double() if x.is_floating_point() else x)
        loss = loss_fn(td)
        assert all(loss[key].dtype == torch.float64 for key in LOSS_METHODS)

    @pytest.mark.parametrize("device", get_default_devices())
    @pytest.mark.parametrize("num_qvalue_nets", [1, 2])
    def test_alm_deactivate_vmap(self, device, num_qvalue_nets):
        torch.manual_seed(self.seed)
        networks = self._create_mock_networks(device, num_qvalue_nets=num_qvalue_nets)
        td = self._create_mock_data_alm(device=device)
        outputs, priorities = [], []
        for deactivate_vmap in (False, True):
            loss_fn = self._create_mock_alm(
                networks=networks, deactivate_vmap=deactivate_vmap
            )
            data = td.clone()
            torch.manual_seed(1)
            outputs.append(loss_fn(data))
            priorities.append(data.get(loss_fn.tensor_keys.priority))
        assert_allclose_td(outputs[0], outputs[1])
        torch.testing.assert_close(priorities[0], priorities[1])

    @pytest.mark.parametrize("device", get_default_devices())
    def test_alm_state_dict(self, device):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm(device, target_updater=False)
        updater = SoftUpdate(loss_fn, tau=0.5)
        with torch.no_grad():
            for p in loss_fn.parameters():
                p.add_(torch.randn_like(p))
        updater.step()  # the targets now differ from the parameters and the init
        loss_fn.actor_std = 0.3
        state_dict = loss_fn.state_dict()

        loss_fn2 = self._create_mock_alm(device)
        loss_fn2.load_state_dict(state_dict)
        assert state_dict.keys() == loss_fn2.state_dict().keys()
        for key, value in loss_fn2.state_dict().items():
            torch.testing.assert_close(value, state_dict[key], msg=key)

        td = self._create_mock_data_alm(device=device)
        torch.manual_seed(1)
        loss = loss_fn(td.clone())
        torch.manual_seed(1)
        loss2 = loss_fn2(td.clone())
        assert_allclose_td(loss, loss2)

    @pytest.mark.parametrize("device", get_default_devices())
    @pytest.mark.parametrize("loss_key", list(LOSS_METHODS))
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_alm_separate_losses(self, device, loss_key, reduction):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm(device, reduction=reduction)
        td = self._create_mock_data_alm(device=device)
        with _check_td_steady(td):
            value, metadata = getattr(loss_fn, LOSS_METHODS[loss_key])(td)
        if reduction == "none":
            assert value.shape == td.shape[:1]
        else:
            assert value.shape == torch.Size([])
        assert torch.isfinite(value).all()
        assert value.requires_grad
        for key, item in metadata.items():
            assert not item.requires_grad, key
        value.sum().backward()
        self._assert_routing(loss_fn, loss_key)

    def test_alm_sample_action(self):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm(actor_std=10.0, noise_clip=None)
        latent = torch.randn(64, self.latent_dim)
        action = loss_fn.sample_action(latent)
        assert action.shape == (64, self.action_dim)
        # clamped into the bounds, the gradient passing as if unclamped
        assert (action.abs() < 1).all()
        action.sum().backward()
        self._assert_routing(loss_fn, "loss_actor")

    @pytest.mark.parametrize("sample", [True, False])
    def test_alm_imagine(self, sample):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm()
        keys = loss_fn.tensor_keys
        batch, horizon = 5, 4
        latent = torch.randn(batch, self.latent_dim)
        rollout = loss_fn.imagine(
            latent, horizon, sample_actions=sample, sample_latents=sample
        )
        assert rollout.batch_size == (batch, horizon + 1)
        latents, actions = rollout.get(keys.latent), rollout.get(keys.action)
        assert latents.shape == (batch, horizon + 1, self.latent_dim)
        assert actions.shape == (batch, horizon + 1, self.action_dim)
        torch.testing.assert_close(latents[:, 0], latent)
        if not sample:
            rollout2 = loss_fn.imagine(
                latent, horizon, sample_actions=False, sample_latents=False
            )
            assert_allclose_td(rollout.detach(), rollout2.detach())
        # the last latent reaches the actor through the frozen world model
        latents[:, -1].sum().backward()
        self._assert_routing(loss_fn, "loss_actor")

    def test_alm_lower_bound(self):
        torch.manual_seed(self.seed)
        classifier_coef = 0.5
        loss_fn = self._create_mock_alm(classifier_coef=classifier_coef)
        observation = torch.randn(6, self.obs_dim)
        lower_bound = loss_fn.lower_bound(observation, horizon=3)
        assert lower_bound.shape == (6,)
        assert not lower_bound.requires_grad
        assert torch.isfinite(lower_bound).all()
        # means, not samples, by default
        torch.testing.assert_close(
            lower_bound, loss_fn.lower_bound(observation, horizon=3)
        )
        # with gamma ~ 0, only the first step's reward and classifier terms count
        loss_fn.make_value_estimator(gamma=1e-8)
        with torch.no_grad():
            td = TensorDict({"observation": observation}, [6])
            td["latent"] = loss_fn.encoder.get_dist(td).mean
            td = loss_fn.actor_network(td)
            td["next_latent"] = loss_fn.world_model.get_dist(td).mean
            reward = loss_fn.reward_model(td)["predicted_reward"]
            logits = loss_fn.classifier(td)["classifier_logits"]
        expected = reward + classifier_coef * (logits[..., 1:] - logits[..., :1])
        torch.testing.assert_close(
            loss_fn.lower_bound(observation, horizon=1), expected.squeeze(-1)
        )

    def test_alm_tensordict_keys(self):
        loss_fn = self._create_mock_alm()
        default_keys = {
            "observation": "observation",
            "action": "action",
            "reward": "reward",
            "done": "done",
            "terminated": "terminated",
            "latent": "latent",
            "next_latent": "next_latent",
            "predicted_reward": "predicted_reward",
            "classifier_logits": "classifier_logits",
            "state_action_value": "state_action_value",
            "priority": "td_error",
            "priority_weight": "priority_weight",
            "action_std": "action_std",
        }
        self.tensordict_keys_test(loss_fn, default_keys=default_keys)

        key_mapping = {
            "state_action_value": ("value", "state_action_value_test"),
            "reward": ("reward", "reward_test"),
            "done": ("done", ("done", "test")),
            "terminated": ("terminated", ("terminated", "test")),
        }
        self.set_advantage_keys_through_loss_test(
            loss_fn, ValueEstimators.TD0, key_mapping
        )

    def test_alm_nested_keys(self):
        torch.manual_seed(self.seed)
        keys = {
            "observation": ("agent", "observation"),
            "action": ("agent", "action"),
            "reward": ("agent", "reward"),
            "done": ("agent", "done"),
            "terminated": ("agent", "terminated"),
            "latent": ("agent", "latent"),
            "next_latent": ("model", "next_latent"),
            "predicted_reward": ("model", "reward"),
            "classifier_logits": ("model", "logits"),
            "state_action_value": ("agent", "state_action_value"),
            "priority": ("priority", "td_error"),
            # LossModule._maybe_get_priority_weight looks the weights up in
            # tensordict.keys(), without nested keys
            "priority_weight": "sample_weight",
        }
        loss_fn = self._create_mock_alm(keys=keys)
        td = self._create_mock_data_alm(
            observation_key=keys["observation"],
            action_key=keys["action"],
            reward_key=keys["reward"],
            done_key=keys["done"],
            terminated_key=keys["terminated"],
        )
        for key in loss_fn.in_keys:
            assert key in td.keys(True, True), key
        td.set(keys["priority_weight"], torch.rand(td.shape))
        with _check_td_steady(td):
            loss = loss_fn(td)
        assert set(loss.keys()) == set(loss_fn.out_keys)
        assert all(torch.isfinite(value) for value in loss.values())
        assert td.get(keys["priority"]).shape == td.shape
        for key in self._loss_keys(loss):
            loss[key].backward(retain_graph=True)
            self._assert_routing(loss_fn, key)
            loss_fn.zero_grad()

    def test_alm_image_observations(self):
        # The loss reads observations of any shape: here [B, T, C, H, W] images
        # under "pixels", for an encoder that flattens them.
        torch.manual_seed(self.seed)
        image_shape = (2, 4, 5)
        networks = self._create_mock_networks()
        networks["encoder"] = self._create_mock_encoder(
            observation_key="pixels", observation_shape=image_shape
        )
        loss_fn = self._create_mock_alm(
            networks=networks, keys={"observation": "pixels"}
        )
        td = self._create_mock_data_alm(observation_key="pixels")
        for key in ("pixels", ("next", "pixels")):
            td.set(key, torch.randn(*td.shape, *image_shape))
        loss = loss_fn(td)
        assert all(torch.isfinite(value) for value in loss.values())
        for key in self._loss_keys(loss):
            loss[key].backward(retain_graph=True)
            self._assert_routing(loss_fn, key)
            loss_fn.zero_grad()
        assert loss_fn.lower_bound(td["pixels"][:, 0]).shape == td.shape[:1]
        assert loss_fn.lower_bound(td["pixels"]).shape == td.shape

    @pytest.mark.parametrize(
        "kwargs,error,match",
        [
            ({"gamma": 0.9}, TypeError, None),
            ({"reduction": "max"}, ValueError, "reduction"),
            ({"lmbda": 1.5}, ValueError, "lmbda"),
            ({"actor_objective": "ppo"}, ValueError, "actor_objective"),
            ({"log_reward_shift": 0.0}, ValueError, "log_reward_shift"),
            ({"entropy_coef": -1.0}, ValueError, "entropy_coef"),
            ({"noise_clip": -0.1}, ValueError, "noise_clip"),
            ({"num_qvalue_nets": 0, "qvalue_as_list": False}, ValueError, None),
            ({"num_qvalue_nets": 0}, ValueError, None),
            ({"num_qvalue_nets": 2.5, "qvalue_as_list": False}, ValueError, "integer"),
            ({"lmbda": torch.tensor([0.5, 0.5])}, ValueError, "lmbda"),
        ],
    )
    def test_alm_constructor_errors(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            self._create_mock_alm(target_updater=False, **kwargs)

    def test_alm_constructor_network_errors(self):
        networks = self._create_mock_networks()
        # the encoder must give a distribution
        with pytest.raises(TypeError, match="encoder"):
            ALMLoss(**{**networks, "encoder": networks["reward_model"]})
        # the action bounds come from the actor or from action_spec
        unbounded_actor = Actor(
            nn.Linear(self.latent_dim, self.action_dim), in_keys=["latent"]
        )
        with pytest.raises(ValueError, match="Bounded"):
            ALMLoss(**{**networks, "actor_network": unbounded_actor})
        with pytest.raises(ValueError, match="Bounded"):
            ALMLoss(**networks, action_spec=Unbounded(shape=(self.action_dim,)))
        spec = Bounded(-2.0, 2.0, shape=(self.action_dim,))
        loss_fn = ALMLoss(
            **{**networks, "actor_network": unbounded_actor}, action_spec=spec
        )
        torch.testing.assert_close(loss_fn.action_high, spec.space.high)

    def test_alm_input_errors(self):
        loss_fn = self._create_mock_alm()
        td = self._create_mock_data_alm()
        with pytest.raises(ValueError, match=r"\[B, K\]"):
            loss_fn(td[:, 0])
        with pytest.raises(KeyError, match="reward"):
            loss_fn(td.exclude(("next", "reward")))
        with pytest.raises(ValueError, match=r"\[B, K, 1\]"):
            loss_fn(
                td.clone().set(
                    ("next", "reward"), td.get(("next", "reward")).squeeze(-1)
                )
            )
        networks = self._create_mock_networks()
        networks["world_model"] = self._create_mock_world_model(
            latent_dim=self.latent_dim + 1
        )
        loss_fn = self._create_mock_alm(networks=networks)
        with pytest.raises(ValueError, match="atent"):
            loss_fn(td)

    @pytest.mark.parametrize("observation_key", ["observation", "observation2"])
    @pytest.mark.parametrize("reward_key", ["reward", "reward2"])
    @pytest.mark.parametrize("done_key", ["done", "done2"])
    @pytest.mark.parametrize("terminated_key", ["terminated", "terminated2"])
    def test_alm_notensordict(
        self, observation_key, reward_key, done_key, terminated_key
    ):
        torch.manual_seed(self.seed)
        keys = {
            "observation": observation_key,
            "reward": reward_key,
            "done": done_key,
            "terminated": terminated_key,
        }
        loss_fn = self._create_mock_alm(keys=keys)
        td = self._create_mock_data_alm(
            observation_key=observation_key,
            reward_key=reward_key,
            done_key=done_key,
            terminated_key=terminated_key,
        )
        kwargs = {
            observation_key: td.get(observation_key),
            "action": td.get("action"),
            f"next_{observation_key}": td.get(("next", observation_key)),
            f"next_{reward_key}": td.get(("next", reward_key)),
            f"next_{done_key}": td.get(("next", done_key)),
            f"next_{terminated_key}": td.get(("next", terminated_key)),
        }
        td = TensorDict(kwargs, td.batch_size).unflatten_keys("_")

        torch.manual_seed(0)
        loss_val_td = loss_fn(td)
        torch.manual_seed(0)
        loss_val = loss_fn(**kwargs)
        assert len(loss_val) == len(loss_fn.out_keys)
        loss_val_reconstruct = TensorDict(dict(zip(loss_fn.out_keys, loss_val)), [])
        assert_allclose_td(loss_val_reconstruct, loss_val_td)

        # test select
        loss_fn.select_out_keys("loss_actor", "loss_qvalue")
        torch.manual_seed(0)
        loss_actor, loss_qvalue = loss_fn(**kwargs)
        torch.testing.assert_close(loss_actor, loss_val_td["loss_actor"])
        torch.testing.assert_close(loss_qvalue, loss_val_td["loss_qvalue"])

    @pytest.mark.parametrize("reduction", [None, "none", "mean", "sum"])
    def test_alm_reduction(self, reduction):
        torch.manual_seed(self.seed)
        device = (
            torch.device("cpu")
            if torch.cuda.device_count() == 0
            else torch.device("cuda")
        )
        loss_fn = self._create_mock_alm(device, reduction=reduction)
        td = self._create_mock_data_alm(device=device)
        loss = loss_fn(td)
        for key in self._loss_keys(loss):
            if reduction == "none":
                # one entry per slice
                assert loss[key].shape == td.shape[:1], key
            else:
                assert loss[key].shape == torch.Size([]), key

    def test_alm_reduction_consistency(self):
        torch.manual_seed(self.seed)
        networks = self._create_mock_networks()
        td = self._create_mock_data_alm()
        losses = {}
        for reduction in ("none", "mean", "sum"):
            loss_fn = self._create_mock_alm(networks=networks, reduction=reduction)
            torch.manual_seed(1)
            losses[reduction] = loss_fn(td.clone())
        for key in self._loss_keys(losses["none"]):
            per_slice = losses["none"][key]
            torch.testing.assert_close(per_slice.mean(), losses["mean"][key])
            torch.testing.assert_close(per_slice.sum(), losses["sum"][key])

    @pytest.mark.parametrize("num_qvalue_nets", [1, 2])
    def test_alm_priority(self, num_qvalue_nets):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm(
            num_qvalue_nets=num_qvalue_nets, reduction="none"
        )
        td = self._create_mock_data_alm()
        loss = loss_fn(td)
        priority = td.get(loss_fn.tensor_keys.priority)
        assert priority.shape == td.shape
        assert not priority.requires_grad
        assert (priority >= 0).all()
        # one priority per slice, on each of its transitions
        assert (priority == priority[:, :1]).all()
        # As TD3Loss: the priority is the largest squared TD error of the critics at
        # the slice's first transition; loss_qvalue is their mean
        td_error = priority[:, 0]
        loss_qvalue = loss["loss_qvalue"].detach()
        if num_qvalue_nets == 1:
            torch.testing.assert_close(td_error, loss_qvalue)
        else:
            assert (td_error >= loss_qvalue - 1e-6).all()
            assert (td_error <= num_qvalue_nets * loss_qvalue + 1e-6).all()
            assert (td_error > loss_qvalue + 1e-6).any()

    def test_alm_prioritized_weights(self):
        torch.manual_seed(self.seed)
        networks = self._create_mock_networks()
        td = self._create_mock_data_alm()
        weights = torch.rand(td.shape) + 0.5
        losses = {}
        for name, data in (
            ("unweighted", td.clone()),
            ("weighted", td.clone().set("priority_weight", weights)),
            # only the weight of each slice's first transition counts
            (
                "first_step",
                td.clone().set(
                    "priority_weight", weights[:, :1].expand(td.shape).clone()
                ),
            ),
        ):
            loss_fn = self._create_mock_alm(networks=networks, reduction="none")
            torch.manual_seed(1)
            losses[name] = loss_fn(data)
        for key in self._loss_keys(losses["unweighted"]):
            torch.testing.assert_close(
                losses["weighted"][key], losses["unweighted"][key] * weights[:, 0]
            )
            torch.testing.assert_close(
                losses["first_step"][key], losses["weighted"][key]
            )

        loss_fn = self._create_mock_alm(networks=networks)
        loss_fn.use_prioritized_weights = False
        torch.manual_seed(1)
        loss_no_weights = loss_fn(td.clone().set("priority_weight", weights))
        torch.manual_seed(1)
        assert_allclose_td(loss_no_weights, loss_fn(td.clone()))

    @pytest.mark.skipif(
        not _has_prioritized_samplers,
        reason="torchrl's C++ segment trees are not available",
    )
    def test_alm_prioritized_slice_sampler(self):
        torch.manual_seed(self.seed)
        loss_fn = self._create_mock_alm()
        num_trajs, traj_len, batch, T = 10, 10, 8, 3
        data = self._create_mock_data_alm(batch=num_trajs, T=traj_len).reshape(-1)
        data.names = None
        data.set(TRAJ_KEY, torch.arange(num_trajs).repeat_interleave(traj_len))
        rb = TensorDictReplayBuffer(
            storage=LazyTensorStorage(num_trajs * traj_len),
            sampler=PrioritizedSliceSampler(
                max_capacity=num_trajs * traj_len,
                alpha=0.7,
                beta=0.9,
                slice_len=T,
                traj_key=TRAJ_KEY,
            ),
            batch_size=batch * T,
            priority_key=loss_fn.tensor_keys.priority,
        )
        rb.extend(data)

        sample = rb.sample().reshape(batch, T)
        weights = sample.get("priority_weight")
        torch.testing.assert_close(weights, weights.new_ones(()).expand_as(weights))
        loss_fn(sample)
        assert sample.get(loss_fn.tensor_keys.priority).shape == sample.shape
        rb.update_tensordict_priority(sample.reshape(-1))

        # the updated slices now weigh differently from the others
        samples = [rb.sample().reshape(batch, T) for _ in range(8)]
        weights = torch.cat([sample.get("priority_weight") for sample in samples])
        assert weights.std() > 1e-5
        loss = loss_fn(samples[-1])
        assert all(torch.isfinite(value) for value in loss.values())

    def test_alm_soft_update(self):
        tau = 0.1
        loss_fn = self._create_mock_alm(target_updater=False)
        updater = SoftUpdate(loss_fn, tau=tau)
        # one updater moves the targets of the encoder and of the critics, only those
        assert {
            name.split(".")[0]
            for name, _ in loss_fn.named_buffers()
            if name.startswith("target_")
        } == {"target_encoder_params", "target_qvalue_network_params"}
        names = ("encoder", "qvalue_network")
        for name in names:
            source = getattr(loss_fn, f"{name}_params")
            target = getattr(loss_fn, f"target_{name}_params")
            assert_allclose_td(source.data, target)
        old_targets = {
            name: getattr(loss_fn, f"target_{name}_params").clone() for name in names
        }
        with torch.no_grad():
            for p in loss_fn.parameters():
                p.add_(1.0)
        updater.step()
        for name in names:
            source = getattr(loss_fn, f"{name}_params").data
            target = getattr(loss_fn, f"target_{name}_params")
            assert_allclose_td(target, old_targets[name] * (1 - tau) + source * tau)

    def test_alm_target_updater_warning(self):
        loss_fn = self._create_mock_alm(target_updater=False)
        td = self._create_mock_data_alm()
        with pytest.warns(
            UserWarning, match="No target network updater has been"
        ) if rl_warnings() else contextlib.nullcontext():
            loss_fn(td.clone())
        SoftUpdate(loss_fn, tau=0.05)
        loss_fn(td.clone())  # warnings are errors: none is raised any more

    def test_alm_schedulable_actor_std(self):
        loss_fn = self._create_mock_alm(actor_std=1.0)
        buffer = loss_fn.actor_std
        loss_fn.actor_std = 0.25
        assert loss_fn.actor_std is buffer
        torch.testing.assert_close(buffer, torch.tensor(0.25))


if __name__ == "__main__":
    args, unknown = argparse.ArgumentParser().parse_known_args()
    pytest.main([__file__, "--capture", "no", "--exitfirst"] + unknown)
