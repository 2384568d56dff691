"""The lower-bound bias evaluation (Appendix E): the K-step estimate, the MC returns and their normalised bias."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import RewardClipping
from torchrl.envs.utils import ExplorationType, set_exploration_type

from alm_torchrl import make_alm_modules
from alm_torchrl.modules import make_eval_policy
from alm_torchrl.envs import make_env
from alm_torchrl.evaluation import discounted_returns, lower_bound_bias, normalised_bias
from alm_torchrl.objectives import ALMLoss

from conftest import OBS_DIM, tiny_loss, tiny_modules

# The last Linear of the reward, classifier and critic trunks (layernorm_tanh_mlp: 0 Linear, 1 LayerNorm, 2 Tanh,
# 3 Linear, 4 ELU, 5 Linear).
LAST_BIAS = ("module", "net", "5", "bias")


def tiny_loss_and_modules(num_qvalue_nets: int = 2, seed: int = 0, gamma: float = 0.9, **loss_kwargs):
    torch.manual_seed(seed)
    modules = tiny_modules(num_qvalue_nets)
    loss = ALMLoss(**modules.loss_kwargs(), **loss_kwargs)
    loss.make_value_estimator(gamma=gamma)
    return loss, modules


def hand_lower_bound(modules, observation, horizon, gamma, coef, first_action=None, sample=False):
    """The formula, step by step, calling the plain torch networks inside the TensorDict modules."""
    encoder_head = modules.encoder[0].module  # GaussianParamHead: observation -> (loc, scale)
    world_model_head = modules.world_model[0].module
    actor = modules.actor_network.module
    reward_net = modules.reward_model.module
    classifier_net = modules.classifier.module

    def latent(loc_scale):
        loc, scale = loc_scale
        return torch.distributions.Normal(loc, scale).rsample() if sample else loc

    with torch.no_grad():
        z = latent(encoder_head(observation))
        a = actor(z) if first_action is None else first_action
        total = torch.zeros(observation.shape[0])
        for t in range(horizon):
            z_next = latent(world_model_head(z, a))
            logits = classifier_net(z, a, z_next)
            total += gamma**t * (reward_net(z, a)[:, 0] + coef * (logits[:, 1] - logits[:, 0]))
            z, a = z_next, actor(z_next)
        q = torch.stack([critic.module(z, a)[:, 0] for critic in modules.qvalue_network]).min(0).values
        return total + gamma**horizon * q


@pytest.mark.parametrize("num_qvalue_nets", [1, 2, 3])
@pytest.mark.parametrize("horizon", [1, 3])
def test_estimate_matches_hand_computation(num_qvalue_nets, horizon):
    loss, modules = tiny_loss_and_modules(num_qvalue_nets, classifier_coef=0.3, gamma=0.9)
    observation = torch.randn(6, OBS_DIM, generator=torch.Generator().manual_seed(3))
    estimate = loss.lower_bound(observation, horizon)
    assert estimate.shape == (6,)
    torch.testing.assert_close(estimate, hand_lower_bound(modules, observation, horizon, 0.9, 0.3))
    # A recorded first action replaces pi(z_0) and changes the estimate.
    first_action = torch.rand(6, 2, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with_action = loss.lower_bound(observation, horizon, first_action)
    torch.testing.assert_close(with_action, hand_lower_bound(modules, observation, horizon, 0.9, 0.3, first_action))
    assert not torch.allclose(with_action, estimate)


def test_estimate_with_sampled_latents_matches_hand_computation():
    loss, modules = tiny_loss_and_modules(classifier_coef=0.3, gamma=0.9)
    observation = torch.randn(6, OBS_DIM, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    sampled = loss.lower_bound(observation, 3, sample_latents=True)
    torch.manual_seed(11)
    expected = hand_lower_bound(modules, observation, 3, 0.9, 0.3, sample=True)
    torch.testing.assert_close(sampled, expected)
    assert not torch.allclose(sampled, loss.lower_bound(observation, 3))


@pytest.mark.filterwarnings("ignore:No target network updater")
def test_target_encoder_option_uses_the_target_parameters():
    loss, modules = tiny_loss_and_modules(gamma=0.9)
    with torch.no_grad():
        for value in loss.target_encoder_params.values(True, True):
            value.add_(0.3 * torch.randn_like(value))
    observation = torch.randn(6, OBS_DIM, generator=torch.Generator().manual_seed(3))
    online = loss.lower_bound(observation, 2)
    target = loss.lower_bound(observation, 2, target_encoder=True)
    with loss.target_encoder_params.to_module(modules.encoder):
        expected = hand_lower_bound(modules, observation, 2, 0.9, float(loss.classifier_coef))
    torch.testing.assert_close(target, expected)
    assert not torch.allclose(online, target)


def test_one_step_without_classifier_is_reward_plus_discounted_min_q():
    loss = tiny_loss(num_qvalue_nets=2, classifier_coef=0.0)
    loss.make_value_estimator(gamma=0.8)
    observation = torch.randn(5, OBS_DIM, generator=torch.Generator().manual_seed(7))
    keys = loss.tensor_keys

    def call(network, params, **entries):
        with params.to_module(network):
            return network(TensorDict(entries, batch_size=[5]))

    def dist(network, params, **entries):
        with params.to_module(network):
            return network.get_dist(TensorDict(entries, batch_size=[5]))

    def actor_mean(z):
        return call(loss.actor_network, loss.actor_network_params, **{keys.latent: z}).get(keys.action)

    with torch.no_grad():  # the loss's networks called one by one, a different route from the hand computation
        z0 = dist(loss.encoder, loss.encoder_params, **{keys.observation: observation}).mean
        a0 = actor_mean(z0)
        z1 = dist(loss.world_model, loss.world_model_params, **{keys.latent: z0, keys.action: a0}).mean
        reward = call(loss.reward_model, loss.reward_model_params, **{keys.latent: z0, keys.action: a0})
        reward = reward.get(keys.predicted_reward)[:, 0]
        qvalues = torch.stack([
            call(loss.qvalue_network, params, **{keys.latent: z1, keys.action: actor_mean(z1)})
            .get(keys.state_action_value)[:, 0]
            for params in loss.qvalue_network_params.unbind(0)
        ])  # [2, B]
        expected = reward + 0.8 * qvalues.min(0).values
    assert not torch.allclose(qvalues[0], qvalues[1])  # the min picks between two different critics
    torch.testing.assert_close(loss.lower_bound(observation, 1), expected)


def test_discounted_returns_match_double_loop():
    rewards = torch.randn(37, generator=torch.Generator().manual_seed(0))
    gamma = 0.9
    brute_force = torch.tensor(
        [sum(gamma ** (j - t) * rewards[j].item() for j in range(t, len(rewards))) for t in range(len(rewards))]
    )
    torch.testing.assert_close(discounted_returns(rewards, gamma), brute_force)
    torch.testing.assert_close(discounted_returns(rewards.unsqueeze(-1), gamma), brute_force)  # a rollout's [T, 1]
    torch.testing.assert_close(discounted_returns(rewards, 0.0), rewards)
    torch.testing.assert_close(discounted_returns(rewards, 1.0), rewards.flip(0).cumsum(0).flip(0))


def test_normalised_bias_of_known_values():
    assert normalised_bias(torch.tensor([3.0, -40.0, 7.0]), torch.tensor([3.0, -40.0, 7.0])) == (0.0, 0.0)
    # Floor of 10 for |G| < 10, |G| otherwise; LB - G, so an overestimate is positive.
    mean, std = normalised_bias(torch.tensor([0.0, 30.0, -5.0]), torch.tensor([5.0, 20.0, -100.0]))
    per_state = [-5.0 / 10, 10.0 / 20, 95.0 / 100]
    assert mean == pytest.approx(sum(per_state) / 3)
    assert std == pytest.approx(math.sqrt(sum((b - mean) ** 2 for b in per_state) / 3))  # population std


@pytest.fixture
def pendulum():
    env = make_env("Pendulum-v1", seed=0, max_episode_steps=60)
    torch.manual_seed(0)
    # Mean latents: the evaluation episodes are a function of the env seed alone, so runs compare exactly.
    modules = make_alm_modules(env.observation_spec_unbatched, env.action_spec_unbatched, latent_dim=4,
                               hidden_dim=16, model_hidden_dim=16, eval_latent="mean")
    return env, modules, ALMLoss(**modules.loss_kwargs())


def test_bias_on_pendulum_is_finite(pendulum):
    env, modules, loss = pendulum
    result = lower_bound_bias(env, loss, modules.eval_policy, num_episodes=2, horizon=3, max_steps=60, num_states=50)
    assert set(result) == {
        "lower_bound_bias_mean", "lower_bound_bias_std", "lower_bound_mean", "mc_return_mean", "num_states"
    }
    assert result["num_states"] == 100
    assert all(math.isfinite(value) for value in result.values())
    assert result["mc_return_mean"] < 0  # Pendulum's rewards are all <= 0
    # An episode shorter than num_states contributes all of its states.
    short = lower_bound_bias(env, loss, modules.eval_policy, num_episodes=1, horizon=3, max_steps=30, num_states=50)
    assert short["num_states"] == 30


def test_bias_of_a_batched_env_pools_the_episodes_of_its_copies(pendulum):
    _, modules, loss = pendulum
    settings = {"horizon": 3, "max_steps": 40, "num_states": 25}
    batched_env = make_env("Pendulum-v1", seed=5, num_envs=2, max_episode_steps=40)
    batched = lower_bound_bias(batched_env, loss, modules.eval_policy, num_episodes=2, **settings)
    singles = [
        lower_bound_bias(make_env("Pendulum-v1", seed=5 + i, max_episode_steps=40), loss, modules.eval_policy,
                         num_episodes=1, **settings)
        for i in range(2)
    ]
    assert batched["num_states"] == 50
    assert singles[0]["mc_return_mean"] != pytest.approx(singles[1]["mc_return_mean"])
    for key in ("lower_bound_mean", "mc_return_mean"):
        assert batched[key] == pytest.approx((singles[0][key] + singles[1][key]) / 2, rel=1e-5)


@pytest.mark.filterwarnings("ignore:No target network updater")
def test_bias_uses_the_recorded_states_actions_and_whole_episode_returns(pendulum):
    """The episodes are the evaluation policy's, here the paper's (the mean action on a sampled latent); the bound
    takes each state's recorded action as a_0 and rolls out its own latents."""
    env, modules, loss = pendulum
    eval_policy = make_eval_policy(modules.encoder, modules.actor_network, "sample")
    with torch.no_grad():  # a target encoder that differs, so that a_0 = pi(z_0) differs from the recorded action
        for value in loss.target_encoder_params.values(True, True):
            value.add_(0.3 * torch.randn_like(value))
    env.set_seed(1)
    torch.manual_seed(1)
    result = lower_bound_bias(
        env, loss, eval_policy, num_episodes=1, horizon=2, max_steps=40, num_states=25, target_encoder=True
    )
    env.set_seed(1)  # the same episode again (the same latent draws), by hand
    torch.manual_seed(1)
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        rollout = env.rollout(40, eval_policy, break_when_any_done=True)
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        mean_latent_actions = modules.eval_policy(rollout[:25].select("observation").clone())["action"]
    assert not torch.allclose(rollout["action"][:25], mean_latent_actions)  # the episode acted on sampled latents
    observation, action = rollout["observation"][:25], rollout["action"][:25]
    lower_bound = loss.lower_bound(observation, 2, action, target_encoder=True)
    rewards = rollout["next", "reward"][:, 0].tolist()  # the returns look past the first 25 states
    returns = torch.tensor([sum(0.99 ** (j - t) * rewards[j] for j in range(t, 40)) for t in range(25)])
    assert result["num_states"] == 25
    assert result["lower_bound_mean"] == pytest.approx(lower_bound.mean().item(), rel=1e-5)
    assert result["mc_return_mean"] == pytest.approx(returns.mean().item(), rel=1e-5)
    bias_mean, bias_std = normalised_bias(lower_bound, returns)
    assert result["lower_bound_bias_mean"] == pytest.approx(bias_mean, rel=1e-4)
    assert result["lower_bound_bias_std"] == pytest.approx(bias_std, rel=1e-4)
    assert not torch.allclose(lower_bound, loss.lower_bound(observation, 2, target_encoder=True))


@pytest.mark.parametrize(
    ("horizon", "qvalue", "expected_lower_bound", "expected_bias"),
    [
        # sum_{t<3} 0.5^t + 0.5^3 * 2 = 2 = G (up to 0.5^41): no bias.
        (3, 2.0, 2.0, 0.0),
        # 1 + 0.5 * 3 = 2.5 against G = 2: (2.5 - 2) / max(2, 10) = 0.05.
        (1, 3.0, 2.5, 0.05),
    ],
)
def test_bias_is_exact_when_the_bound_is_known(pendulum, horizon, qvalue, expected_lower_bound, expected_bias):
    env, modules, loss = pendulum
    env.append_transform(RewardClipping(clamp_min=1.0, clamp_max=1.0))  # reward 1 at every step, never terminates
    loss.make_value_estimator(gamma=0.5)
    # Constant heads: every weight zero, so each network outputs its last bias (r = 1, logits 0, Q = qvalue).
    with torch.no_grad():
        for params, last_bias in (
            (loss.reward_model_params, 1.0),
            (loss.classifier_params, 0.0),
            (loss.qvalue_network_params, qvalue),
        ):
            for value in params.values(True, True):
                value.zero_()
            params[LAST_BIAS].fill_(last_bias)
    # 60-step episodes, first 20 states: G_t = 2 (1 - 0.5^(60 - t)) = 2 to float32 precision (reward2go drops
    # discount weights below 1e-7, 2e-7 here).
    result = lower_bound_bias(
        env, loss, modules.eval_policy, num_episodes=1, horizon=horizon, max_steps=60, num_states=20
    )
    assert result["num_states"] == 20
    assert result["mc_return_mean"] == pytest.approx(2.0, abs=1e-6)
    assert result["lower_bound_mean"] == pytest.approx(expected_lower_bound, abs=1e-6)
    assert result["lower_bound_bias_mean"] == pytest.approx(expected_bias, abs=1e-6)
    assert result["lower_bound_bias_std"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_episodes": 0}, "num_episodes"),
        ({"horizon": 0}, "horizon"),
        ({"num_states": 0}, "num_states"),
        ({"max_steps": 0}, "max_steps"),
        ({"horizon": 2.5}, "horizon"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(kwargs, name):
    loss = tiny_loss()
    arguments = {"num_episodes": 1, "horizon": 3, "max_steps": 10, "num_states": 5, **kwargs}
    # Checked before anything runs, so no env or policy is needed.
    with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got {kwargs[name]!r}$"):
        lower_bound_bias(None, loss, None, **arguments)


def test_bad_inputs_of_the_helpers():
    loss = tiny_loss()
    with pytest.raises(ValueError, match=r"^horizon must be a positive integer, got 0\.$"):
        loss.lower_bound(torch.randn(2, OBS_DIM), 0)
    with pytest.raises(ValueError, match="gamma must be in"):
        discounted_returns(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="one episode"):
        discounted_returns(torch.ones(2, 3), 0.9)
    with pytest.raises(ValueError, match="same shape"):
        normalised_bias(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="at least one state"):
        normalised_bias(torch.ones(0), torch.ones(0))
