# This file imports only torch, tensordict and torchrl so that it can be dropped into
# torchrl/objectives/ as is.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import dispatch, ProbabilisticTensorDictSequential, TensorDictModule
from tensordict.utils import NestedKey, unravel_key
from torch import distributions as d

from torchrl.data.tensor_specs import Bounded, Composite, TensorSpec
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import (
    _cache_values,
    _GAMMA_LMBDA_DEPREC_ERROR,
    _vmap_func,
    dispatch_value_estimator,
    ValueEstimators,
)
from torchrl.objectives.value.functional import td_lambda_return_estimate

__all__ = ["ALMLoss"]


def _kl_divergence(p: d.Distribution, q: d.Distribution) -> torch.Tensor:
    """KL(p || q); closed form for diagonal Normals, else ``torch.distributions.kl_divergence``.

    The closed form is what ``kl_divergence`` computes for two ``Independent(Normal)``, but it
    traces without a graph break under ``torch.compile`` (the registry lookup does not).
    """
    if (
        isinstance(p, d.Independent)
        and isinstance(q, d.Independent)
        and isinstance(p.base_dist, d.Normal)
        and isinstance(q.base_dist, d.Normal)
        and p.reinterpreted_batch_ndims == q.reinterpreted_batch_ndims == 1
    ):
        p_loc, p_scale = p.base_dist.loc, p.base_dist.scale
        q_loc, q_scale = q.base_dist.loc, q.base_dist.scale
        variance_ratio = (p_scale / q_scale).pow(2)
        mean_term = ((p_loc - q_loc) / q_scale).pow(2)
        return (0.5 * (variance_ratio + mean_term - 1 - variance_ratio.log())).sum(-1)
    return d.kl_divergence(p, q)


@dataclass
class _SliceBatch:
    """The entries of a ``[B, K]`` slice batch that the losses read, as plain tensors."""

    observation: torch.Tensor  # [B, K, obs]
    action: torch.Tensor  # [B, K, act]
    next_observation: torch.Tensor  # [B, K, obs]
    reward: torch.Tensor  # [B, K, 1]
    done: torch.Tensor  # [B, K, 1]
    terminated: torch.Tensor  # [B, K, 1]
    first_step: TensorDictBase  # the input at t = 0, for masks and priority weights

    @property
    def horizon(self) -> int:
        return self.action.shape[1]


class ALMLoss(LossModule):
    r"""Aligned Latent Models (ALM) loss.

    Presented in "Simplifying Model-based RL: Learning Representations, Latent-space Models,
    and Policies with One Objective", Ghugare et al., ICLR 2023,
    https://arxiv.org/abs/2209.08466.

    ALM trains an encoder :math:`e(z|s)`, a latent dynamics model :math:`m(z'|z,a)` and a policy
    :math:`\pi(a|z)` on one lower bound of the expected return. Its practical algorithm adds a
    reward model :math:`r(z,a)`, a classifier :math:`C(z,a,z')` (whose logit gives the intrinsic
    KL reward of imagined steps) and an ensemble of critics :math:`Q(z,a)` (clipped double-Q).
    This module computes the five losses of one ALM update from a single batch of K-step
    slices:

    - ``loss_model`` (Eq. 7): KL between the model prior and the target encoder, minus the
      predicted reward, over K recorded steps, minus the value of the last latent. Reaches the
      encoder and the world model only.
    - ``loss_reward`` (Eq. 11): reward regression on target-encoder latents.
    - ``loss_classifier`` (Eq. 9): real-vs-model next latent cross-entropy.
    - ``loss_qvalue`` (Eq. 10): TD(0) regression to the target critics, bootstrapped on
      ``terminated`` (never on ``done``: a time-limit truncation is not a terminal).
    - ``loss_actor`` (Eq. 8): minus the lambda-returns of a K-step imagined rollout of the
      current actor through the frozen model (lambda-SVG).

    Each loss reaches only its own group's parameters: the other networks are called with
    detached parameters (gradients still flow through them into their inputs), so the five
    losses can be summed and backpropagated once. The encoder and the critics have target
    parameters; one :class:`~torchrl.objectives.SoftUpdate` (tau=0.005 in the paper) moves both.

    The single-transition losses (reward, classifier, critic, actor) use the first transition
    of each slice, so one ``[B, K]`` batch serves the whole update.

    Args:
        encoder (ProbabilisticTensorDictSequential): maps ``observation`` to a distribution over
            ``latent`` (``get_dist`` must return a distribution with ``rsample``, and the
            world model's distribution must have a KL to it). Gets target parameters.
        world_model (ProbabilisticTensorDictSequential): maps (``latent``, ``action``) to a
            distribution over ``next_latent``.
        reward_model (TensorDictModule): maps (``latent``, ``action``) to ``predicted_reward``
            (shape ``[..., 1]``).
        classifier (TensorDictModule): maps (``latent``, ``action``, ``next_latent``) to two
            ``classifier_logits``; index 1 means "real" (from the encoder).
        qvalue_network (TensorDictModule or list of TensorDictModule): the critic, mapping
            (``latent``, ``action``) to ``state_action_value``. A list of independently built
            modules keeps each one's initialisation; a single module is expanded
            ``num_qvalue_nets`` times with re-drawn weights (TorchRL's behaviour). Gets target
            parameters.
        actor_network (TensorDictModule): deterministic actor mapping ``latent`` to the mean
            ``action``.

    Keyword Args:
        num_qvalue_nets (int, optional): critics when ``qvalue_network`` is a single module.
            Defaults to ``2``. Ignored (taken from the list) when a list is given.
        action_spec (TensorSpec, optional): the bounded action spec. Defaults to the actor's
            ``spec``. Sampled actions are clamped to ``[low + 1e-6, high - 1e-6]``.
        classifier_coef (float, optional): weight of the classifier reward in the actor's
            imagined reward (Eq. 8). Defaults to ``0.1``.
        lmbda (float, optional): lambda of the actor's lambda-returns. Defaults to ``0.95``.
        actor_std (float, optional): std of the Gaussian noise added to the actor's mean when
            actions are sampled inside the losses. Schedulable: ``loss.actor_std = 0.5`` writes
            in place. ALM moves it along the exploration schedule (1.0 to 0.1). Defaults to ``1.0``.
        noise_clip (float, optional): the noise is clipped to ``[-noise_clip, noise_clip]``.
            Defaults to ``0.3``.
        reduction (str, optional): ``"none"`` | ``"mean"`` | ``"sum"``. With ``"none"`` every
            loss has one entry per slice (shape ``[B]``). Defaults to ``"mean"``.
        deactivate_vmap (bool, optional): replace the vmap over critics by a Python loop.
            Defaults to ``False``.
        kl_term (bool, optional): keep the KL term in ``loss_model`` (Eq. 7). ``False`` is the
            paper's "no KL" ablation (Fig. 5a). Defaults to ``True``.
        value_term (bool, optional): keep the last latent's value ``-Q(z_K, a_K)`` in
            ``loss_model``. ``False`` is the "no value" ablation (Fig. 5a). Defaults to ``True``.
        actor_objective (str, optional): ``"svg"`` (Eq. 8, lambda-returns of an imagined rollout)
            or ``"td3"``: ``-min_i Q_i(z, a)`` with ``a`` the actor's clipped-noise sample, the
            "TD3 with ALM representations" ablation (Fig. 5c). Defaults to ``"svg"``.
        log_reward_shift (float, optional): if set to ``a``, the rewards inside the model and
            actor objectives become ``a * (log(r + a) - log a)``, the logarithmic form of the
            theory (Appendix A.8, Fig. 12; the paper uses ``a = 10_000``). Defaults to ``None``
            (the raw rewards, as in the paper's main results).
        entropy_coef (float, optional): ALM-ENT (Table 5): adds ``entropy_coef`` times the
            entropy of the actor's Gaussian at each imagined step to that step's reward in Eq. 8,
            SAC's entropy bonus. Needs an actor that learns its std (writes ``action_std``);
            the losses then sample with that std. Defaults to ``0.0``.

    The paper's other ablations are settings too: no classifier term in Eq. 8 is
    ``classifier_coef=0``; the horizon K is the batch's time dimension.

    The discount factor is set with ``loss.make_value_estimator(gamma=...)`` (default 0.99); it
    is used both by the critic target and by the actor's lambda-returns. Only
    ``ValueEstimators.TD0`` is supported: the critic learns from single transitions.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import (InteractionType, ProbabilisticTensorDictModule,
        ...     ProbabilisticTensorDictSequential, TensorDictModule)
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import Actor, IndependentNormal, ValueOperator
        >>> from torchrl.objectives import SoftUpdate
        >>> n_obs, n_act, n_lat, B, K = 4, 2, 3, 8, 3
        >>> class Cat(nn.Module):
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__()
        ...         self.linear = nn.Linear(n_in, n_out)
        ...     def forward(self, *x):
        ...         return self.linear(torch.cat(x, -1))
        >>> class GaussianCat(Cat):
        ...     def forward(self, *x):
        ...         loc, scale = super().forward(*x).chunk(2, -1)
        ...         return loc, nn.functional.softplus(scale) + 0.1
        >>> def gaussian(n_in, in_keys, out_key):
        ...     return ProbabilisticTensorDictSequential(
        ...         TensorDictModule(GaussianCat(n_in, 2 * n_lat), in_keys=in_keys, out_keys=["loc", "scale"]),
        ...         ProbabilisticTensorDictModule(in_keys=["loc", "scale"], out_keys=[out_key],
        ...             distribution_class=IndependentNormal,
        ...             default_interaction_type=InteractionType.RANDOM))
        >>> spec = Bounded(-1, 1, shape=(n_act,))
        >>> loss = ALMLoss(
        ...     encoder=gaussian(n_obs, ["observation"], "latent"),
        ...     world_model=gaussian(n_lat + n_act, ["latent", "action"], "next_latent"),
        ...     reward_model=TensorDictModule(Cat(n_lat + n_act, 1),
        ...         in_keys=["latent", "action"], out_keys=["predicted_reward"]),
        ...     classifier=TensorDictModule(Cat(2 * n_lat + n_act, 2),
        ...         in_keys=["latent", "action", "next_latent"], out_keys=["classifier_logits"]),
        ...     qvalue_network=[ValueOperator(Cat(n_lat + n_act, 1), in_keys=["latent", "action"])
        ...         for _ in range(2)],
        ...     actor_network=Actor(nn.Sequential(nn.Linear(n_lat, n_act), nn.Tanh()),
        ...         in_keys=["latent"], spec=spec),
        ... )
        >>> target_updater = SoftUpdate(loss, tau=0.005)
        >>> batch = TensorDict({
        ...     "observation": torch.randn(B, K, n_obs),
        ...     "action": spec.rand((B, K)),
        ...     "next": {"observation": torch.randn(B, K, n_obs), "reward": torch.randn(B, K, 1),
        ...              "done": torch.zeros(B, K, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(B, K, 1, dtype=torch.bool)},
        ... }, batch_size=[B, K])
        >>> losses = loss(batch)
        >>> sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
        >>> sorted(k for k in losses.keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_classifier', 'loss_model', 'loss_qvalue', 'loss_reward']
    """

    @dataclass
    class _AcceptedKeys:
        """Maintains default values for all configurable tensordict keys.

        This class defines which tensordict keys can be set using '.set_keys(key_name=key_value)' and their
        default values.

        Attributes:
            observation (NestedKey): the observation, read at the root and under ``"next"``.
                Defaults to ``"observation"``.
            action (NestedKey): the recorded action. Defaults to ``"action"``.
            reward (NestedKey): the reward, read under ``"next"``. Defaults to ``"reward"``.
            done (NestedKey): the done flag, read under ``"next"``. Defaults to ``"done"``.
            terminated (NestedKey): the termination flag, read under ``"next"``; the critic
                target bootstraps through anything that is not terminated. Defaults to
                ``"terminated"``.
            latent (NestedKey): the latent written by the encoder and read by the other
                networks. Defaults to ``"latent"``.
            next_latent (NestedKey): the latent written by the world model and read by the
                classifier. Defaults to ``"next_latent"``.
            predicted_reward (NestedKey): the reward model's output. Defaults to
                ``"predicted_reward"``.
            classifier_logits (NestedKey): the classifier's output. Defaults to
                ``"classifier_logits"``.
            state_action_value (NestedKey): the critic's output. Defaults to
                ``"state_action_value"``.
            priority_weight (NestedKey): importance weights of a prioritized sampler, read at
                each slice's first step. Defaults to ``"priority_weight"``.
            action_std (NestedKey): the action std an actor with a learned std writes next to
                its mean (ALM-ENT); without it the losses sample with ``actor_std``. Defaults to
                ``"action_std"``.
        """

        observation: NestedKey = "observation"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        latent: NestedKey = "latent"
        next_latent: NestedKey = "next_latent"
        predicted_reward: NestedKey = "predicted_reward"
        classifier_logits: NestedKey = "classifier_logits"
        state_action_value: NestedKey = "state_action_value"
        priority_weight: NestedKey = "priority_weight"
        action_std: NestedKey = "action_std"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0,)
    _schedulable_buffers = frozenset({"actor_std", "classifier_coef"})

    encoder: ProbabilisticTensorDictSequential
    world_model: ProbabilisticTensorDictSequential
    reward_model: TensorDictModule
    classifier: TensorDictModule
    qvalue_network: TensorDictModule
    actor_network: TensorDictModule
    encoder_params: TensorDictParams
    world_model_params: TensorDictParams
    reward_model_params: TensorDictParams
    classifier_params: TensorDictParams
    qvalue_network_params: TensorDictParams
    actor_network_params: TensorDictParams
    target_encoder_params: TensorDictParams
    target_world_model_params: TensorDictParams
    target_reward_model_params: TensorDictParams
    target_classifier_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams

    def __init__(
        self,
        encoder: ProbabilisticTensorDictSequential,
        world_model: ProbabilisticTensorDictSequential,
        reward_model: TensorDictModule,
        classifier: TensorDictModule,
        qvalue_network: TensorDictModule | list[TensorDictModule],
        actor_network: TensorDictModule,
        *,
        num_qvalue_nets: int = 2,
        action_spec: TensorSpec | None = None,
        classifier_coef: float = 0.1,
        lmbda: float = 0.95,
        actor_std: float = 1.0,
        noise_clip: float = 0.3,
        gamma: float | None = None,
        reduction: str | None = None,
        deactivate_vmap: bool = False,
        kl_term: bool = True,
        value_term: bool = True,
        actor_objective: str = "svg",
        log_reward_shift: float | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        if gamma is not None:
            raise TypeError(_GAMMA_LMBDA_DEPREC_ERROR)
        if reduction is None:
            reduction = "mean"
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}.")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}.")
        if actor_objective not in ("svg", "td3"):
            raise ValueError(f"actor_objective must be 'svg' or 'td3', got {actor_objective!r}.")
        if log_reward_shift is not None and log_reward_shift <= 0:
            raise ValueError(f"log_reward_shift must be positive or None, got {log_reward_shift}.")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be non-negative, got {entropy_coef}.")
        if noise_clip is not None and noise_clip < 0:
            raise ValueError(f"noise_clip must be non-negative or None, got {noise_clip}.")
        for name, network in (("encoder", encoder), ("world_model", world_model)):
            if not hasattr(network, "get_dist"):
                raise TypeError(
                    f"{name} must be a probabilistic module with get_dist() "
                    f"(e.g. ProbabilisticTensorDictSequential), got {type(network).__name__}."
                )
        if isinstance(qvalue_network, (list, tuple)):
            if len(qvalue_network) == 0:
                raise ValueError("qvalue_network is an empty list; pass at least one critic.")
            num_qvalue_nets = len(qvalue_network)
        if num_qvalue_nets < 1:
            raise ValueError(f"num_qvalue_nets must be at least 1, got {num_qvalue_nets}.")
        super().__init__()
        self.reduction = reduction
        self.deactivate_vmap = deactivate_vmap
        self.num_qvalue_nets = num_qvalue_nets
        self.lmbda = lmbda
        self.noise_clip = noise_clip
        self.kl_term = kl_term
        self.value_term = value_term
        self.actor_objective = actor_objective
        self.log_reward_shift = log_reward_shift
        self.entropy_coef = entropy_coef
        # The five losses, then the detached diagnostics, which depend on the variant.
        model_diagnostics = ["kl", "model_kl_term", "model_reward", "latent_std", "model_value_term"]
        actor_diagnostics = ["actor_q"] if actor_objective == "td3" else ["imagined_reward", "classifier_reward"]
        if entropy_coef > 0:
            actor_diagnostics.append("actor_entropy")
        self.out_keys = [
            "loss_model", "loss_reward", "loss_classifier", "loss_qvalue", "loss_actor",
            *model_diagnostics, *(["model_value"] if value_term else []),
            "reward_error", "classifier_accuracy", "q_mean", "target_q_mean", *actor_diagnostics,
        ]
        self._in_keys = None
        self._latent_sizes_checked = False

        self.convert_to_functional(encoder, "encoder", create_target_params=True)
        self.convert_to_functional(world_model, "world_model")
        self.convert_to_functional(reward_model, "reward_model")
        self.convert_to_functional(classifier, "classifier")
        self.convert_to_functional(
            qvalue_network, "qvalue_network", num_qvalue_nets, create_target_params=True
        )
        self.convert_to_functional(actor_network, "actor_network")

        low, high = self._action_bounds(action_spec, actor_network)
        device = next(iter(self.parameters())).device
        self.register_buffer("action_low", low.to(device))
        self.register_buffer("action_high", high.to(device))
        self.register_coeff_buffer("actor_std", float(actor_std), device=device)
        self.register_coeff_buffer("classifier_coef", float(classifier_coef), device=device)
        self._make_vmap()

    def _action_bounds(
        self, action_spec: TensorSpec | None, actor_network: TensorDictModule
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if action_spec is None:
            action_spec = getattr(actor_network, "spec", None)
        if isinstance(action_spec, Composite):
            # Keys are set after construction, so look the action up under the actor's out_key.
            action_spec = action_spec.get(actor_network.out_keys[0], None)
        if not isinstance(action_spec, Bounded):
            raise ValueError(
                "ALMLoss needs the action bounds: pass action_spec=<Bounded spec> or an actor "
                f"whose .spec is Bounded; got {type(action_spec).__name__}."
            )
        low, high = action_spec.space.low, action_spec.space.high
        if (low >= high).any():
            raise ValueError(f"Action bounds must satisfy low < high, got low={low} and high={high}.")
        return low.float(), high.float()

    def _make_vmap(self) -> None:
        self._vmap_qvalue_networkN0 = _vmap_func(
            self.qvalue_network,
            (None, 0),
            randomness=self.vmap_randomness,
            pseudo_vmap=self.deactivate_vmap,
        )

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(
                value=self.tensor_keys.state_action_value,
                reward=self.tensor_keys.reward,
                done=self.tensor_keys.done,
                terminated=self.tensor_keys.terminated,
            )
        self._set_in_keys()

    def make_value_estimator(self, value_type: ValueEstimators = None, **hyperparams):
        value_type, hp = self._prepare_value_estimator_kwargs(value_type, **hyperparams)
        if value_type is None:
            return self
        # Like TD3, the next value is computed by the loss (min of the target critics) and
        # written into the data, so the estimator needs no value network.
        dispatch_value_estimator(
            self,
            value_type,
            supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys={
                "value": self.tensor_keys.state_action_value,
                "reward": self.tensor_keys.reward,
                "done": self.tensor_keys.done,
                "terminated": self.tensor_keys.terminated,
            },
            value_network=None,
            **hp,
        )
        return self

    def _set_in_keys(self) -> None:
        keys = self.tensor_keys
        self._in_keys = [
            unravel_key(key)
            for key in (
                keys.observation,
                keys.action,
                ("next", keys.observation),
                ("next", keys.reward),
                ("next", keys.done),
                ("next", keys.terminated),
            )
        ]

    @property
    def in_keys(self) -> list[NestedKey]:
        if self._in_keys is None:
            self._set_in_keys()
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values: list[NestedKey]) -> None:
        self._in_keys = values

    # Frozen networks: detached parameters let gradients reach a network's inputs but not
    # its weights (the functional counterpart of the reference code's FreezeParameters).
    @property
    @_cache_values
    def _cached_detached_world_model_params(self) -> TensorDictBase:
        return self.world_model_params.detach()

    @property
    @_cache_values
    def _cached_detached_reward_model_params(self) -> TensorDictBase:
        return self.reward_model_params.detach()

    @property
    @_cache_values
    def _cached_detached_classifier_params(self) -> TensorDictBase:
        return self.classifier_params.detach()

    @property
    @_cache_values
    def _cached_detached_qvalue_network_params(self) -> TensorDictBase:
        return self.qvalue_network_params.detach()

    @property
    @_cache_values
    def _cached_detached_actor_network_params(self) -> TensorDictBase:
        return self.actor_network_params.detach()

    # ------------------------------------------------------------------ network calls
    def _latent_dist(
        self, network: ProbabilisticTensorDictSequential, params: TensorDictBase, inputs: TensorDictBase
    ) -> d.Distribution:
        with params.to_module(network, preserve_module_state=False):
            return network.get_dist(inputs)

    def _encode(self, observation: torch.Tensor, params: TensorDictBase) -> d.Distribution:
        inputs = TensorDict({self.tensor_keys.observation: observation}, batch_size=observation.shape[:-1])
        return self._latent_dist(self.encoder, params, inputs)

    def _encoder_dist_params(self, observation: torch.Tensor, params: TensorDictBase) -> TensorDictBase:
        """The encoder's distribution parameters, so one pass can serve several time steps."""
        inputs = TensorDict({self.tensor_keys.observation: observation}, batch_size=observation.shape[:-1])
        with params.to_module(self.encoder, preserve_module_state=False):
            return self.encoder.get_dist_params(inputs)

    def _predict_next_latent(self, latent: torch.Tensor, action: torch.Tensor, params: TensorDictBase) -> d.Distribution:
        keys = self.tensor_keys
        inputs = TensorDict({keys.latent: latent, keys.action: action}, batch_size=latent.shape[:-1])
        return self._latent_dist(self.world_model, params, inputs)

    def _predict_reward(self, latent: torch.Tensor, action: torch.Tensor, params: TensorDictBase) -> torch.Tensor:
        keys = self.tensor_keys
        inputs = TensorDict({keys.latent: latent, keys.action: action}, batch_size=latent.shape[:-1])
        with params.to_module(self.reward_model, preserve_module_state=False):
            return self.reward_model(inputs).get(keys.predicted_reward)

    def _classify(
        self, latent: torch.Tensor, action: torch.Tensor, next_latent: torch.Tensor, params: TensorDictBase
    ) -> torch.Tensor:
        keys = self.tensor_keys
        inputs = TensorDict(
            {keys.latent: latent, keys.action: action, keys.next_latent: next_latent},
            batch_size=latent.shape[:-1],
        )
        with params.to_module(self.classifier, preserve_module_state=False):
            return self.classifier(inputs).get(keys.classifier_logits)

    def _qvalues(self, latent: torch.Tensor, action: torch.Tensor, params: TensorDictBase) -> torch.Tensor:
        """All critics' values, shape ``[num_qvalue_nets, *batch, 1]``."""
        keys = self.tensor_keys
        inputs = TensorDict({keys.latent: latent, keys.action: action}, batch_size=latent.shape[:-1])
        return self._vmap_qvalue_networkN0(inputs, params).get(keys.state_action_value)

    def _sample_action(self, latent: torch.Tensor, params: TensorDictBase) -> torch.Tensor:
        """The actor's mean plus clipped Gaussian noise, clamped to the bounds straight-through.

        This is DrQ-v2/ALM's ``TruncatedNormal.sample(clip)``, not torchrl's TruncatedNormal:
        the noise is clipped, then the action is clamped to ``[low + 1e-6, high - 1e-6]`` in the
        forward pass while the gradient passes as if unclamped.
        """
        return self._sample_action_and_std(latent, params)[0]

    def _actor_output(self, latent: torch.Tensor, params: TensorDictBase) -> TensorDictBase:
        """The actor's output at ``latent``: the mean ``action`` (and ``action_std`` if it learns one)."""
        with params.to_module(self.actor_network, preserve_module_state=False):
            return self.actor_network(TensorDict({self.tensor_keys.latent: latent}, batch_size=latent.shape[:-1]))

    def _sample_action_and_std(self, latent: torch.Tensor, params: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_sample_action`, also returning the std it sampled with (the actor's, if it learns one)."""
        keys = self.tensor_keys
        output = self._actor_output(latent, params)
        mean = output.get(keys.action)
        std = output.get(keys.action_std, None)
        if std is None:
            if self.entropy_coef > 0:
                raise ValueError(
                    f"entropy_coef={self.entropy_coef} needs an actor that learns its std and writes "
                    f"{keys.action_std!r}, e.g. make_alm_modules(..., actor_std='learned')."
                )
            std = self.actor_std.expand_as(mean)
        noise = std * torch.randn_like(mean)
        if self.noise_clip is not None:
            noise = noise.clamp(-self.noise_clip, self.noise_clip)
        action = mean + noise
        clamped = torch.maximum(torch.minimum(action, self.action_high - 1e-6), self.action_low + 1e-6)
        return action + (clamped - action).detach(), std

    def _shape_reward(self, reward: torch.Tensor) -> torch.Tensor:
        """The rewards of the model and actor objectives: raw, or ``a (log(r + a) - log a)`` (Appendix A.8)."""
        if self.log_reward_shift is None:
            return reward
        shift = self.log_reward_shift
        return shift * torch.log1p(reward / shift)

    # ------------------------------------------------------------------ inputs
    def _check_input(self, tensordict: TensorDictBase) -> None:
        if tensordict.batch_dims != 2:
            raise ValueError(
                "ALMLoss expects a [B, K] batch of K-step slices (time is the last batch dim), "
                f"got batch_size={list(tensordict.batch_size)}; reshape the sampled slices with "
                "tensordict.reshape(B, K)."
            )
        missing = [key for key in self.in_keys if key not in tensordict.keys(True)]
        if missing:
            raise KeyError(f"ALMLoss input is missing the entries {missing}; expected {self.in_keys}.")

    def _check_latent_sizes(self, observation: torch.Tensor, action: torch.Tensor) -> None:
        """Fails once, with a clear message, if the networks disagree on the latent size."""
        if self._latent_sizes_checked:
            return
        # Means, not samples: the check must not consume random numbers.
        with torch.no_grad():
            latent = self._encode(observation[:1], self.encoder_params).mean
            try:
                next_latent = self._predict_next_latent(latent, action[:1], self.world_model_params).mean
            except RuntimeError as err:
                raise ValueError(
                    f"The encoder's latent (size {latent.shape[-1]}) does not fit the world model, "
                    f"whose input is latent + action ({action.shape[-1]}): {err}"
                ) from err
            if next_latent.shape[-1] != latent.shape[-1]:
                raise ValueError(
                    f"Latent sizes differ: the encoder gives {latent.shape[-1]}, the world model "
                    f"{next_latent.shape[-1]}; build both with the same latent_dim."
                )
        self._latent_sizes_checked = True

    def _prepare(self, tensordict: TensorDictBase) -> _SliceBatch:
        self._check_input(tensordict)
        keys = self.tensor_keys
        batch = _SliceBatch(
            observation=tensordict.get(keys.observation),
            action=tensordict.get(keys.action),
            next_observation=tensordict.get(("next", keys.observation)),
            reward=tensordict.get(("next", keys.reward)),
            done=tensordict.get(("next", keys.done)),
            terminated=tensordict.get(("next", keys.terminated)),
            first_step=tensordict[:, 0],
        )
        self._check_latent_sizes(batch.observation[:, 0], batch.action[:, 0])
        return batch

    def _target_encoder_dist_params(self, batch: _SliceBatch) -> TensorDictBase:
        """Target-encoder distribution parameters for s_0..s_K (``[B, K + 1]``), no gradient."""
        observations = torch.cat([batch.observation[:, :1], batch.next_observation], dim=1)
        with torch.no_grad():
            return self._encoder_dist_params(observations, self.target_encoder_params)

    def _reduce(self, loss: torch.Tensor, batch: _SliceBatch) -> torch.Tensor:
        """Reduces a per-slice loss (``[B]``), honouring masks and priority weights at t = 0."""
        return self._reduce_loss(
            loss, tensordict=batch.first_step, weights=self._maybe_get_priority_weight(batch.first_step)
        )

    # ------------------------------------------------------------------ the five losses
    def _model_loss(
        self, batch: _SliceBatch, target_dist_params: TensorDictBase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        online_dist = self._encode(batch.observation[:, 0], self.encoder_params)
        latent = online_dist.rsample()
        latents, kls = [], []
        for t in range(batch.horizon):
            prior = self._predict_next_latent(latent, batch.action[:, t], self.world_model_params)
            posterior = self.encoder.build_dist_from_params(target_dist_params[:, t + 1])
            kls.append(_kl_divergence(prior, posterior))
            latents.append(latent)
            latent = prior.rsample()
        kl = torch.stack(kls, dim=1)  # [B, K]
        # Reward model frozen: its gradient flows into the latents only.
        model_reward = self._shape_reward(
            self._predict_reward(torch.stack(latents, dim=1), batch.action, self._cached_detached_reward_model_params)
        ).squeeze(-1)  # [B, K]
        # Eq. 7: sum_t (KL_t - r_t) - Q(z_K, a_K), undiscounted over the K steps (footnote 2).
        kl_term = kl.sum(1) if self.kl_term else torch.zeros_like(model_reward[:, 0])
        loss = kl_term - model_reward.sum(1)
        metadata = {
            "kl": kl.detach().mean(),
            "model_kl_term": kl_term.detach().mean(),
            "model_reward": model_reward.detach().mean(),
            "latent_std": online_dist.stddev.detach().mean(),
        }
        if self.value_term:
            # a_K ~ pi(sg(z_K)) with no gradient into the actor; the critics are frozen too.
            last_action = self._sample_action(latent.detach(), self._cached_detached_actor_network_params)
            model_value = self._qvalues(latent, last_action, self._cached_detached_qvalue_network_params)
            model_value = model_value.min(0).values.squeeze(-1)  # [B]
            loss = loss - model_value
            metadata["model_value"] = model_value.detach().mean()
        metadata["model_value_term"] = (
            -metadata["model_value"] if self.value_term else torch.zeros((), device=loss.device)
        )
        return self._reduce(loss, batch), metadata

    def _reward_loss(self, batch: _SliceBatch, latent: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        predicted = self._predict_reward(latent, batch.action[:, 0], self.reward_model_params)
        error = (predicted - batch.reward[:, 0]).squeeze(-1)
        # Eq. 11: MSE to the environment's reward.
        loss = error.pow(2)
        return self._reduce(loss, batch), {"reward_error": error.detach().abs().mean()}

    def _classifier_loss(
        self, batch: _SliceBatch, latent: torch.Tensor, next_latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        action = batch.action[:, 0]
        batch_size = latent.shape[0]
        with torch.no_grad():
            fake_next_latent = self._predict_next_latent(
                latent, action, self._cached_detached_world_model_params
            ).sample()
        # Exactly half of the batch gets the model's next latent (label 0, "fake").
        is_real = torch.ones(batch_size, dtype=torch.bool, device=latent.device)
        is_real[torch.randperm(batch_size, device=latent.device)[: batch_size // 2]] = False
        mixed_next_latent = torch.where(is_real.unsqueeze(-1), next_latent, fake_next_latent)
        logits = self._classify(latent, action, mixed_next_latent, self.classifier_params)
        labels = is_real.long()
        # Eq. 9: cross-entropy of real (encoder) vs fake (model) next latents.
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return self._reduce(loss, batch), {"classifier_accuracy": accuracy.detach()}

    def _qvalue_loss(
        self, batch: _SliceBatch, latent: torch.Tensor, next_latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keys = self.tensor_keys
        with torch.no_grad():
            next_action = self._sample_action(next_latent, self._cached_detached_actor_network_params)
            next_value = self._qvalues(next_latent, next_action, self.target_qvalue_network_params).min(0).values
            transition = TensorDict(
                {
                    "next": {
                        keys.reward: batch.reward[:, 0],
                        keys.done: batch.done[:, 0],
                        keys.terminated: batch.terminated[:, 0],
                        keys.state_action_value: next_value,
                    }
                },
                batch_size=latent.shape[:1],
            )
            # y = r + gamma * (1 - terminated) * min_i Q_target_i(z', a')
            target_value = self.value_estimator.value_estimate(transition)  # [B, 1]
        qvalues = self._qvalues(latent, batch.action[:, 0], self.qvalue_network_params)  # [N, B, 1]
        # Eq. 10, averaged over the critics: (MSE(Q1, y) + MSE(Q2, y)) / 2 for two.
        loss = (qvalues - target_value).pow(2).mean(0).squeeze(-1)
        metadata = {"q_mean": qvalues.detach().mean(), "target_q_mean": target_value.detach().mean()}
        return self._reduce(loss, batch), metadata

    def _imagine(self, latent: torch.Tensor, horizon: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rolls the current actor through the frozen world model for ``horizon`` steps.

        Returns latents z_0..z_K, actions a_0..a_K and the actor's stds at z_0..z_{K-1}, each
        stacked on dim 1. Actions are sampled from pi(sg(z_t)); z_{t+1} is a reparameterised
        sample of m(z_t, a_t), so the gradient of later steps reaches earlier actions through
        the model. a_K only feeds the critics as sg(a_K), so it is sampled without a graph.
        """
        latents, actions, stds = [latent], [], []
        for _ in range(horizon):
            action, std = self._sample_action_and_std(latent.detach(), self.actor_network_params)
            latent = self._predict_next_latent(latent, action, self._cached_detached_world_model_params).rsample()
            actions.append(action)
            stds.append(std)
            latents.append(latent)
        with torch.no_grad():
            actions.append(self._sample_action(latent, self._cached_detached_actor_network_params))
        return torch.stack(latents, dim=1), torch.stack(actions, dim=1), torch.stack(stds, dim=1)

    def _td3_actor_loss(
        self, batch: _SliceBatch, latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The "TD3 with ALM representations" ablation: -min_i Q_i(z, a), a ~ pi(z) with clipped noise."""
        action = self._sample_action(latent, self.actor_network_params)
        qvalue = self._qvalues(latent, action, self._cached_detached_qvalue_network_params).min(0).values
        loss = -qvalue.squeeze(-1)
        return self._reduce(loss, batch), {"actor_q": qvalue.detach().mean()}

    def _actor_loss(self, batch: _SliceBatch, latent: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.actor_objective == "td3":
            return self._td3_actor_loss(batch, latent)
        horizon = batch.horizon
        latents, actions, stds = self._imagine(latent, horizon)  # [B, K + 1, Z], [B, K + 1, A], [B, K, A]
        current_latents, current_actions = latents[:, :-1], actions[:, :-1]
        imagined_reward = self._shape_reward(
            self._predict_reward(current_latents, current_actions, self._cached_detached_reward_model_params)
        )  # [B, K, 1]
        logits = self._classify(
            current_latents, current_actions, latents[:, 1:].detach(), self._cached_detached_classifier_params
        )
        # log C / (1 - C) for the "real" class: the intrinsic KL reward of Eq. 8.
        classifier_reward = logits[..., 1:] - logits[..., :1]
        reward = imagined_reward + self.classifier_coef * classifier_reward
        metadata = {}
        if self.entropy_coef > 0:
            # ALM-ENT: SAC's entropy bonus, the entropy of the actor's Gaussian at each imagined step.
            entropy = (0.5 * math.log(2 * math.pi * math.e) + stds.log()).sum(-1, keepdim=True)  # [B, K, 1]
            reward = reward + self.entropy_coef * entropy
            metadata["actor_entropy"] = entropy.detach().mean()
        # The critics see sg(a_t): the actor's gradient comes through the latents only. The
        # lambda-returns read q_1..q_K (q_0 never enters them), so z_0 is not evaluated.
        next_qvalues = self._qvalues(
            latents[:, 1:], actions[:, 1:].detach(), self._cached_detached_qvalue_network_params
        ).min(0).values  # [B, K, 1]
        # One discount for the critic target and the imagined returns, set via make_value_estimator.
        gamma = self.value_estimator.gamma
        never = torch.zeros_like(reward, dtype=torch.bool)
        # Eq. 8: G_t = r_t + gamma ((1 - lambda) q_{t+1} + lambda G_{t+1}), with G_K = q_K.
        returns = td_lambda_return_estimate(
            gamma, self.lmbda, next_qvalues, reward, done=never, terminated=never, time_dim=-2
        )  # [B, K, 1]
        discounts = gamma ** torch.arange(horizon, device=returns.device, dtype=returns.dtype)
        loss = -(discounts * returns.squeeze(-1)).mean(1)
        metadata["imagined_reward"] = imagined_reward.detach().mean()
        metadata["classifier_reward"] = classifier_reward.detach().mean()
        return self._reduce(loss, batch), metadata

    # ------------------------------------------------------------------ public API
    def _single_step_latents(self, target_dist_params: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """One target-encoder sample of z(s_0) and z(s_1), shared by the single-step losses."""
        with torch.no_grad():
            latents = self.encoder.build_dist_from_params(target_dist_params[:, :2]).sample()
        return latents[:, 0], latents[:, 1]

    def model_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 7: the encoder and world-model loss over the K recorded steps of each slice."""
        batch = self._prepare(tensordict)
        return self._model_loss(batch, self._target_encoder_dist_params(batch))

    def reward_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 11: the reward model's regression loss on each slice's first transition."""
        batch = self._prepare(tensordict)
        latent, _ = self._single_step_latents(self._target_encoder_dist_params(batch))
        return self._reward_loss(batch, latent)

    def classifier_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 9: the classifier's real-vs-model loss on each slice's first transition."""
        batch = self._prepare(tensordict)
        latent, next_latent = self._single_step_latents(self._target_encoder_dist_params(batch))
        return self._classifier_loss(batch, latent, next_latent)

    def qvalue_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 10: the critics' TD(0) loss on each slice's first transition."""
        batch = self._prepare(tensordict)
        latent, next_latent = self._single_step_latents(self._target_encoder_dist_params(batch))
        return self._qvalue_loss(batch, latent, next_latent)

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 8: minus the lambda-returns of a K-step imagined rollout from each slice's start."""
        batch = self._prepare(tensordict)
        latent, _ = self._single_step_latents(self._target_encoder_dist_params(batch))
        return self._actor_loss(batch, latent)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch = self._prepare(tensordict)
        # One target-encoder pass serves the model loss's KL targets, and one latent sample
        # z(s_0), z(s_1) serves the other four losses, as in the reference code.
        target_dist_params = self._target_encoder_dist_params(batch)
        latent, next_latent = self._single_step_latents(target_dist_params)
        loss_model, metadata_model = self._model_loss(batch, target_dist_params)
        loss_reward, metadata_reward = self._reward_loss(batch, latent)
        loss_classifier, metadata_classifier = self._classifier_loss(batch, latent, next_latent)
        loss_qvalue, metadata_qvalue = self._qvalue_loss(batch, latent, next_latent)
        loss_actor, metadata_actor = self._actor_loss(batch, latent)
        out = TensorDict(
            loss_model=loss_model,
            loss_reward=loss_reward,
            loss_classifier=loss_classifier,
            loss_qvalue=loss_qvalue,
            loss_actor=loss_actor,
            **metadata_model,
            **metadata_reward,
            **metadata_classifier,
            **metadata_qvalue,
            **metadata_actor,
        )
        self._clear_weakrefs(
            tensordict,
            "encoder_params",
            "target_encoder_params",
            "world_model_params",
            "reward_model_params",
            "classifier_params",
            "qvalue_network_params",
            "target_qvalue_network_params",
            "actor_network_params",
        )
        return out
