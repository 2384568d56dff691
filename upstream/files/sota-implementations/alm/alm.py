# Copyright (c) Meta Platforms, Inc. and affiliates.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""ALM Example.

A self-contained training script for Aligned Latent Models (ALM), from "Simplifying
Model-based RL: Learning Representations, Latent-space Models, and Policies with One
Objective", Ghugare et al., ICLR 2023 (https://arxiv.org/abs/2209.08466).

It supports state environments like MuJoCo. Each iteration collects
``frames_per_batch`` steps with the noisy policy, then runs
``frames_per_batch * utd_ratio`` updates of the five ALM losses on batches of
``horizon``-step slices.

The helper functions are coded in the utils.py associated with this script.
"""
from __future__ import annotations

import warnings

import hydra
import torch
import torch.cuda
import tqdm
from tensordict.nn import CudaGraphModule
from torchrl._utils import compile_with_warmup, get_available_device, timeit
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.record.loggers import generate_exp_name, get_logger
from utils import (
    dump_video,
    log_metrics,
    make_alm_agent,
    make_collector,
    make_environment,
    make_loss_module,
    make_optimizer,
    make_replay_buffer,
    TRAJ_KEY,
)

torch.set_float32_matmul_precision("high")


@hydra.main(version_base="1.3", config_path="", config_name="config")
def main(cfg: DictConfig):  # noqa: F821
    device = (
        torch.device(cfg.network.device)
        if cfg.network.device
        else get_available_device()
    )

    # Create logger
    exp_name = generate_exp_name("ALM", cfg.logger.exp_name)
    logger = None
    if cfg.logger.backend:
        logger = get_logger(
            logger_type=cfg.logger.backend,
            logger_name="alm_logging",
            experiment_name=exp_name,
            wandb_kwargs={
                "mode": cfg.logger.mode,
                "config": dict(cfg),
                "project": cfg.logger.project_name,
                "group": cfg.logger.group_name,
            },
        )

    # Set seeds
    torch.manual_seed(cfg.env.seed)

    # Create environments
    train_env, eval_env = make_environment(cfg, logger=logger, device=device)

    # Create the networks and the exploration policy
    model, exploration_policy, exploration_module = make_alm_agent(
        cfg, train_env, device
    )

    # Create the ALM loss and its target network updater
    action_spec = train_env.action_spec_unbatched.to(device)
    loss_module, target_net_updater = make_loss_module(cfg, model, action_spec)

    compile_mode = None
    if cfg.compile.compile:
        compile_mode = cfg.compile.compile_mode
        if compile_mode in ("", None):
            compile_mode = "default" if cfg.compile.cudagraphs else "reduce-overhead"

    # Create the off-policy collector
    collector = make_collector(
        cfg, train_env, exploration_policy, compile_mode=compile_mode, device=device
    )

    # Create the replay buffer of trajectory slices
    replay_buffer = make_replay_buffer(cfg, device=device, compile=bool(compile_mode))
    # What the loss reads, and what the slice sampler cuts the trajectories along
    stored_keys = [*loss_module.in_keys, TRAJ_KEY]

    # Create the optimizer
    optimizer = make_optimizer(cfg, loss_module)
    loss_keys = list(loss_module.LOSS_NETWORKS)
    max_grad_norm = cfg.optim.max_grad_norm

    def update(sampled_tensordict):
        # The five losses reach disjoint sets of parameters: one backward pass
        loss_td = loss_module(sampled_tensordict)
        sum(loss_td[key] for key in loss_keys).backward()
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Update the target encoder and the target critics
        target_net_updater.step()
        return loss_td.detach()

    if cfg.compile.compile:
        update = compile_with_warmup(update, mode=compile_mode, warmup=1)

    if cfg.compile.cudagraphs:
        warnings.warn(
            "CudaGraphModule is experimental: the updates it replays may be silently wrong.",
            category=UserWarning,
        )
        update = CudaGraphModule(update, in_keys=[], out_keys=[], warmup=5)

    # Main loop
    collected_frames = 0
    pbar = tqdm.tqdm(total=cfg.collector.total_frames)

    init_random_frames = cfg.collector.init_random_frames
    num_updates = int(cfg.collector.frames_per_batch * cfg.optim.utd_ratio)
    batch_size = cfg.optim.batch_size
    horizon = cfg.loss.horizon
    prb = cfg.replay_buffer.prb
    eval_rollout_steps = cfg.env.max_episode_steps
    eval_iter = cfg.logger.eval_iter
    frames_per_batch = cfg.collector.frames_per_batch

    collector_iter = iter(collector)
    total_iter = len(collector)
    for _ in range(total_iter):
        timeit.printevery(num_prints=1000, total_count=total_iter, erase=True)

        with timeit("collect"):
            tensordict = next(collector_iter)

        # Update weights of the inference policy
        collector.update_policy_weights_()

        current_frames = tensordict.numel()
        pbar.update(current_frames)

        with timeit("rb - extend"):
            replay_buffer.extend(tensordict.reshape(-1).select(*stored_keys))

        collected_frames += current_frames

        losses = []
        if collected_frames >= init_random_frames:
            # Anneal the exploration noise over the frames collected by the policy;
            # the losses sample the actor's actions with the same std
            exploration_module.step(
                min(current_frames, collected_frames - init_random_frames)
            )
            loss_module.actor_std.copy_(exploration_module.sigma)

            with timeit("train"):
                for _ in range(num_updates):
                    with timeit("rb - sample"):
                        sampled_tensordict = replay_buffer.sample().reshape(
                            batch_size, horizon
                        )
                    with timeit("update"):
                        torch.compiler.cudagraph_mark_step_begin()
                        losses.append(update(sampled_tensordict).clone())

                    # The loss writes the priority of each slice into the sample
                    if prb:
                        with timeit("rb - priority"):
                            replay_buffer.update_tensordict_priority(
                                sampled_tensordict.reshape(-1)
                            )

        # Logging
        metrics_to_log = {}
        episode_end = tensordict["next", "done"]
        if episode_end.any():
            episode_rewards = tensordict["next", "episode_reward"][episode_end]
            episode_length = tensordict["next", "step_count"][episode_end]
            metrics_to_log["train/reward"] = episode_rewards.mean()
            metrics_to_log["train/episode_length"] = episode_length.float().mean()
        if losses:
            for key, value in torch.stack(losses).items():
                metrics_to_log[f"train/{key}"] = value.mean()
            metrics_to_log["train/exploration_std"] = loss_module.actor_std.clone()

        # Evaluation
        if abs(collected_frames % eval_iter) < frames_per_batch:
            with set_exploration_type(
                ExplorationType.DETERMINISTIC
            ), torch.no_grad(), timeit("eval"):
                eval_rollout = eval_env.rollout(
                    eval_rollout_steps,
                    exploration_policy,
                    auto_cast_to_device=True,
                    break_when_any_done=True,
                )
                eval_env.apply(dump_video)
                eval_reward = eval_rollout["next", "reward"].sum(-2).mean().item()
                metrics_to_log["eval/reward"] = eval_reward
        if logger is not None:
            metrics_to_log.update(timeit.todict(prefix="time"))
            if pbar.format_dict["rate"] is not None:
                metrics_to_log["time/speed"] = pbar.format_dict["rate"]
            log_metrics(logger, metrics_to_log, collected_frames)

    collector.shutdown()
    if not eval_env.is_closed:
        eval_env.close()
    if not train_env.is_closed:
        train_env.close()


if __name__ == "__main__":
    main()
