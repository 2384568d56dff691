"""Evaluation: the mean-action policy's returns, and the bias of ALM's K-step lower bound (Appendix E).

:func:`evaluate` runs the evaluation episodes (the paper's protocol: the actor's mean action, 5 episodes every 5,000
frames). Which latent the action is taken on is the policy's: ``make_alm_modules(eval_latent="sample")`` (the default)
samples it from the encoder, as the reference code's evaluation does; ``eval_latent="mean"`` takes the encoder's mean.

The bias of the lower bound against Monte-Carlo returns (the paper's Appendix E, Fig. 4 and 8):

The protocol follows REDQ (Chen et al., 2021), as the paper says it does: run the evaluation (mean-action) policy,
take the discounted Monte-Carlo return ``G_t = sum_{j >= t} gamma^(j - t) r_j`` of the rest of the episode at each of
the first ``num_states`` (350) states, estimate the lower bound ``LB(s_t, a_t)`` at the same states, and report the mean
and std of the normalised bias ``(LB - G) / max(|G|, 10)`` over all those states and episodes.

The K-step estimate (:meth:`ALMLoss.lower_bound <alm_torchrl.objectives.ALMLoss.lower_bound>`), with ``c`` the loss's
``classifier_coef`` and ``gamma`` its ``value_estimator.gamma``::

    LB(s) = sum_{t=0}^{K-1} gamma^t (r(z_t, a_t) + c (logit_1 - logit_0)(C(z_t, a_t, z_{t+1})))
            + gamma^K min_i Q_i(z_K, a_K)

rolled out from ``z_0 = e(s)`` through the world model with the actor's mean actions (no noise). It is the objective
the actor maximises (Eq. 8, with ``lambda = 1``), evaluated instead of optimised.

Choices, and how they relate to the reference code (``RajGhugare19/alm``, ``AlmAgent.get_lower_bound``):

- **Two latents, set apart.** The *episodes* are the evaluation policy's: their actions, and so the returns ``G_t``,
  come from the latent ``eval_policy`` acts on (sampled from the encoder with ``make_alm_modules``' default
  ``eval_latent="sample"``, as in the reference code; the encoder's mean with ``"mean"``). The *bound* rolls out its
  own latents: with ``sample_latents=False`` (this function's default) ``z_0`` is the encoder's mean and ``z_{t+1}``
  the world model's mean, so the estimate has no sampling noise of its own; with ``sample_latents=True`` both are
  sampled, as the reference code does. The recipe passes ``sample_latents=True`` when ``logger.eval_latent=sample``
  (its default), so both follow the paper's protocol.
- **Encoder: the online one by default**, the one the evaluation policy acts with. The reference code encodes ``s``
  with the *target* encoder; ``target_encoder=True`` does too. (The paper itself does not say which.)
- **First action: the one taken.** :func:`lower_bound_bias` passes each state's recorded action as ``a_0``, as the
  reference code does (the paper writes ``L(s, a)``): the action of the latent the policy sampled, not ``pi(z_0)``
  of the bound's own ``z_0`` (they are equal only when both are the encoder's mean).
- **Sign: the paper's ``(LB - G)``**, so a negative bias means the bound sits below the returns. The reference
  code logs ``G - LB`` (the opposite sign).
- Imagined steps never terminate (as in the actor loss and the reference code); ALM's networks have no dropout or
  batch norm, so train and eval mode compute the same thing and the modules' mode is left alone.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np
import torch
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives.value.functional import reward2go

from alm_torchrl.envs import rollout_episodes
from alm_torchrl.objectives import ALMLoss

__all__ = [
    "DEFAULT_NUM_STATES",
    "NORMALISATION_FLOOR",
    "discounted_returns",
    "evaluate",
    "lower_bound_bias",
    "normalised_bias",
]

DEFAULT_NUM_STATES = 350
"""States per evaluation episode at which the bias is measured (REDQ's and ALM's ``n_mc_cutoff``)."""
NORMALISATION_FLOOR = 10.0
"""The bias at a state is divided by ``max(|G|, NORMALISATION_FLOOR)`` (REDQ's floor)."""


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def evaluate(env: EnvBase, eval_policy: Callable, num_episodes: int, max_steps: int) -> dict[str, float]:
    """Mean return and length of ``num_episodes`` episodes of ``eval_policy`` under ``ExplorationType.DETERMINISTIC``.

    With ``ALMModules.eval_policy`` that is the actor's mean action, on a sampled latent or the encoder's mean as
    ``make_alm_modules(eval_latent=...)`` chose.

    A batched ``env`` (``make_env(num_envs=n)``) runs ``n`` of the episodes side by side, one policy call per step
    for all of them; ``num_episodes = n`` is one rollout.
    """
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        episodes = rollout_episodes(env, eval_policy, max_steps, num_episodes)
    returns = [episode["next", "reward"].sum().item() for episode in episodes]
    return {"return_mean": float(np.mean(returns)), "length_mean": float(np.mean([len(e) for e in episodes]))}


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted reward-to-go ``G_t = sum_{j >= t} gamma^(j - t) r_j`` of one episode.

    Args:
        rewards: the episode's rewards in time order, shape ``[T]`` or ``[T, 1]`` (a rollout's
            ``("next", "reward")``). The episode is taken as one trajectory: nothing is bootstrapped after its last
            step, whether it terminated or was truncated.
        gamma: the discount, in ``[0, 1]``.

    Returns:
        ``G_0 .. G_{T-1}``, shape ``[T]``, in the rewards' dtype (computed in float64).
    """
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if rewards.ndim == 2 and rewards.shape[-1] == 1:
        rewards = rewards.squeeze(-1)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape [T] or [T, 1] (one episode), got {tuple(rewards.shape)}")
    if rewards.numel() == 0 or float(gamma) == 0.0:
        return rewards.clone()  # G_t = r_t (reward2go fails on gamma = 0)
    # TorchRL's reward-to-go over time dim -2; with no done flag set the whole sequence is one trajectory. It drops
    # the discount weights below 1e-7 (after 1603 steps at gamma = 0.99), far below float32 precision.
    as_column = rewards.to(torch.float64).unsqueeze(-1)
    returns = reward2go(as_column, torch.zeros_like(as_column, dtype=torch.bool), float(gamma), time_dim=-2)
    return returns.squeeze(-1).to(rewards.dtype)


def normalised_bias(lower_bounds: torch.Tensor, mc_returns: torch.Tensor) -> tuple[float, float]:
    """Mean and std of ``(LB - G) / max(|G|, 10)`` over all states (REDQ's normalisation, the paper's sign).

    The std is the population std (``correction=0``, numpy's default, as the reference code's ``np.std``).
    """
    if lower_bounds.shape != mc_returns.shape:
        raise ValueError(
            f"lower_bounds and mc_returns must have the same shape, got {tuple(lower_bounds.shape)} "
            f"and {tuple(mc_returns.shape)}"
        )
    if lower_bounds.numel() == 0:
        raise ValueError("normalised_bias needs at least one state, got empty tensors")
    lower_bounds, mc_returns = lower_bounds.to(torch.float64), mc_returns.to(torch.float64)
    bias = (lower_bounds - mc_returns) / mc_returns.abs().clamp_min(NORMALISATION_FLOOR)
    return bias.mean().item(), bias.std(correction=0).item()


def lower_bound_bias(
    env: EnvBase,
    loss: ALMLoss,
    eval_policy: Callable,
    num_episodes: int,
    horizon: int = 3,
    max_steps: int = 1000,
    num_states: int = DEFAULT_NUM_STATES,
    *,
    target_encoder: bool = False,
    sample_latents: bool = False,
) -> dict[str, float]:
    """Normalised bias of the lower bound against the Monte-Carlo returns of the evaluation policy (Appendix E).

    Runs ``num_episodes`` episodes of ``eval_policy`` under ``ExplorationType.DETERMINISTIC`` (mean action on the
    policy's latent, sampled or the mean, like :func:`evaluate`), each up to ``max_steps`` steps. In each episode the
    discounted return ``G_t`` of the rest of the episode is computed at every step (no bootstrap after the last step),
    and the first ``num_states`` states ``s_0 .. s_{num_states - 1}`` are kept; an episode shorter than ``num_states``
    contributes all its states. ``LB(s_t, a_t)`` is :meth:`ALMLoss.lower_bound
    <alm_torchrl.objectives.ALMLoss.lower_bound>` at those states with the recorded actions as ``a_0``.

    Args:
        env: an env from :func:`alm_torchrl.envs.make_env` (or any env writing the loss's observation, action and
            ``("next", reward)`` keys); a batched one runs its copies' episodes side by side
            (:func:`alm_torchrl.envs.rollout_episodes`).
        loss: the :class:`~alm_torchrl.objectives.ALMLoss` whose networks give the bound; ``gamma`` is its
            ``value_estimator.gamma`` for both the bound and the returns.
        eval_policy: the evaluation policy (``modules.eval_policy``), acting with the same networks.
        num_episodes: evaluation episodes (>= 1).
        horizon: the bound's K (>= 1).
        max_steps: the longest episode (>= 1); keep it >> ``num_states`` so that ``G_t`` covers enough of the future
            (the paper's episodes last 1000 steps).
        num_states: states per episode (>= 1); 350 in the paper.

    Keyword Args:
        target_encoder, sample_latents: passed to ``loss.lower_bound``: encode with the target encoder; sample
            the bound's latents instead of taking means (the latent the episodes act on is ``eval_policy``'s).

    Returns:
        ``lower_bound_bias_mean`` and ``lower_bound_bias_std`` (the normalised bias), ``lower_bound_mean`` and
        ``mc_return_mean`` (raw means of ``LB`` and ``G`` over the same states) and ``num_states`` (their count).
    """
    _check_positive("num_episodes", num_episodes)
    _check_positive("horizon", horizon)
    _check_positive("max_steps", max_steps)
    _check_positive("num_states", num_states)
    keys = loss.tensor_keys
    gamma = float(loss.value_estimator.gamma)
    device = next(loss.parameters()).device
    lower_bounds, mc_returns = [], []
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        for episode in rollout_episodes(env, eval_policy, max_steps, num_episodes):
            mc_returns.append(discounted_returns(episode.get(("next", keys.reward)), gamma)[:num_states].cpu())
            states = episode[:num_states]
            lower_bounds.append(
                loss.lower_bound(
                    states.get(keys.observation).to(device),
                    horizon,
                    states.get(keys.action).to(device),
                    target_encoder=target_encoder,
                    sample_latents=sample_latents,
                ).cpu()
            )
    lower_bound, mc_return = torch.cat(lower_bounds), torch.cat(mc_returns)
    bias_mean, bias_std = normalised_bias(lower_bound, mc_return)
    return {
        "lower_bound_bias_mean": bias_mean,
        "lower_bound_bias_std": bias_std,
        "lower_bound_mean": lower_bound.mean().item(),
        "mc_return_mean": mc_return.mean().item(),
        "num_states": lower_bound.numel(),
    }
