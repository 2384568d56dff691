# Copyright (c) Meta Platforms, Inc. and affiliates.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
from __future__ import annotations

import functools

import torch
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
)
from torch import nn, optim
from torchrl.collectors import Collector
from torchrl.data import (
    LazyTensorStorage,
    PrioritizedSliceSampler,
    SliceSampler,
    TensorDictReplayBuffer,
)
from torchrl.envs import (
    CatTensors,
    Compose,
    DMControlEnv,
    DoubleToFloat,
    EnvCreator,
    InitTracker,
    ParallelEnv,
    RewardSum,
    StepCounter,
    TransformedEnv,
)
from torchrl.envs.libs.gym import GymEnv, set_gym_backend
from torchrl.modules import (
    AdditiveGaussianModule,
    IndependentNormal,
    MLP,
    TanhModule,
    ValueOperator,
)
from torchrl.objectives import ALMLoss, group_optimizers, SoftUpdate
from torchrl.record import VideoRecorder

# Written by every collector; the slice sampler cuts the trajectories along it.
TRAJ_KEY = ("collector", "traj_ids")


# ====================================================================
# Environment utils
# -----------------


def make_base_env(cfg, device="cpu", from_pixels=False):
    """One environment that writes its state under ``"observation"``."""
    library = cfg.env.library
    if library in ("gym", "gymnasium"):
        with set_gym_backend(library):
            return GymEnv(
                cfg.env.name, device=device, from_pixels=from_pixels, pixels_only=False
            )
    if library == "dm_control":
        env = DMControlEnv(
            cfg.env.name, cfg.env.task, from_pixels=from_pixels, pixels_only=False
        )
        observation_keys = list(env.observation_spec.keys())
        return TransformedEnv(
            env, CatTensors(in_keys=observation_keys, out_key="observation")
        )
    raise NotImplementedError(f"Unknown env library {library!r}.")


def make_transforms(max_episode_steps):
    # The step counter truncates the episodes (a truncation, not a terminal state:
    # the critic bootstraps through it); MuJoCo observations come as float64.
    return Compose(
        InitTracker(),
        StepCounter(max_steps=max_episode_steps),
        DoubleToFloat(),
        RewardSum(),
    )


def make_environment(cfg, logger=None, device="cpu"):
    """The training environment and an evaluation environment with the same transforms."""
    train_env = TransformedEnv(
        ParallelEnv(
            cfg.collector.env_per_collector,
            EnvCreator(functools.partial(make_base_env, cfg)),
            serial_for_single=True,
            device=device,
        ),
        make_transforms(cfg.env.max_episode_steps),
    )
    train_env.set_seed(cfg.env.seed)

    eval_transforms = train_env.transform.clone()
    if cfg.logger.video:
        eval_transforms.insert(
            0, VideoRecorder(logger, tag="rendering/test", in_keys=["pixels"])
        )
    eval_env = TransformedEnv(
        ParallelEnv(
            1,
            EnvCreator(
                functools.partial(make_base_env, cfg, from_pixels=cfg.logger.video)
            ),
            serial_for_single=True,
            device=device,
        ),
        eval_transforms,
    )
    eval_env.set_seed(cfg.env.seed + 1)
    return train_env, eval_env


# ====================================================================
# Collector and replay buffer
# ---------------------------


def make_collector(cfg, train_env, exploration_policy, compile_mode, device):
    """Random actions for ``init_random_frames`` frames, then the exploration policy."""
    collector = Collector(
        train_env,
        exploration_policy,
        init_random_frames=cfg.collector.init_random_frames,
        frames_per_batch=cfg.collector.frames_per_batch,
        total_frames=cfg.collector.total_frames,
        reset_at_each_iter=cfg.collector.reset_at_each_iter,
        device=cfg.collector.device or device,
        compile_policy={"mode": compile_mode} if compile_mode else False,
        cudagraph_policy={"warmup": 10} if cfg.compile.cudagraphs else False,
    )
    collector.set_seed(cfg.env.seed)
    return collector


def make_replay_buffer(cfg, device="cpu", compile=False):
    """A buffer whose ``sample()`` returns ``batch_size`` slices of ``horizon`` steps.

    The slices are flat (``[batch_size * horizon]``), slice after slice; reshape them to
    ``[batch_size, horizon]`` for :class:`~torchrl.objectives.ALMLoss`. A slice never
    crosses the end of a trajectory, be it a termination or a truncation.
    """
    horizon = cfg.loss.horizon
    sampler_kwargs = {
        "slice_len": horizon,
        "traj_key": TRAJ_KEY,
        "strict_length": True,
    }
    if cfg.replay_buffer.prb:
        sampler = PrioritizedSliceSampler(
            max_capacity=cfg.replay_buffer.size,
            alpha=cfg.replay_buffer.alpha,
            beta=cfg.replay_buffer.beta,
            **sampler_kwargs,
        )
    else:
        sampler = SliceSampler(cache_values=True, **sampler_kwargs)
    return TensorDictReplayBuffer(
        storage=LazyTensorStorage(cfg.replay_buffer.size, device=device),
        sampler=sampler,
        batch_size=cfg.optim.batch_size * horizon,
        prefetch=0 if compile else cfg.replay_buffer.prefetch,
        pin_memory=False,
    )


# ====================================================================
# Model
# -----
# The networks of the paper's Table 4: ELU MLPs for the encoder, the latent model and the
# actor; Linear-LayerNorm-Tanh trunks for the reward model, the classifier and the critics;
# orthogonal weights and zero biases everywhere.


def orthogonal_init_(module):
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


class ConcatNet(nn.Module):
    """Applies ``net`` to its inputs concatenated along the last dimension."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return self.net(torch.cat(inputs, dim=-1))


class BoundedNormalParams(ConcatNet):
    """Splits the output of ``net`` into the loc and scale of a diagonal Normal.

    As in ALM, the loc is softly bounded to ``[-max_loc, max_loc]`` and the scale to about
    ``[min_scale, max_scale]``, which keeps the KL terms of the model loss finite.
    """

    def __init__(self, net, max_loc=30.0, min_scale=0.1, max_scale=10.0):
        super().__init__(net)
        self.max_loc = max_loc
        self.min_scale = min_scale
        self.max_scale = max_scale

    def forward(self, *inputs):
        loc, scale = super().forward(*inputs).chunk(2, dim=-1)
        loc = self.max_loc * torch.tanh(loc / self.max_loc)
        scale = self.max_scale - nn.functional.softplus(self.max_scale - scale)
        scale = self.min_scale + nn.functional.softplus(scale - self.min_scale)
        return loc, scale


def elu_mlp(in_features, out_features, num_cells, device):
    return MLP(
        in_features=in_features,
        out_features=out_features,
        num_cells=[num_cells, num_cells],
        activation_class=nn.ELU,
        device=device,
    )


def layernorm_tanh_mlp(in_features, out_features, num_cells, device):
    return nn.Sequential(
        nn.Linear(in_features, num_cells, device=device),
        nn.LayerNorm(num_cells, device=device),
        nn.Tanh(),
        nn.Linear(num_cells, num_cells, device=device),
        nn.ELU(),
        nn.Linear(num_cells, out_features, device=device),
    )


def make_latent_distribution(net, in_keys, out_key):
    """A module writing a sample of a diagonal Normal over ``out_key`` (its mean when
    deterministic); ``get_dist`` gives the distribution itself."""
    loc_key, scale_key = f"{out_key}_loc", f"{out_key}_scale"
    return ProbabilisticTensorDictSequential(
        TensorDictModule(
            BoundedNormalParams(orthogonal_init_(net)),
            in_keys=in_keys,
            out_keys=[loc_key, scale_key],
        ),
        ProbabilisticTensorDictModule(
            in_keys={"loc": loc_key, "scale": scale_key},
            out_keys=[out_key],
            distribution_class=IndependentNormal,
            default_interaction_type=InteractionType.RANDOM,
        ),
    )


def make_alm_agent(cfg, train_env, device):
    """The networks of ALM and its exploration policy."""
    observation_dim = train_env.observation_spec_unbatched["observation"].shape[-1]
    action_spec = train_env.action_spec_unbatched.to(device)
    action_dim = action_spec.shape[-1]
    latent_dim = cfg.network.latent_dim
    num_cells = cfg.network.hidden_sizes
    model_num_cells = cfg.network.model_hidden_sizes

    # e(z | s) and m(z' | z, a): distributions over the latent state
    encoder = make_latent_distribution(
        elu_mlp(observation_dim, 2 * latent_dim, num_cells, device),
        in_keys=["observation"],
        out_key="latent",
    )
    world_model = make_latent_distribution(
        elu_mlp(latent_dim + action_dim, 2 * latent_dim, model_num_cells, device),
        in_keys=["latent", "action"],
        out_key="next_latent",
    )
    reward_model = TensorDictModule(
        ConcatNet(
            orthogonal_init_(
                layernorm_tanh_mlp(latent_dim + action_dim, 1, num_cells, device)
            )
        ),
        in_keys=["latent", "action"],
        out_keys=["predicted_reward"],
    )
    # C(z, a, z'): logit 1 means that z' came from the encoder, logit 0 from the model
    classifier = TensorDictModule(
        ConcatNet(
            orthogonal_init_(
                layernorm_tanh_mlp(2 * latent_dim + action_dim, 2, num_cells, device)
            )
        ),
        in_keys=["latent", "action", "next_latent"],
        out_keys=["classifier_logits"],
    )
    # independently initialized critics (clipped double Q)
    qvalue_networks = nn.ModuleList(
        ValueOperator(
            ConcatNet(
                orthogonal_init_(
                    layernorm_tanh_mlp(latent_dim + action_dim, 1, num_cells, device)
                )
            ),
            in_keys=["latent", "action"],
            out_keys=["state_action_value"],
        )
        for _ in range(cfg.network.num_qvalue_nets)
    )
    # a deterministic actor; its tanh output is mapped onto the action bounds
    actor = TensorDictSequential(
        TensorDictModule(
            orthogonal_init_(elu_mlp(latent_dim, action_dim, num_cells, device)),
            in_keys=["latent"],
            out_keys=["param"],
        ),
        TanhModule(in_keys=["param"], out_keys=["action"], spec=action_spec),
    )
    model = nn.ModuleDict(
        {
            "encoder": encoder,
            "world_model": world_model,
            "reward_model": reward_model,
            "classifier": classifier,
            "qvalue_network": qvalue_networks,
            "actor_network": actor,
        }
    )

    # Acting: sample z ~ e(z | s), then add annealed Gaussian noise to the actor's
    # action. Both are off under ExplorationType.DETERMINISTIC (evaluation).
    exploration_module = AdditiveGaussianModule(
        spec=action_spec,
        sigma_init=cfg.exploration.sigma_init,
        sigma_end=cfg.exploration.sigma_end,
        annealing_num_steps=cfg.exploration.annealing_num_steps,
        device=device,
    )
    exploration_policy = TensorDictSequential(encoder, actor, exploration_module)
    return model, exploration_policy, exploration_module


# ====================================================================
# ALM Loss
# --------


def make_loss_module(cfg, model, action_spec):
    """The ALM loss and the soft update of its target encoder and target critics."""
    loss_module = ALMLoss(
        encoder=model["encoder"],
        world_model=model["world_model"],
        reward_model=model["reward_model"],
        classifier=model["classifier"],
        qvalue_network=list(model["qvalue_network"]),
        actor_network=model["actor_network"],
        action_spec=action_spec,
        classifier_coef=cfg.loss.classifier_coef,
        lmbda=cfg.loss.lmbda,
        actor_std=cfg.exploration.sigma_init,
        noise_clip=cfg.loss.noise_clip,
    )
    loss_module.make_value_estimator(gamma=cfg.optim.gamma)
    target_net_updater = SoftUpdate(loss_module, tau=cfg.loss.tau)
    return loss_module, target_net_updater


# The paper's four optimizers, by the networks each one steps.
OPTIMIZER_GROUPS = {
    "model": ("encoder", "world_model"),
    "reward_classifier": ("reward_model", "classifier"),
    "qvalue": ("qvalue_network",),
    "actor": ("actor_network",),
}


def make_optimizer(cfg, loss_module):
    """One Adam per group of networks, grouped into a single optimizer.

    Each loss term only reaches its own networks, so the five terms can be summed and
    back-propagated once; the gradients are clipped per group.
    """
    optimizers = []
    for names in OPTIMIZER_GROUPS.values():
        params = [
            param
            for name in names
            for param in getattr(loss_module, f"{name}_params").values(True, True)
        ]
        optimizers.append(optim.Adam(params, lr=cfg.optim.lr, eps=cfg.optim.adam_eps))
    return group_optimizers(*optimizers)


# ====================================================================
# General utils
# -------------


def log_metrics(logger, metrics, step):
    logger.log_metrics(metrics, step)


def dump_video(module):
    if isinstance(module, VideoRecorder):
        module.dump()
