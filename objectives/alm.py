# This file imports only torch, tensordict and torchrl so that it can be dropped into
# torchrl/objectives/ as is.
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import (
    dispatch,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictModuleBase,
)
from tensordict.utils import NestedKey, unravel_key
from torch import distributions as d

from torchrl.data.tensor_specs import Bounded, Composite, TensorSpec
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import (
    _cache_values,
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


def _check_number(
    name: str, value, valid: Callable[[float], bool], expected: str
) -> float:
    """``value`` as a float, checked.

    Raises a ``ValueError`` naming ``name`` unless ``value`` is a real number (a Python or
    numpy scalar, or a one-element tensor) for which ``valid`` holds.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not valid(float(value))
    ):
        raise ValueError(f"{name} must be a number {expected}, got {value!r}.")
    return float(value)


class _NetworkCall:
    """A ``with`` block in which ``module`` holds other parameters.

    They are put in ``slots`` (``(table, name, tensor)``, see ``ALMLoss._parameter_slots``)
    or, without them, in through ``params.to_module``. The module's own parameters are back
    in place after the block.
    """

    __slots__ = ("module", "slots", "params", "own")

    def __init__(
        self,
        module: TensorDictModuleBase,
        slots: list[tuple[dict, str, torch.Tensor]] | None,
        params: TensorDictBase | None,
    ) -> None:
        self.module, self.slots, self.params = module, slots, params

    def __enter__(self) -> TensorDictModuleBase:
        if self.slots is None:
            self.own = self.params.to_module(self.module, return_swap=True)
        else:
            self.own = [table[name] for table, name, _ in self.slots]
            for table, name, tensor in self.slots:
                table[name] = tensor
        return self.module

    def __exit__(self, *exc_info) -> None:
        if self.slots is None:
            self.own.to_module(self.module, return_swap=False)
        else:
            for (table, name, _), tensor in zip(self.slots, self.own):
                table[name] = tensor


@dataclass
class _SliceBatch:
    """The entries of a ``[B, K]`` slice batch that the losses read, as plain tensors."""

    observation: torch.Tensor  # [B, K, *obs]: a vector or, e.g., [C, H, W] frames
    action: torch.Tensor  # [B, K, act]
    next_observation: torch.Tensor  # [B, K, *obs]
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
    of each slice, so one ``[B, K]`` batch serves the whole update. Each slice must lie within
    one trajectory (as :class:`~torchrl.data.replay_buffers.SliceSampler` draws them): the
    model loss reads all K steps, while masks (``("collector", "mask")``) and priority weights
    are read at each slice's first step and weigh the slice's losses as a whole.

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
        noise_clip (float or None, optional): the noise is clipped to
            ``[-noise_clip, noise_clip]``; ``None`` leaves it unclipped. Defaults to ``0.3``.
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
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule as Mod
        >>> from tensordict.nn import ProbabilisticTensorDictModule as ProbMod
        >>> from tensordict.nn import ProbabilisticTensorDictSequential as ProbSeq
        >>> from torchrl.data import Bounded
        >>> from torchrl.modules import MLP, Actor, IndependentNormal
        >>> from torchrl.objectives import SoftUpdate
        >>> from alm_torchrl.objectives import ALMLoss
        >>> n_obs, n_act, n_lat, B, K = 4, 2, 3, 8, 3
        >>> za, spec = ["latent", "action"], Bounded(-1.0, 1.0, shape=(n_act,))
        >>> def gaussian(in_keys, n_in, out_key):
        ...     return ProbSeq(Mod(MLP(n_in, 2 * n_lat), in_keys, ["params"]),
        ...         Mod(NormalParamExtractor(), ["params"], ["loc", "scale"]),
        ...         ProbMod(["loc", "scale"], [out_key], distribution_class=IndependentNormal))
        >>> def head(in_keys, n_in, n_out, out_key):
        ...     return Mod(MLP(n_in, n_out, num_cells=[32]), in_keys, [out_key])
        >>> loss = ALMLoss(
        ...     encoder=gaussian(["observation"], n_obs, "latent"),
        ...     world_model=gaussian(za, n_lat + n_act, "next_latent"),
        ...     reward_model=head(za, n_lat + n_act, 1, "predicted_reward"),
        ...     classifier=head(za + ["next_latent"], 2 * n_lat + n_act, 2, "classifier_logits"),
        ...     qvalue_network=[head(za, n_lat + n_act, 1, "state_action_value") for _ in "12"],
        ...     actor_network=Actor(torch.nn.Sequential(MLP(n_lat, n_act), torch.nn.Tanh()),
        ...                         in_keys=["latent"], spec=spec))
        >>> target_updater = SoftUpdate(loss, tau=0.005)
        >>> data = TensorDict({"observation": torch.randn(B, K, n_obs), "action": spec.rand((B, K)),
        ...     "next": {"observation": torch.randn(B, K, n_obs), "reward": torch.randn(B, K, 1),
        ...              "done": torch.zeros(B, K, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(B, K, 1, dtype=torch.bool)}}, batch_size=[B, K])
        >>> losses = loss(data)
        >>> sorted(key for key in losses.keys() if key.startswith("loss_"))
        ['loss_actor', 'loss_classifier', 'loss_model', 'loss_qvalue', 'loss_reward']
    """

    @dataclass
    class _AcceptedKeys:
        """Maintains default values for all configurable tensordict keys.

        This class defines which tensordict keys can be set using '.set_keys(key_name=key_value)' and their
        default values.

        Attributes:
            observation (NestedKey): the observation, read at the root and under ``"next"``;
                the encoder's input, of any shape (a vector, or e.g. ``[C, H, W]`` image
                frames under ``"pixels"``). Defaults to ``"observation"``.
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
            priority (NestedKey): where :meth:`forward` writes the priority of each sampled
                transition into the input, for a prioritized sampler: the critics' squared TD
                error at the slice's first transition (the largest over critics, as
                :class:`~torchrl.objectives.TD3Loss` does), broadcast over the slice's K
                steps. Defaults to ``"td_error"``.
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
        priority: NestedKey = "td_error"
        priority_weight: NestedKey = "priority_weight"
        action_std: NestedKey = "action_std"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0,)
    _schedulable_buffers = frozenset({"actor_std", "classifier_coef"})

    LOSS_NETWORKS: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_model": ("encoder", "world_model"),
        "loss_reward": ("reward_model",),
        "loss_classifier": ("classifier",),
        "loss_qvalue": ("qvalue_network",),
        "loss_actor": ("actor_network",),
    }
    """The networks whose parameters each loss term trains (and no other term does).

    ``<name>_params`` holds the parameters of network ``<name>``;
    :meth:`trained_parameters` returns them by loss term.
    """

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
        noise_clip: float | None = 0.3,
        reduction: str | None = None,
        deactivate_vmap: bool = False,
        kl_term: bool = True,
        value_term: bool = True,
        actor_objective: str = "svg",
        log_reward_shift: float | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        if reduction is None:
            reduction = "mean"
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(
                f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}."
            )
        lmbda = _check_number(
            "lmbda", lmbda, lambda x: 0 <= x <= 1, "in [0, 1] (paper: 0.95)"
        )
        classifier_coef = _check_number(
            "classifier_coef",
            classifier_coef,
            lambda x: x >= 0,
            ">= 0 (paper: 0.1; 0 drops the bonus)",
        )
        actor_std = _check_number("actor_std", actor_std, lambda x: x >= 0, ">= 0")
        if noise_clip is not None:
            noise_clip = _check_number(
                "noise_clip", noise_clip, lambda x: x >= 0, ">= 0 or None (paper: 0.3)"
            )
        if actor_objective not in ("svg", "td3"):
            raise ValueError(
                f"actor_objective must be 'svg' or 'td3', got {actor_objective!r}."
            )
        if log_reward_shift is not None:
            log_reward_shift = _check_number(
                "log_reward_shift",
                log_reward_shift,
                lambda x: x > 0,
                "> 0 or None (paper: 10000)",
            )
        entropy_coef = _check_number(
            "entropy_coef", entropy_coef, lambda x: x >= 0, ">= 0"
        )
        for name, network in (("encoder", encoder), ("world_model", world_model)):
            if not hasattr(network, "get_dist"):
                raise TypeError(
                    f"{name} must be a probabilistic module with get_dist() "
                    f"(e.g. ProbabilisticTensorDictSequential), got {type(network).__name__}."
                )
        if isinstance(qvalue_network, (list, tuple)):
            if len(qvalue_network) == 0:
                raise ValueError(
                    "qvalue_network is an empty list; pass at least one critic."
                )
            num_qvalue_nets = len(qvalue_network)
        if (
            isinstance(num_qvalue_nets, bool)
            or not isinstance(num_qvalue_nets, numbers.Integral)
            or num_qvalue_nets < 1
        ):
            raise ValueError(
                f"num_qvalue_nets must be an integer >= 1, got {num_qvalue_nets!r}."
            )
        num_qvalue_nets = int(num_qvalue_nets)
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
        model_diagnostics = [
            "kl",
            "model_kl_term",
            "model_reward",
            "latent_std",
            "model_value_term",
        ]
        actor_diagnostics = (
            ["actor_q"]
            if actor_objective == "td3"
            else ["imagined_reward", "classifier_reward"]
        )
        if entropy_coef > 0:
            actor_diagnostics.append("actor_entropy")
        self.out_keys = [
            "loss_model",
            "loss_reward",
            "loss_classifier",
            "loss_qvalue",
            "loss_actor",
            *model_diagnostics,
            *(["model_value"] if value_term else []),
            "reward_error",
            "classifier_accuracy",
            "q_mean",
            "target_q_mean",
            *actor_diagnostics,
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
        if isinstance(qvalue_network, (list, tuple)) and num_qvalue_nets == 1:
            # convert_to_functional keeps a one-module list as expanded views of the
            # module's weights, which are not parameters: nothing would train them.
            self.qvalue_network_params = TensorDictParams(
                self.qvalue_network_params.data.clone()
            )
        self.convert_to_functional(actor_network, "actor_network")

        low, high = self._action_bounds(action_spec, actor_network)
        device = next(iter(self.parameters())).device
        self.register_buffer("action_low", low.to(device))
        self.register_buffer("action_high", high.to(device))
        self.register_coeff_buffer("actor_std", float(actor_std), device=device)
        self.register_coeff_buffer(
            "classifier_coef", float(classifier_coef), device=device
        )
        self._make_vmap()
        # Built now rather than at first use, so that a state dict loads into a loss that has
        # not run yet (the estimator's gamma is part of the state).
        self.make_value_estimator()

    def __getstate__(self) -> dict:
        # The cached detached parameters and parameter slots share the parameters' storage; a
        # deep copy or a pickle would give them storage of their own, which the copy's
        # optimizer never updates. Leave them out: they are rebuilt on first use. The vmapped
        # critic call is a closure over this loss's critic module: rebuilt on unpickling.
        state = super().__getstate__()
        return {
            key: value
            for key, value in state.items()
            if not key.startswith("_cache") and key != "_vmap_qvalue_networkN0"
        }

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
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
            raise ValueError(
                f"Action bounds must satisfy low < high, got low={low} and high={high}."
            )
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
        if value_type is None:  # an estimator instance or class, already installed
            # It reads the next value where the loss writes it, and the loss's data keys.
            self._forward_value_estimator_keys()
            return self
        gamma = hp.get("gamma")
        if gamma is not None:
            _check_number(
                "gamma", gamma, lambda x: 0 < x <= 1, "in (0, 1] (paper: 0.99)"
            )
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
    # ``.data``, not ``.detach()``: a locked TensorDictParams (a list of critics) memoises
    # ``detach()``, and the memo would outlive ``_erase_cache`` when the loss is cast or moved.
    @property
    @_cache_values
    def _cached_detached_world_model_params(self) -> TensorDictBase:
        return self.world_model_params.data

    @property
    @_cache_values
    def _cached_detached_reward_model_params(self) -> TensorDictBase:
        return self.reward_model_params.data

    @property
    @_cache_values
    def _cached_detached_classifier_params(self) -> TensorDictBase:
        return self.classifier_params.data

    @property
    @_cache_values
    def _cached_detached_qvalue_network_params(self) -> TensorDictBase:
        return self.qvalue_network_params.data

    @property
    @_cache_values
    def _cached_detached_actor_network_params(self) -> TensorDictBase:
        return self.actor_network_params.data

    # ------------------------------------------------------------------ network calls
    def _params(self, network: str, kind: str) -> TensorDictBase:
        """The ``kind`` parameters of ``network``.

        Its trained ones (``"online"``), the same tensors detached (``"detached"``: the network
        is frozen) or its target ones (``"target"``).
        """
        if kind == "online":
            return getattr(self, f"{network}_params")
        if kind == "detached":
            return getattr(self, f"_cached_detached_{network}_params")
        return getattr(self, f"target_{network}_params")

    def _parameter_slots(
        self, network: str, kind: str, critic: int | None
    ) -> list[tuple[dict, str, torch.Tensor]] | None:
        """Where each ``kind`` parameter of ``network`` goes in its module, listed once.

        ``(table, name, tensor)``: ``table`` is a submodule's ``_parameters`` or ``_buffers``,
        ``tensor`` the parameter to put under ``name``; a parameter the module already holds
        (a network's own trained ones) is left out. Cached with the detached parameters, so
        dropped and listed again when the loss is moved (``LossModule._erase_cache``); under
        ``torch.compile`` only read (``None`` until an eager call has listed them), as it is
        for a network whose parameters are not all plain table entries.
        """
        key = ("slots", network, kind, critic)
        if torch.compiler.is_compiling():
            return self.__dict__.get("_cache", {}).get(key)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            module = getattr(self, network)
            slots = []
            for name, tensor in self._network_params(network, kind, critic).items(
                include_nested=True, leaves_only=True
            ):
                *path, leaf = (name,) if isinstance(name, str) else name
                owner = module.get_submodule(".".join(path))
                table = (
                    owner._parameters if leaf in owner._parameters else owner._buffers
                )
                if leaf not in table:  # not a plain attribute (e.g. a parametrization)
                    slots = None
                    break
                if table[leaf] is not tensor:
                    slots.append((table, leaf, tensor))
            cache[key] = slots
        return cache[key]

    def _network_params(
        self, network: str, kind: str, critic: int | None
    ) -> TensorDictBase:
        params = self._params(network, kind)
        return params if critic is None else params[critic]

    def _network(
        self, network: str, kind: str, critic: int | None = None
    ) -> _NetworkCall:
        """``network`` holding its ``kind`` parameters for a ``with`` block, its own again after.

        ``critic`` picks one critic of the critics' stacked parameters.

        TorchRL's losses swap the parameters into the module around each call with
        ``params.to_module(module)``. At small sizes that swap and its undoing cost more than
        the network's forward pass (a tiny reward model: 178 us against 63), and an ALM update
        makes about 20 network calls. So the loss lists, once, which entry of which
        submodule's parameter table each parameter goes to (:meth:`_parameter_slots`) and
        swaps the table entries directly. The module is the user's own, with its hooks and
        training mode, and holds its own parameters again after the block, also under
        ``torch.compile`` (so the guards of a compiled call's graph hold at the next call).
        Without the list, ``to_module`` does the swap. Blocks of one network do not nest (a
        network's own parameters are left out of its list).
        """
        slots = self._parameter_slots(network, kind, critic)
        params = (
            None if slots is not None else self._network_params(network, kind, critic)
        )
        return _NetworkCall(getattr(self, network), slots, params)

    def _encode(self, observation: torch.Tensor, kind: str) -> d.Distribution:
        # No batch size: an observation may have several feature dims (stacked image
        # frames, [..., C, H, W]); the latent's batch shape is the encoder output's.
        inputs = TensorDict({self.tensor_keys.observation: observation})
        with self._network("encoder", kind) as encoder:
            return encoder.get_dist(inputs)

    def _encoder_dist_params(
        self, observation: torch.Tensor, kind: str
    ) -> TensorDictBase:
        """The encoder's distribution parameters for ``[B, T, *obs]`` observations (``[B, T]``).

        One pass serves several time steps: index the result along ``T``.
        """
        inputs = TensorDict(
            {self.tensor_keys.observation: observation},
            batch_size=observation.shape[:2],
        )
        with self._network("encoder", kind) as encoder:
            return encoder.get_dist_params(inputs)

    def _predict_next_latent(
        self,
        world_model: TensorDictModuleBase,
        latent: torch.Tensor,
        action: torch.Tensor,
    ) -> d.Distribution:
        """m(z'|z, a) from ``world_model``, inside a :meth:`_network` block."""
        keys = self.tensor_keys
        inputs = TensorDict(
            {keys.latent: latent, keys.action: action}, batch_size=latent.shape[:-1]
        )
        return world_model.get_dist(inputs)

    def _predict_reward(
        self, latent: torch.Tensor, action: torch.Tensor, kind: str
    ) -> torch.Tensor:
        keys = self.tensor_keys
        inputs = TensorDict(
            {keys.latent: latent, keys.action: action}, batch_size=latent.shape[:-1]
        )
        with self._network("reward_model", kind) as reward_model:
            return reward_model(inputs).get(keys.predicted_reward)

    def _classify(
        self,
        latent: torch.Tensor,
        action: torch.Tensor,
        next_latent: torch.Tensor,
        kind: str,
    ) -> torch.Tensor:
        keys = self.tensor_keys
        inputs = TensorDict(
            {keys.latent: latent, keys.action: action, keys.next_latent: next_latent},
            batch_size=latent.shape[:-1],
        )
        with self._network("classifier", kind) as classifier:
            return classifier(inputs).get(keys.classifier_logits)

    def _qvalues(
        self, latent: torch.Tensor, action: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """All critics' values, shape ``[num_qvalue_nets, *batch, 1]``."""
        keys = self.tensor_keys
        inputs = TensorDict(
            {keys.latent: latent, keys.action: action}, batch_size=latent.shape[:-1]
        )
        if not self.deactivate_vmap:
            return self._vmap_qvalue_networkN0(
                inputs, self._params("qvalue_network", kind)
            ).get(keys.state_action_value)
        qvalues = []
        for critic in range(self.num_qvalue_nets):
            with self._network("qvalue_network", kind, critic) as qvalue_network:
                qvalues.append(qvalue_network(inputs).get(keys.state_action_value))
        return torch.stack(qvalues)

    def _min_qvalue(
        self, latent: torch.Tensor, action: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """Clipped double-Q: the smallest critic value, shape ``[*batch, 1]``."""
        return self._qvalues(latent, action, kind).min(0).values

    def _sample_action(self, latent: torch.Tensor, kind: str) -> torch.Tensor:
        """:meth:`sample_action` with the actor's ``kind`` parameters."""
        with self._network("actor_network", kind) as actor:
            return self._sample_action_and_std(actor, latent)[0]

    def _actor_mean_and_std(
        self, actor: TensorDictModuleBase, latent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean action of ``actor`` (inside a :meth:`_network` block) and the std of its samples."""
        keys = self.tensor_keys
        output = actor(TensorDict({keys.latent: latent}, batch_size=latent.shape[:-1]))
        mean = output.get(keys.action)
        std = output.get(keys.action_std, None)
        if std is None:
            if self.entropy_coef > 0:
                raise ValueError(
                    f"entropy_coef={self.entropy_coef} needs an actor that learns its std "
                    f"and writes {keys.action_std!r} next to its mean."
                )
            std = self.actor_std.expand_as(mean)
        return mean, std

    def _sample_action_and_std(
        self, actor: TensorDictModuleBase, latent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_sample_action`, also returning the std it sampled with."""
        mean, std = self._actor_mean_and_std(actor, latent)
        noise = std * torch.randn_like(mean)
        if self.noise_clip is not None:
            noise = noise.clamp(-self.noise_clip, self.noise_clip)
        action = mean + noise
        clamped = torch.maximum(
            torch.minimum(action, self.action_high - 1e-6), self.action_low + 1e-6
        )
        return action + (clamped - action).detach(), std

    def _actor_step(
        self, actor: TensorDictModuleBase, latent: torch.Tensor, sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if sample:
            return self._sample_action_and_std(actor, latent)
        return self._actor_mean_and_std(actor, latent)

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
            raise KeyError(
                f"ALMLoss input is missing the entries {missing}; expected {self.in_keys}."
            )
        keys = self.tensor_keys
        for key in (keys.reward, keys.done, keys.terminated):
            shape = tensordict.get(("next", key)).shape
            if shape != (*tensordict.batch_size, 1):
                raise ValueError(
                    f"ALMLoss expects {unravel_key(('next', key))} of shape [B, K, 1] = "
                    f"{[*tensordict.batch_size, 1]}, got {list(shape)}."
                )

    def _check_latent_sizes(
        self, observation: torch.Tensor, action: torch.Tensor
    ) -> None:
        """Fails once, with a clear message, if the networks disagree on the latent size."""
        if self._latent_sizes_checked:
            return
        # Means, not samples: the check must not consume random numbers.
        with torch.no_grad():
            latent = self._encode(observation[:1], "online").mean
            try:
                with self._network("world_model", "online") as world_model:
                    next_latent = self._predict_next_latent(
                        world_model, latent, action[:1]
                    ).mean
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
        observations = torch.cat(
            [batch.observation[:, :1], batch.next_observation], dim=1
        )
        with torch.no_grad():
            return self._encoder_dist_params(observations, "target")

    def _reduce(self, loss: torch.Tensor, batch: _SliceBatch) -> torch.Tensor:
        """Reduces a per-slice loss (``[B]``), honouring masks and priority weights at t = 0."""
        return self._reduce_loss(
            loss,
            tensordict=batch.first_step,
            weights=self._maybe_get_priority_weight(batch.first_step),
        )

    # ------------------------------------------------------------------ the five losses
    def _model_loss(
        self, batch: _SliceBatch, target_dist_params: TensorDictBase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        online_dist = self._encode(batch.observation[:, 0], "online")
        latent = online_dist.rsample()
        latents, kls = [], []
        with self._network("world_model", "online") as world_model:
            for t in range(batch.horizon):
                prior = self._predict_next_latent(
                    world_model, latent, batch.action[:, t]
                )
                posterior = self.encoder.build_dist_from_params(
                    target_dist_params[:, t + 1]
                )
                kls.append(_kl_divergence(prior, posterior))
                latents.append(latent)
                latent = prior.rsample()
        kl = torch.stack(kls, dim=1)  # [B, K]
        # Reward model frozen: its gradient flows into the latents only.
        model_reward = self._shape_reward(
            self._predict_reward(
                torch.stack(latents, dim=1),
                batch.action,
                "detached",
            )
        ).squeeze(
            -1
        )  # [B, K]
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
            last_action = self._sample_action(latent.detach(), "detached")
            model_value = self._min_qvalue(latent, last_action, "detached").squeeze(
                -1
            )  # [B]
            loss = loss - model_value
            metadata["model_value"] = model_value.detach().mean()
        metadata["model_value_term"] = (
            -metadata["model_value"]
            if self.value_term
            else torch.zeros((), device=loss.device)
        )
        return self._reduce(loss, batch), metadata

    def _reward_loss(
        self, batch: _SliceBatch, latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        predicted = self._predict_reward(latent, batch.action[:, 0], "online")
        error = (predicted - batch.reward[:, 0]).squeeze(-1)
        # Eq. 11: MSE to the environment's reward.
        loss = error.pow(2)
        return self._reduce(loss, batch), {"reward_error": error.detach().abs().mean()}

    def _classifier_loss(
        self, batch: _SliceBatch, latent: torch.Tensor, next_latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        action = batch.action[:, 0]
        batch_size = latent.shape[0]
        with torch.no_grad(), self._network("world_model", "detached") as world_model:
            fake_next_latent = self._predict_next_latent(
                world_model, latent, action
            ).sample()
        # Exactly half of the batch gets the model's next latent (label 0, "fake").
        is_real = torch.ones(batch_size, dtype=torch.bool, device=latent.device)
        is_real[
            torch.randperm(batch_size, device=latent.device)[: batch_size // 2]
        ] = False
        mixed_next_latent = torch.where(
            is_real.unsqueeze(-1), next_latent, fake_next_latent
        )
        logits = self._classify(latent, action, mixed_next_latent, "online")
        labels = is_real.long()
        # Eq. 9: cross-entropy of real (encoder) vs fake (model) next latents.
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        accuracy = (logits.argmax(-1) == labels).to(logits.dtype).mean()
        return self._reduce(loss, batch), {"classifier_accuracy": accuracy.detach()}

    def _qvalue_loss(
        self, batch: _SliceBatch, latent: torch.Tensor, next_latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keys = self.tensor_keys
        with torch.no_grad():
            next_action = self._sample_action(next_latent, "detached")
            next_value = self._min_qvalue(next_latent, next_action, "target")
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
        qvalues = self._qvalues(latent, batch.action[:, 0], "online")  # [N, B, 1]
        squared_errors = (qvalues - target_value).pow(2).squeeze(-1)  # [N, B]
        # Eq. 10, averaged over the critics: (MSE(Q1, y) + MSE(Q2, y)) / 2 for two.
        loss = squared_errors.mean(0)
        metadata = {
            "td_error": squared_errors.detach().max(0).values,
            "q_mean": qvalues.detach().mean(),
            "target_q_mean": target_value.detach().mean(),
        }
        return self._reduce(loss, batch), metadata

    def _imagined_rewards(
        self, rollout: TensorDictBase
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward model and classifier reward of each imagined step t < K (``[*B, K, 1]``).

        Both networks are frozen; the reward's gradient reaches z_t and a_t, the classifier
        sees sg(z_{t+1}).
        """
        keys = self.tensor_keys
        latents, actions = rollout.get(keys.latent), rollout.get(keys.action)
        current_latents, current_actions = latents[..., :-1, :], actions[..., :-1, :]
        reward = self._predict_reward(current_latents, current_actions, "detached")
        logits = self._classify(
            current_latents,
            current_actions,
            latents[..., 1:, :].detach(),
            "detached",
        )
        # log C / (1 - C) for the "real" class: the intrinsic KL reward of Eq. 8.
        return reward, logits[..., 1:] - logits[..., :1]

    def _td3_actor_loss(
        self, batch: _SliceBatch, latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The "TD3 with ALM representations" ablation: -min_i Q_i(z, a), a ~ pi(z) with clipped noise."""
        action = self._sample_action(latent, "online")
        qvalue = self._min_qvalue(latent, action, "detached")
        loss = -qvalue.squeeze(-1)
        return self._reduce(loss, batch), {"actor_q": qvalue.detach().mean()}

    def _actor_loss(
        self, batch: _SliceBatch, latent: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.actor_objective == "td3":
            return self._td3_actor_loss(batch, latent)
        keys = self.tensor_keys
        horizon = batch.horizon
        rollout = self.imagine(latent, horizon)  # [B, K + 1]
        imagined_reward, classifier_reward = self._imagined_rewards(rollout)
        imagined_reward = self._shape_reward(imagined_reward)  # [B, K, 1]
        reward = imagined_reward + self.classifier_coef * classifier_reward
        metadata = {}
        if self.entropy_coef > 0:
            # ALM-ENT: SAC's entropy bonus, the entropy of the actor's Gaussian at each step.
            stds = rollout.get(keys.action_std)[:, :-1]
            entropy = (0.5 * math.log(2 * math.pi * math.e) + stds.log()).sum(
                -1, keepdim=True
            )  # [B, K, 1]
            reward = reward + self.entropy_coef * entropy
            metadata["actor_entropy"] = entropy.detach().mean()
        # The critics see sg(a_t): the actor's gradient comes through the latents only. The
        # lambda-returns read q_1..q_K (q_0 never enters them), so z_0 is not evaluated.
        next_qvalues = self._min_qvalue(
            rollout.get(keys.latent)[:, 1:],
            rollout.get(keys.action)[:, 1:].detach(),
            "detached",
        )  # [B, K, 1]
        # One discount for the critic target and the imagined returns (make_value_estimator).
        gamma = self.value_estimator.gamma
        never = torch.zeros_like(reward, dtype=torch.bool)
        # Eq. 8: G_t = r_t + gamma ((1 - lambda) q_{t+1} + lambda G_{t+1}), with G_K = q_K.
        returns = td_lambda_return_estimate(
            gamma,
            self.lmbda,
            next_qvalues,
            reward,
            done=never,
            terminated=never,
            time_dim=-2,
        )  # [B, K, 1]
        discounts = gamma ** torch.arange(
            horizon, device=returns.device, dtype=returns.dtype
        )
        loss = -(discounts * returns.squeeze(-1)).mean(1)
        metadata["imagined_reward"] = imagined_reward.detach().mean()
        metadata["classifier_reward"] = classifier_reward.detach().mean()
        return self._reduce(loss, batch), metadata

    def _single_step_latents(
        self, target_dist_params: TensorDictBase
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One target-encoder sample of z(s_0) and z(s_1), shared by the single-step losses."""
        with torch.no_grad():
            latents = self.encoder.build_dist_from_params(
                target_dist_params[:, :2]
            ).sample()
        return latents[:, 0], latents[:, 1]

    # ------------------------------------------------------------------ public API
    def trained_parameters(self, loss_key: str) -> dict[str, torch.nn.Parameter]:
        """The parameters the loss term ``loss_key`` trains, named as in ``named_parameters()``.

        Each term reaches only the networks :attr:`LOSS_NETWORKS` lists for it, so an optimiser
        per term (or per group of terms) steps exactly what that term trains.
        """
        if loss_key not in self.LOSS_NETWORKS:
            raise KeyError(
                f"Unknown loss term {loss_key!r}; expected one of {list(self.LOSS_NETWORKS)}."
            )
        prefixes = tuple(f"{name}_params." for name in self.LOSS_NETWORKS[loss_key])
        return {
            name: param
            for name, param in self.named_parameters()
            if name.startswith(prefixes)
        }

    def sample_action(self, latent: torch.Tensor) -> torch.Tensor:
        """An action of the current actor at ``latent``, as the losses sample it.

        The actor's mean plus Gaussian noise of std ``actor_std`` (or the actor's own std)
        clipped to ``[-noise_clip, noise_clip]``, then clamped to
        ``[low + 1e-6, high - 1e-6]`` in the forward pass while the gradient passes as if
        unclamped: DrQ-v2/ALM's ``TruncatedNormal.sample(clip)``, not torchrl's
        :class:`~torchrl.modules.TruncatedNormal`.
        """
        return self._sample_action(latent, "online")

    def imagine(
        self,
        latent: torch.Tensor,
        horizon: int,
        *,
        first_action: torch.Tensor | None = None,
        sample_actions: bool = True,
        sample_latents: bool = True,
    ) -> TensorDictBase:
        """Rolls the current actor through the frozen world model for ``horizon`` steps.

        As in the actor loss (Eq. 8), by default: each action is drawn from pi(sg(z_t)) as
        :meth:`sample_action` draws it, and z_{t+1} is a reparameterised sample of
        m(z_t, a_t), so the gradient of later steps reaches earlier actions through the world
        model, whose parameters get none. a_K only feeds the critics as sg(a_K), so it is
        drawn without a graph.

        Args:
            latent (torch.Tensor): z_0, shape ``[*B, latent]``.
            horizon (int): the number K of imagined steps.

        Keyword Args:
            first_action (torch.Tensor, optional): a_0, shape ``[*B, action]``, instead of
                the actor's.
            sample_actions (bool, optional): sample the actions; ``False`` takes the actor's
                means. Defaults to ``True``.
            sample_latents (bool, optional): sample the next latents; ``False`` takes the world
                model's means. Defaults to ``True``.

        Returns:
            A TensorDict of batch size ``[*B, K + 1]`` holding z_0..z_K under the
            ``latent`` key, a_0..a_K under ``action`` and the std each action was drawn with
            under ``action_std`` (the keys of :attr:`tensor_keys`).
        """
        if horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}.")
        latents, actions, stds = [latent], [], []
        with self._network("actor_network", "online") as actor, self._network(
            "world_model", "detached"
        ) as world_model:
            for t in range(horizon):
                if t == 0 and first_action is not None:
                    action, std = first_action, torch.zeros_like(first_action)
                else:
                    action, std = self._actor_step(
                        actor, latent.detach(), sample_actions
                    )
                prior = self._predict_next_latent(world_model, latent, action)
                latent = prior.rsample() if sample_latents else prior.mean
                actions.append(action)
                stds.append(std)
                latents.append(latent)
        with torch.no_grad(), self._network("actor_network", "detached") as actor:
            action, std = self._actor_step(actor, latent, sample_actions)
        actions.append(action)
        stds.append(std)
        keys = self.tensor_keys
        return TensorDict(
            {
                keys.latent: torch.stack(latents, dim=-2),
                keys.action: torch.stack(actions, dim=-2),
                keys.action_std: torch.stack(stds, dim=-2),
            },
            batch_size=(*latents[0].shape[:-1], horizon + 1),
        )

    @torch.no_grad()
    def lower_bound(
        self,
        observation: torch.Tensor,
        horizon: int = 3,
        action: torch.Tensor | None = None,
        *,
        target_encoder: bool = False,
        sample_latents: bool = False,
    ) -> torch.Tensor:
        r"""The K-step lower bound of ALM at each state (the bias study of Appendix E, Fig. 4, 8).

        .. math::

            LB(s) = \sum_{t=0}^{K-1} \gamma^t \left(r(z_t, a_t) + c \log
            \frac{C(z_t, a_t, z_{t+1})}{1 - C(z_t, a_t, z_{t+1})}\right)
            + \gamma^K \min_i Q_i(z_K, a_K)

        rolled out by :meth:`imagine` from z_0 = e(s) with the actor's mean actions, with
        ``c`` the ``classifier_coef`` and ``gamma`` the value estimator's discount: the
        objective of Eq. 8 with lambda = 1, evaluated instead of optimised. The latents
        z_0 .. z_K are the encoder's and the world model's means, or samples of them with
        ``sample_latents=True`` (the reference code's evaluation samples them).

        Args:
            observation (torch.Tensor): states, shape ``[*B, *observation]`` (a vector or,
                e.g., ``[C, H, W]`` image frames).
            horizon (int, optional): K. Defaults to ``3`` (the paper's).
            action (torch.Tensor, optional): a_0, shape ``[*B, action]`` (e.g. the action
                taken there); defaults to the actor's mean.

        Keyword Args:
            target_encoder (bool, optional): encode with the target encoder (as the reference
                code does) instead of the online one. Defaults to ``False``.
            sample_latents (bool, optional): sample z_0 and every z_{t+1} (as the reference
                code does) instead of taking means. Defaults to ``False``.

        Returns:
            One value per state, shape ``[*B]``.
        """
        dist = self._encode(observation, "target" if target_encoder else "online")
        latent = dist.rsample() if sample_latents else dist.mean
        rollout = self.imagine(
            latent,
            horizon,
            first_action=action,
            sample_actions=False,
            sample_latents=sample_latents,
        )
        reward, classifier_reward = self._imagined_rewards(rollout)
        step_rewards = (reward + self.classifier_coef * classifier_reward).squeeze(-1)
        gamma = float(self.value_estimator.gamma)
        discounts = gamma ** torch.arange(
            horizon + 1, device=latent.device, dtype=latent.dtype
        )
        last_value = self._min_qvalue(
            rollout.get(self.tensor_keys.latent)[..., -1, :],
            rollout.get(self.tensor_keys.action)[..., -1, :],
            "detached",
        ).squeeze(-1)
        return (discounts[:-1] * step_rewards).sum(-1) + discounts[-1] * last_value

    def model_loss(
        self, tensordict: TensorDictBase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 7: the encoder and world-model loss over the K recorded steps of each slice."""
        batch = self._prepare(tensordict)
        return self._model_loss(batch, self._target_encoder_dist_params(batch))

    def reward_loss(
        self, tensordict: TensorDictBase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 11: the reward model's regression loss on each slice's first transition."""
        batch = self._prepare(tensordict)
        latent, _ = self._single_step_latents(self._target_encoder_dist_params(batch))
        return self._reward_loss(batch, latent)

    def classifier_loss(
        self, tensordict: TensorDictBase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 9: the classifier's real-vs-model loss on each slice's first transition."""
        batch = self._prepare(tensordict)
        latent, next_latent = self._single_step_latents(
            self._target_encoder_dist_params(batch)
        )
        return self._classifier_loss(batch, latent, next_latent)

    def qvalue_loss(
        self, tensordict: TensorDictBase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 10: the critics' TD(0) loss on each slice's first transition."""
        batch = self._prepare(tensordict)
        latent, next_latent = self._single_step_latents(
            self._target_encoder_dist_params(batch)
        )
        return self._qvalue_loss(batch, latent, next_latent)

    def actor_loss(
        self, tensordict: TensorDictBase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        loss_classifier, metadata_classifier = self._classifier_loss(
            batch, latent, next_latent
        )
        loss_qvalue, metadata_qvalue = self._qvalue_loss(batch, latent, next_latent)
        loss_actor, metadata_actor = self._actor_loss(batch, latent)
        # For a prioritized sampler: the slice's TD error, on each of its K transitions.
        td_error = metadata_qvalue.pop("td_error")
        tensordict.set(
            self.tensor_keys.priority,
            td_error.unsqueeze(-1).expand(tensordict.shape),
        )
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
