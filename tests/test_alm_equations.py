"""Each ALM loss equals a direct computation of its equation (spec, Eq. 7-11).

The reference computations below use only the raw weights (read out of the loss) and the
formulas of the spec, with the spec's stop-gradients. They draw random numbers in the same
order as the loss, so with one seed both see the same samples.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
from torchrl.objectives import SoftUpdate
from torchrl.objectives.value.functional import td_lambda_return_estimate

from conftest import slice_batch, tiny_loss

GAMMA, LMBDA, COEF, ACTOR_STD, CLIP = 0.97, 0.95, 0.1, 0.5, 0.3
B, K = 16, 3


def _linear(params, x):
    return F.linear(x, params["weight"], params["bias"])


def elu_mlp(params, x):
    x = F.elu(_linear(params["0"], x))
    x = F.elu(_linear(params["2"], x))
    return _linear(params["4"], x)


def layernorm_tanh_mlp(params, x):
    x = _linear(params["0"], x)
    x = torch.tanh(F.layer_norm(x, x.shape[-1:], params["1"]["weight"], params["1"]["bias"]))
    x = F.elu(_linear(params["3"], x))
    return _linear(params["5"], x)


def gaussian(params, x):
    """Table 4's Gaussian head: mean = 30 tanh(mean/30); std softly clamped into [0.1, 10]."""
    mean, raw_std = elu_mlp(params["module", "0", "module", "net"], x).chunk(2, -1)
    mean = 30 * torch.tanh(mean / 30)
    std = 10 - F.softplus(10 - raw_std)
    std = 0.1 + F.softplus(std - 0.1)
    return mean, std


def reward_model(params, z, a):
    return layernorm_tanh_mlp(params["module", "net"], torch.cat([z, a], -1))


def classifier(params, z, a, z_next):
    return layernorm_tanh_mlp(params["module", "net"], torch.cat([z, a, z_next], -1))


def min_q(stacked_params, z, a):
    values = [layernorm_tanh_mlp(stacked_params[i]["module", "net"], torch.cat([z, a], -1))
              for i in range(stacked_params.shape[0])]
    return torch.stack(values).min(0).values


def actor_sample(params, z, low=-1.0, high=1.0):
    """pi(a|z): tanh mean + clip(std * eps, -0.3, 0.3), clamped to [low+1e-6, high-1e-6] straight-through."""
    mean = torch.tanh(elu_mlp(params["module", "0"], z))
    x = mean + (ACTOR_STD * torch.randn_like(mean)).clamp(-CLIP, CLIP)
    return x - x.detach() + x.clamp(low + 1e-6, high - 1e-6).detach()


def diag_gaussian_kl(mean1, std1, mean2, std2):
    """KL(N(mean1, std1) || N(mean2, std2)) summed over the latent dims."""
    return (torch.log(std2 / std1) + (std1 ** 2 + (mean1 - mean2) ** 2) / (2 * std2 ** 2) - 0.5).sum(-1)


def spec_lambda_returns(rewards, q_values, gamma, lmbda):
    """The spec's recursion: G_K = q_K; G_t = r_t + gamma ((1 - lambda) q_{t+1} + lambda G_{t+1})."""
    horizon = rewards.shape[0]
    returns = [None] * horizon
    last = q_values[horizon]
    for t in reversed(range(horizon)):
        last = rewards[t] + gamma * ((1 - lmbda) * q_values[t + 1] + lmbda * last)
        returns[t] = last
    return torch.stack(returns)


@pytest.fixture
def setup():
    loss = tiny_loss(num_qvalue_nets=2)
    SoftUpdate(loss, tau=0.005)
    loss.make_value_estimator(gamma=GAMMA)
    loss.actor_std = ACTOR_STD
    with torch.no_grad():  # online encoder and critics differ from their targets
        generator = torch.Generator().manual_seed(2)
        for params in (loss.encoder_params, loss.qvalue_network_params):
            params.apply_(lambda p: p.add_(0.1 * torch.randn(p.shape, generator=generator)))
    batch = slice_batch(B, K)
    loss(batch)  # first call: one-off checks, outside the compared draws
    weights = {name: getattr(loss, f"{name}_params").detach() for name in (
        "encoder", "world_model", "reward_model", "classifier", "qvalue_network", "actor_network")}
    weights["target_encoder"] = loss.target_encoder_params
    weights["target_qvalue_network"] = loss.target_qvalue_network_params
    return loss, batch, weights


def _observations(batch):
    return torch.cat([batch["observation"][:, :1], batch["next", "observation"]], 1)  # s_0..s_K


def _target_latents(weights, batch):
    mean, std = gaussian(weights["target_encoder"], _observations(batch))
    return mean, std, Normal(mean[:, :2], std[:, :2]).sample()  # one draw of z(s_0), z(s_1)


def test_model_loss_is_eq7(setup):
    loss, batch, w = setup
    torch.manual_seed(0)
    value, metadata = loss.model_loss(batch)

    torch.manual_seed(0)
    target_mean, target_std = gaussian(w["target_encoder"], _observations(batch))
    mean, std = gaussian(w["encoder"], batch["observation"][:, 0])
    z = Normal(mean, std).rsample()
    objective = torch.zeros(B)
    for t in range(K):
        prior_mean, prior_std = gaussian(w["world_model"], torch.cat([z, batch["action"][:, t]], -1))
        kl = diag_gaussian_kl(prior_mean, prior_std, target_mean[:, t + 1], target_std[:, t + 1])
        objective += kl - reward_model(w["reward_model"], z, batch["action"][:, t]).squeeze(-1)
        z = Normal(prior_mean, prior_std).rsample()
    a_K = actor_sample(w["actor_network"], z)
    objective -= min_q(w["qvalue_network"], z, a_K).squeeze(-1)
    torch.testing.assert_close(value, objective.mean())
    torch.testing.assert_close(metadata["latent_std"], std.mean())


def test_reward_loss_is_eq11(setup):
    loss, batch, w = setup
    torch.manual_seed(1)
    value, _ = loss.reward_loss(batch)

    torch.manual_seed(1)
    _, _, latents = _target_latents(w, batch)
    predicted = reward_model(w["reward_model"], latents[:, 0], batch["action"][:, 0])
    torch.testing.assert_close(value, F.mse_loss(predicted, batch["next", "reward"][:, 0]))


def test_classifier_loss_is_eq9(setup):
    loss, batch, w = setup
    torch.manual_seed(2)
    value, metadata = loss.classifier_loss(batch)

    torch.manual_seed(2)
    _, _, latents = _target_latents(w, batch)
    z, z_real, action = latents[:, 0], latents[:, 1], batch["action"][:, 0]
    prior_mean, prior_std = gaussian(w["world_model"], torch.cat([z, action], -1))
    z_fake = Normal(prior_mean, prior_std).sample()
    fake = torch.randperm(B)[: B // 2]
    labels = torch.ones(B, dtype=torch.long)
    labels[fake] = 0
    z_next = z_real.clone()
    z_next[fake] = z_fake[fake]
    logits = classifier(w["classifier"], z, action, z_next)
    torch.testing.assert_close(value, F.cross_entropy(logits, labels))
    torch.testing.assert_close(metadata["classifier_accuracy"], (logits.argmax(-1) == labels).float().mean())
    assert (labels == 0).sum() == B // 2


def test_qvalue_loss_is_eq10_and_bootstraps_on_terminated_only(setup):
    loss, batch, w = setup
    # A truncation (done but not terminated) must bootstrap; the sampler marks slice ends done.
    batch["next", "done"][:, 0] = True
    batch["next", "terminated"][::3, 0] = True
    torch.manual_seed(3)
    value, metadata = loss.qvalue_loss(batch)

    torch.manual_seed(3)
    _, _, latents = _target_latents(w, batch)
    z, z_next = latents[:, 0], latents[:, 1]
    a_next = actor_sample(w["actor_network"], z_next)
    not_terminal = (~batch["next", "terminated"][:, 0]).float()
    y = batch["next", "reward"][:, 0] + GAMMA * not_terminal * min_q(w["target_qvalue_network"], z_next, a_next)
    q = [layernorm_tanh_mlp(w["qvalue_network"][i]["module", "net"], torch.cat([z, batch["action"][:, 0]], -1))
         for i in range(2)]
    expected = (F.mse_loss(q[0], y) + F.mse_loss(q[1], y)) / 2
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(metadata["target_q_mean"], y.mean())
    assert batch["next", "terminated"][:, 0].any() and not batch["next", "terminated"][:, 0].all()


def test_actor_loss_is_eq8(setup):
    loss, batch, w = setup
    torch.manual_seed(4)
    value, metadata = loss.actor_loss(batch)

    torch.manual_seed(4)
    _, _, latents = _target_latents(w, batch)
    z = latents[:, 0]
    zs, actions = [z], []
    for _ in range(K):
        a = actor_sample(w["actor_network"], z.detach())
        mean, std = gaussian(w["world_model"], torch.cat([z, a], -1))
        z = Normal(mean, std).rsample()
        actions.append(a)
        zs.append(z)
    actions.append(actor_sample(w["actor_network"], z.detach()))
    rewards = torch.stack([
        reward_model(w["reward_model"], zs[t], actions[t])
        + COEF * (lambda logits: logits[..., 1:] - logits[..., :1])(
            classifier(w["classifier"], zs[t], actions[t], zs[t + 1].detach()))
        for t in range(K)
    ])
    q_values = torch.stack([min_q(w["qvalue_network"], zs[t], actions[t].detach()) for t in range(K + 1)])
    returns = spec_lambda_returns(rewards, q_values, GAMMA, LMBDA)  # [K, B, 1]
    discounts = GAMMA ** torch.arange(K, dtype=torch.float32).view(K, 1, 1)
    torch.testing.assert_close(value, -(discounts * returns).mean())
    torch.testing.assert_close(metadata["imagined_reward"], torch.stack([
        reward_model(w["reward_model"], zs[t], actions[t]) for t in range(K)]).mean())


@pytest.mark.parametrize("horizon", [1, 3, 5])
def test_torchrl_lambda_return_equals_spec_recursion(horizon):
    generator = torch.Generator().manual_seed(horizon)
    rewards = torch.randn(8, horizon, 1, generator=generator, requires_grad=True)
    q_values = torch.randn(8, horizon + 1, 1, generator=generator, requires_grad=True)
    never = torch.zeros(8, horizon, 1, dtype=torch.bool)
    ours = td_lambda_return_estimate(GAMMA, LMBDA, q_values[:, 1:], rewards, done=never, terminated=never,
                                     time_dim=-2)
    spec = spec_lambda_returns(rewards.transpose(0, 1), q_values.transpose(0, 1), GAMMA, LMBDA).transpose(0, 1)
    torch.testing.assert_close(ours, spec)
    # Differentiable in both the rewards and the bootstrap values.
    ours.sum().backward()
    assert rewards.grad.abs().sum() > 0 and q_values.grad[:, 1:].abs().sum() > 0


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
