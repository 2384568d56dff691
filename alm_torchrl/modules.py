"""ALM's networks as TensorDict modules, and a factory that builds them from env specs.

Architectures follow the ALM paper's Table 4 and the reference code: every Linear has
an orthogonal weight and a zero bias; activations are ELU except the first layer of the
reward, classifier and critic heads, which is LayerNorm + Tanh. Image observations get
DrQ-v2's convolutional encoder (Yarats et al., 2021, arXiv:2107.09645) in front of ALM's
encoder MLP (:func:`make_pixel_encoder`); every other network only ever sees latents.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import (
    InteractionType,
    TensorDictModuleBase,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
    set_interaction_type,
)
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import Bounded, Composite, TensorSpec
from torchrl.envs.utils import ExplorationType, exploration_type
from torchrl.modules import Actor, AdditiveGaussianModule, IndependentNormal, ValueOperator

__all__ = [
    "ALMModules",
    "ConcatMLP",
    "ConvFeatures",
    "EVAL_LATENTS",
    "GaussianParamHead",
    "IdentityGaussianParams",
    "LearnedStdNoise",
    "SampledInteraction",
    "TanhMeanLearnedStd",
    "elu_mlp",
    "layernorm_tanh_mlp",
    "make_actor",
    "make_alm_modules",
    "make_classifier",
    "make_encoder",
    "make_eval_policy",
    "make_identity_encoder",
    "make_pixel_encoder",
    "make_qvalue_network",
    "make_reward_model",
    "make_world_model",
    "orthogonal_init_",
]

EVAL_LATENTS = ("sample", "mean")
"""``make_alm_modules(eval_latent=...)``: the latent the evaluation policy acts on."""


def orthogonal_init_(module: nn.Module) -> nn.Module:
    """Orthogonal weights and zero biases for every ``nn.Linear`` and ``nn.Conv2d`` in ``module``.

    Linear layers get gain 1; convolutions (followed by ReLUs in :class:`ConvFeatures`) get the ReLU gain, as in
    DrQ-v2.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            gain = nn.init.calculate_gain("relu") if isinstance(layer, nn.Conv2d) else 1.0
            nn.init.orthogonal_(layer.weight, gain)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def elu_mlp(in_features: int, hidden_dim: int, out_features: int, depth: int = 2) -> nn.Sequential:
    """``depth`` hidden layers of ``Linear + ELU``, then a Linear output layer."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden_dim), nn.ELU()]
        width = hidden_dim
    layers.append(nn.Linear(width, out_features))
    return orthogonal_init_(nn.Sequential(*layers))


def layernorm_tanh_mlp(in_features: int, hidden_dim: int, out_features: int) -> nn.Sequential:
    """ALM's reward/classifier/critic trunk: Linear, LayerNorm, Tanh, Linear, ELU, Linear."""
    return orthogonal_init_(
        nn.Sequential(
            nn.Linear(in_features, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ELU(),
            nn.Linear(hidden_dim, out_features),
        )
    )


class ConcatMLP(nn.Module):
    """Concatenates its inputs on the last dim and applies ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, dim=-1))


class GaussianParamHead(nn.Module):
    """Splits ``net``'s output into the (loc, scale) of a diagonal Normal, squashed as ALM does.

    ``loc = 30 tanh(loc / 30)``; the scale is softly clamped into about [0.1, 10] with
    ``10 - softplus(10 - s)`` then ``0.1 + softplus(s - 0.1)``. Without these bounds the
    KL term of the model loss can blow up early in training.
    """

    def __init__(self, net: nn.Module, max_loc: float = 30.0, min_scale: float = 0.1, max_scale: float = 10.0) -> None:
        super().__init__()
        self.net = net
        self.max_loc = max_loc
        self.min_scale = min_scale
        self.max_scale = max_scale

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One input is passed as is: concatenating it would copy it (a batch of images, for a pixel encoder).
        features = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=-1)
        loc, raw_scale = self.net(features).chunk(2, dim=-1)
        loc = self.max_loc * torch.tanh(loc / self.max_loc)
        scale = self.max_scale - nn.functional.softplus(self.max_scale - raw_scale)
        scale = self.min_scale + nn.functional.softplus(scale - self.min_scale)
        return loc, scale


class IdentityGaussianParams(nn.Module):
    """``z = s``: the observation itself as the latent's mean, with a fixed std and no parameters.

    The encoder of the paper's MnM-like ablation (Fig. 13). The std is the learned encoder's
    lower bound (0.1), the closest that encoder can get to a point mass.
    """

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return observation, torch.full_like(observation, self.scale)


def _gaussian_latent_module(
    net: nn.Module, in_keys: list[NestedKey], out_key: NestedKey
) -> ProbabilisticTensorDictSequential:
    """A diagonal-Normal latent module whose (loc, scale) come from ``net`` through :class:`GaussianParamHead`."""
    return _latent_distribution_module(GaussianParamHead(net), in_keys, out_key)


def _latent_distribution_module(
    params_module: nn.Module, in_keys: list[NestedKey], out_key: NestedKey
) -> ProbabilisticTensorDictSequential:
    out_key_tuple = out_key if isinstance(out_key, tuple) else (out_key,)
    loc_key = out_key_tuple[:-1] + (f"{out_key_tuple[-1]}_loc",)
    scale_key = out_key_tuple[:-1] + (f"{out_key_tuple[-1]}_scale",)
    return ProbabilisticTensorDictSequential(
        TensorDictModule(params_module, in_keys=in_keys, out_keys=[loc_key, scale_key]),
        ProbabilisticTensorDictModule(
            in_keys={"loc": loc_key, "scale": scale_key},
            out_keys=[out_key],
            distribution_class=IndependentNormal,
            # Under RANDOM (the collector's default) the latent is sampled, as ALM does when
            # acting; under DETERMINISTIC it is the mean (make_eval_policy can sample it anyway).
            default_interaction_type=InteractionType.RANDOM,
        ),
    )


def make_encoder(
    observation_dim: int,
    latent_dim: int = 50,
    hidden_dim: int = 512,
    *,
    observation_key: NestedKey = "observation",
    latent_key: NestedKey = "latent",
) -> ProbabilisticTensorDictSequential:
    """Encoder ``e(z | s)``: observation -> diagonal Normal over the latent (writes ``latent``)."""
    net = elu_mlp(observation_dim, hidden_dim, 2 * latent_dim)
    return _gaussian_latent_module(net, [observation_key], latent_key)


class ConvFeatures(nn.Module):
    """DrQ-v2's image encoder and trunk: ``[*B, C, H, W]`` frames -> ``[*B, feature_dim]`` features.

    Four 3x3 convolutions of ``channels`` channels (the first with stride 2, no padding), each followed by a ReLU,
    flattened, then DrQ-v2's trunk: Linear, LayerNorm, Tanh. Stacked frames come concatenated along the channels
    (:class:`~torchrl.envs.CatFrames` with ``dim=-3``), so ``C`` is frames x colour channels.

    Pixels are centred as DrQ-v2 centres them, to [-0.5, 0.5]: ``uint8`` frames are divided by 255, floating-point
    frames are taken to be in [0, 1] already (what :class:`~torchrl.envs.ToTensorImage` gives).

    Args:
        image_shape: ``(C, H, W)`` of one (stacked) observation.
        channels: channels of every convolution (DrQ-v2: 32).
        feature_dim: size of the trunk's output (DrQ-v2: 50).
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: int = 32, feature_dim: int = 50) -> None:
        super().__init__()
        in_channels, height, width = image_shape
        # Output size: (x - 3) // 2 + 1 after the strided layer, minus 2 after each of the other three.
        out_height, out_width = (height - 3) // 2 - 5, (width - 3) // 2 - 5
        if out_height < 1 or out_width < 1:
            raise ValueError(
                f"observation images must be at least 15x15 pixels for the four 3x3 convolutions, "
                f"got {height}x{width}."
            )
        layers: list[nn.Module] = []
        for index in range(4):
            layers += [nn.Conv2d(in_channels if index == 0 else channels, channels, 3, stride=2 if index == 0 else 1),
                       nn.ReLU()]
        self.convnet = nn.Sequential(*layers)
        self.trunk = nn.Sequential(
            nn.Linear(channels * out_height * out_width, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh()
        )
        self.image_shape = tuple(image_shape)
        orthogonal_init_(self)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch_shape = pixels.shape[:-3]
        images = pixels.reshape(-1, *pixels.shape[-3:])  # Conv2d takes one batch dim
        if images.dtype.is_floating_point:
            images = images - 0.5
        else:
            images = images.float() / 255.0 - 0.5
        features = self.convnet(images).flatten(1)
        return self.trunk(features).reshape(*batch_shape, -1)


def make_pixel_encoder(
    image_shape: tuple[int, int, int],
    latent_dim: int = 50,
    hidden_dim: int = 512,
    *,
    channels: int = 32,
    feature_dim: int = 50,
    observation_key: NestedKey = "pixels",
    latent_key: NestedKey = "latent",
) -> ProbabilisticTensorDictSequential:
    """Encoder ``e(z | s)`` for images: :class:`ConvFeatures`, then ALM's encoder MLP on its features.

    The same interface as :func:`make_encoder` (a diagonal Normal over ``latent``), reading ``[*B, C, H, W]``
    images under ``observation_key``, so it replaces the MLP encoder without any other network or the loss
    knowing: set the loss's observation key to the same entry (``loss.set_keys(observation="pixels")``).
    """
    net = nn.Sequential(
        ConvFeatures(image_shape, channels, feature_dim), elu_mlp(feature_dim, hidden_dim, 2 * latent_dim)
    )
    return _gaussian_latent_module(net, [observation_key], latent_key)


def make_identity_encoder(
    *, observation_key: NestedKey = "observation", latent_key: NestedKey = "latent", scale: float = 0.1
) -> ProbabilisticTensorDictSequential:
    """Identity "encoder" ``z ~ N(s, scale^2)`` with no parameters (the paper's MnM-like ablation, Fig. 13)."""
    return _latent_distribution_module(IdentityGaussianParams(scale), [observation_key], latent_key)


def make_world_model(
    latent_dim: int,
    action_dim: int,
    hidden_dim: int = 1024,
    *,
    latent_key: NestedKey = "latent",
    action_key: NestedKey = "action",
    next_latent_key: NestedKey = "next_latent",
) -> ProbabilisticTensorDictSequential:
    """Latent dynamics ``m(z' | z, a)``: (latent, action) -> diagonal Normal over the next latent."""
    net = elu_mlp(latent_dim + action_dim, hidden_dim, 2 * latent_dim)
    return _gaussian_latent_module(net, [latent_key, action_key], next_latent_key)


def make_reward_model(
    latent_dim: int,
    action_dim: int,
    hidden_dim: int = 512,
    *,
    latent_key: NestedKey = "latent",
    action_key: NestedKey = "action",
    out_key: NestedKey = "predicted_reward",
) -> TensorDictModule:
    """Reward model ``r(z, a)`` -> a scalar (shape ``[..., 1]``)."""
    net = layernorm_tanh_mlp(latent_dim + action_dim, hidden_dim, 1)
    return TensorDictModule(ConcatMLP(net), in_keys=[latent_key, action_key], out_keys=[out_key])


def make_classifier(
    latent_dim: int,
    action_dim: int,
    hidden_dim: int = 512,
    *,
    latent_key: NestedKey = "latent",
    action_key: NestedKey = "action",
    next_latent_key: NestedKey = "next_latent",
    out_key: NestedKey = "classifier_logits",
    linear: bool = False,
) -> TensorDictModule:
    """Classifier ``C(z, a, z')`` -> two logits; logit 1 means "z' came from the encoder".

    ``linear=True`` gives a single Linear layer, the paper's linear-classifier ablation (Fig. 16).
    """
    in_features = 2 * latent_dim + action_dim
    if linear:
        net = orthogonal_init_(nn.Linear(in_features, 2))
    else:
        net = layernorm_tanh_mlp(in_features, hidden_dim, 2)
    return TensorDictModule(
        ConcatMLP(net), in_keys=[latent_key, action_key, next_latent_key], out_keys=[out_key]
    )


def make_qvalue_network(
    latent_dim: int,
    action_dim: int,
    hidden_dim: int = 512,
    *,
    latent_key: NestedKey = "latent",
    action_key: NestedKey = "action",
    out_key: NestedKey = "state_action_value",
) -> ValueOperator:
    """One critic head ``Q(z, a)`` (writes ``state_action_value``). ALM uses two, built independently."""
    net = layernorm_tanh_mlp(latent_dim + action_dim, hidden_dim, 1)
    # out_keys explicit: ValueOperator only infers "state_action_value" for a plain "action" key.
    return ValueOperator(ConcatMLP(net), in_keys=[latent_key, action_key], out_keys=[out_key])


def make_actor(
    latent_dim: int,
    action_spec: TensorSpec,
    hidden_dim: int = 512,
    *,
    latent_key: NestedKey = "latent",
    action_key: NestedKey = "action",
    learned_std: bool = False,
    std_key: NestedKey = "action_std",
) -> Actor:
    """Deterministic actor: latent -> ``tanh`` mean action.

    As in the reference code, the tanh mean is *not* rescaled to the action bounds; noisy
    actions are clamped to them (by the exploration module when acting, by the loss inside
    the losses). ``learned_std=True`` (ALM-ENT) also writes a learned, state-dependent std under
    ``std_key`` (:class:`TanhMeanLearnedStd`).
    """
    action_dim = action_spec.shape[-1]
    if learned_std:
        net = TanhMeanLearnedStd(elu_mlp(latent_dim, hidden_dim, 2 * action_dim))
        return Actor(net, in_keys=[latent_key], out_keys=[action_key, std_key], spec=action_spec)
    net = nn.Sequential(elu_mlp(latent_dim, hidden_dim, action_dim), nn.Tanh())
    return Actor(net, in_keys=[latent_key], out_keys=[action_key], spec=action_spec)


class TanhMeanLearnedStd(nn.Module):
    """``net``'s output split into a tanh mean and a std squashed into ``[min_std, max_std]`` (ALM-ENT's actor).

    The std range is the one ALM's exploration schedule spans (1.0 down to 0.1).
    """

    def __init__(self, net: nn.Module, min_std: float = 0.1, max_std: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.min_std = min_std
        self.max_std = max_std

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_std = self.net(latent).chunk(2, dim=-1)
        return torch.tanh(mean), self.min_std + (self.max_std - self.min_std) * torch.sigmoid(raw_std)


class LearnedStdNoise(TensorDictModuleBase):
    """Behaviour noise from the actor's own std: ``action = clamp(mean + std * eps)`` to the action bounds.

    Like :class:`~torchrl.modules.AdditiveGaussianModule`, it adds noise only under ``ExplorationType.RANDOM``
    (the collector's default), so the same policy gives the mean action in evaluation.
    """

    def __init__(self, spec: Bounded, action_key: NestedKey = "action", std_key: NestedKey = "action_std") -> None:
        super().__init__()
        self.in_keys = [action_key, std_key]
        self.out_keys = [action_key]
        self.action_key, self.std_key = action_key, std_key
        self.register_buffer("low", spec.space.low.float())
        self.register_buffer("high", spec.space.high.float())

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if exploration_type() in (ExplorationType.RANDOM, None):
            mean = tensordict.get(self.action_key)
            action = mean + tensordict.get(self.std_key) * torch.randn_like(mean)
            tensordict.set(self.action_key, torch.maximum(torch.minimum(action, self.high), self.low))
        return tensordict


class SampledInteraction(TensorDictModuleBase):
    """Runs a probabilistic ``module`` under ``InteractionType.RANDOM`` whatever the caller's exploration type.

    Under ``set_exploration_type(ExplorationType.DETERMINISTIC)`` (how evaluation runs a policy) a
    ``ProbabilisticTensorDictModule`` returns its distribution's mean; wrapped in this, it still samples.
    """

    def __init__(self, module: TensorDictModuleBase) -> None:
        super().__init__()
        self.module = module
        self.in_keys = module.in_keys
        self.out_keys = module.out_keys

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        with set_interaction_type(InteractionType.RANDOM):
            return self.module(tensordict)


def _check_eval_latent(eval_latent: str) -> None:
    if eval_latent not in EVAL_LATENTS:
        raise ValueError(f"eval_latent must be 'sample' or 'mean', got {eval_latent!r}.")


def make_eval_policy(
    encoder: ProbabilisticTensorDictSequential, actor_network: TensorDictModule, eval_latent: str = "sample"
) -> TensorDictSequential:
    """The evaluation policy: the actor's mean action (no noise) on a latent of ``encoder``.

    ``eval_latent="sample"`` acts on a latent *sampled* from the encoder, as the original ALM evaluates
    (``AlmAgent.get_action(eval=True)``: ``z = encoder(s).sample()``, then the actor's mean), so returns are
    like-for-like with the published curves; ``"mean"`` acts on the encoder's mean, which makes evaluation
    deterministic. Either way, run it under ``ExplorationType.DETERMINISTIC``, which turns off the behaviour noise.
    """
    _check_eval_latent(eval_latent)
    return TensorDictSequential(SampledInteraction(encoder) if eval_latent == "sample" else encoder, actor_network)


@dataclass
class ALMModules:
    """What :func:`make_alm_modules` returns.

    The first six attributes are named after :class:`~alm_torchrl.objectives.ALMLoss`'s
    keywords, so ``ALMLoss(**modules.loss_kwargs())`` builds the loss.
    """

    encoder: ProbabilisticTensorDictSequential
    world_model: ProbabilisticTensorDictSequential
    reward_model: TensorDictModule
    classifier: TensorDictModule
    qvalue_network: list[TensorDictModule]
    actor_network: TensorDictModule
    policy: TensorDictSequential
    """Behaviour policy: sampled latent, actor mean, annealed additive Gaussian noise, clamped to bounds."""
    eval_policy: TensorDictSequential
    """Encoder + actor (:func:`make_eval_policy`); under ``ExplorationType.DETERMINISTIC`` the actor's mean action on
    a sampled latent (``eval_latent="sample"``, the paper's) or on the latent mean (``"mean"``)."""
    exploration_noise: AdditiveGaussianModule | None
    """The policy's scheduled noise; call ``exploration_noise.step(frames)`` as frames are collected.
    ``None`` with ``actor_std="learned"``, where the actor's own std is the noise."""
    observation_key: NestedKey = "observation"
    """The entry the encoder reads: give it to the loss, ``loss.set_keys(observation=modules.observation_key)``."""

    def loss_kwargs(self) -> dict[str, object]:
        return {
            "encoder": self.encoder,
            "world_model": self.world_model,
            "reward_model": self.reward_model,
            "classifier": self.classifier,
            "qvalue_network": self.qvalue_network,
            "actor_network": self.actor_network,
        }


def _unbatched_leaf_spec(
    spec: TensorSpec,
    key: NestedKey,
    what: str,
    required_type: type[TensorSpec] | None = None,
    allow_image: bool = False,
) -> TensorSpec:
    if isinstance(spec, Composite):
        if key not in spec.keys(True, True):
            raise KeyError(f"{what} spec has no entry {key!r}; it has {sorted(map(str, spec.keys(True, True)))}.")
        spec = spec[key]
    if required_type is not None and not isinstance(spec, required_type):
        raise ValueError(f"ALM needs a {required_type.__name__} {what} spec, got {type(spec).__name__}.")
    if spec.ndim != 1 and not (allow_image and spec.ndim == 3):
        # ALM's networks are MLPs over a flat vector (images get a convolutional encoder in front); batched env
        # specs must be unbatched first (``env.observation_spec_unbatched``).
        shapes = "a flat vector or a [C, H, W] image" if allow_image else "a flat vector"
        raise ValueError(f"{what} spec must be {shapes}, got shape {tuple(spec.shape)}.")
    return spec


def make_alm_modules(
    observation_spec: TensorSpec,
    action_spec: TensorSpec,
    *,
    latent_dim: int = 50,
    hidden_dim: int = 512,
    model_hidden_dim: int = 1024,
    num_qvalue_nets: int = 2,
    encoder_type: str = "mlp",
    conv_channels: int = 32,
    conv_feature_dim: int = 50,
    classifier_type: str = "mlp",
    actor_std: str = "scheduled",
    noise_init: float = 1.0,
    noise_end: float = 0.1,
    noise_annealing_frames: int = 100_000,
    eval_latent: str = "sample",
    observation_key: NestedKey = "observation",
    action_key: NestedKey = "action",
    device: torch.device | str | None = None,
) -> ALMModules:
    """Builds ALM's networks and policies from an environment's (unbatched) specs.

    Args:
        observation_spec: the observation spec, or a Composite holding ``observation_key``: a flat vector, or an
            image ``[C, H, W]`` (``uint8``, or floats in [0, 1]; stacked frames concatenated along ``C``), which gets
            DrQ-v2's convolutional encoder (:func:`make_pixel_encoder`) in front of the encoder MLP.
        action_spec: a :class:`~torchrl.data.Bounded` action spec, or a Composite holding it.

    Keyword Args:
        latent_dim, hidden_dim, model_hidden_dim: network sizes (paper: 50, 512, 1024).
        num_qvalue_nets: number of independently initialised critic heads (paper: 2).
        encoder_type: ``"mlp"`` (the paper's; behind the convolutional features for images) or ``"identity"``
            (``z = s`` with a fixed std of 0.1 and no parameters, the MnM-like ablation of Fig. 13; the latent size
            is then the observation size and ``latent_dim`` is not used; flat observations only).
        conv_channels, conv_feature_dim: the image encoder's channels per convolution and the size of its
            features (DrQ-v2: 32, 50); unused for flat observations.
        classifier_type: ``"mlp"`` (the paper's) or ``"linear"`` (one Linear layer, Fig. 16).
        actor_std: ``"scheduled"`` (the paper's: additive noise annealed by the schedule below) or
            ``"learned"`` (ALM-ENT: the actor learns a state-dependent std in [0.1, 1] and the
            behaviour policy samples with it; train it with ``ALMLoss(entropy_coef=...)``).
        noise_init, noise_end, noise_annealing_frames: the behaviour policy's noise std
            schedule (paper: 1.0 to 0.1 over 100,000 frames).
        eval_latent: the latent ``eval_policy`` acts on: ``"sample"`` (the paper's protocol: a sample of the
            encoder, then the actor's mean action) or ``"mean"`` (the encoder's mean: deterministic evaluation).
        device: where the networks live.

    Examples:
        >>> from torchrl.envs import GymEnv
        >>> env = GymEnv("Pendulum-v1")
        >>> modules = make_alm_modules(env.observation_spec_unbatched, env.action_spec_unbatched,
        ...                            latent_dim=8, hidden_dim=32, model_hidden_dim=32)
        >>> rollout = env.rollout(3, modules.policy)
        >>> rollout["action"].shape
        torch.Size([3, 1])
    """
    for name, value in (("latent_dim", latent_dim), ("hidden_dim", hidden_dim),
                        ("model_hidden_dim", model_hidden_dim), ("num_qvalue_nets", num_qvalue_nets),
                        ("conv_channels", conv_channels), ("conv_feature_dim", conv_feature_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if encoder_type not in ("mlp", "identity"):
        raise ValueError(f"encoder_type must be 'mlp' or 'identity', got {encoder_type!r}.")
    if classifier_type not in ("mlp", "linear"):
        raise ValueError(f"classifier_type must be 'mlp' or 'linear', got {classifier_type!r}.")
    if actor_std not in ("scheduled", "learned"):
        raise ValueError(f"actor_std must be 'scheduled' or 'learned', got {actor_std!r}.")
    _check_eval_latent(eval_latent)
    for name, value, valid, expected in (
        ("noise_end", noise_end, lambda x: x >= 0, ">= 0 (paper: 0.1)"),
        ("noise_init", noise_init, lambda x: x >= noise_end, f">= noise_end ({noise_end}) (paper: 1.0)"),
        ("noise_annealing_frames", noise_annealing_frames, lambda x: x >= 1, ">= 1 (paper: 100000)"),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ValueError(f"{name} must be a number {expected}, got {value!r}.")
    observation_spec = _unbatched_leaf_spec(observation_spec, observation_key, "observation", allow_image=True)
    from_pixels = observation_spec.ndim == 3
    if from_pixels and encoder_type == "identity":
        raise ValueError(
            f"encoder_type 'identity' needs a flat observation (z = s), got an image of shape "
            f"{tuple(observation_spec.shape)}; use 'mlp'."
        )
    action_spec = _unbatched_leaf_spec(action_spec, action_key, "action", required_type=Bounded)
    if device is not None:
        # The noise module clamps actions to the spec's bounds, which must live with the actions.
        action_spec = action_spec.to(device)
    observation_dim = observation_spec.shape[-1]
    action_dim = action_spec.shape[-1]
    keys = {"action_key": action_key}

    if encoder_type == "identity":
        encoder = make_identity_encoder(observation_key=observation_key)
        latent_dim = observation_dim
    elif from_pixels:
        encoder = make_pixel_encoder(
            tuple(observation_spec.shape),
            latent_dim,
            hidden_dim,
            channels=conv_channels,
            feature_dim=conv_feature_dim,
            observation_key=observation_key,
        )
    else:
        encoder = make_encoder(observation_dim, latent_dim, hidden_dim, observation_key=observation_key)
    world_model = make_world_model(latent_dim, action_dim, model_hidden_dim, **keys)
    reward_model = make_reward_model(latent_dim, action_dim, hidden_dim, **keys)
    classifier = make_classifier(latent_dim, action_dim, hidden_dim, linear=classifier_type == "linear", **keys)
    qvalue_network = [make_qvalue_network(latent_dim, action_dim, hidden_dim, **keys) for _ in range(num_qvalue_nets)]
    actor_network = make_actor(latent_dim, action_spec, hidden_dim, learned_std=actor_std == "learned", **keys)

    if actor_std == "learned":
        exploration_noise = None
        noise: TensorDictModuleBase = LearnedStdNoise(action_spec, action_key=action_key)
        if device is not None:
            noise.to(device)
    else:
        exploration_noise = noise = AdditiveGaussianModule(
            spec=action_spec,
            sigma_init=noise_init,
            sigma_end=noise_end,
            annealing_num_steps=noise_annealing_frames,
            action_key=action_key,
            device=device,
        )
    policy = TensorDictSequential(encoder, actor_network, noise)
    eval_policy = make_eval_policy(encoder, actor_network, eval_latent)
    modules = ALMModules(
        encoder=encoder,
        world_model=world_model,
        reward_model=reward_model,
        classifier=classifier,
        qvalue_network=qvalue_network,
        actor_network=actor_network,
        policy=policy,
        eval_policy=eval_policy,
        exploration_noise=exploration_noise,
        observation_key=observation_key,
    )
    if device is not None:
        for module in modules.loss_kwargs().values():
            for part in module if isinstance(module, list) else [module]:
                part.to(device)
    return modules
