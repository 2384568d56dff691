"""Train ALM (Aligned Latent Models, Ghugare et al., ICLR 2023) with TorchRL.

    python recipes/alm/alm.py env.name=Walker2d-v5
    python recipes/alm/alm.py checkpoint.resume=outputs/HalfCheetah-v5/<run>/checkpoints

Collect ``frames_per_batch`` steps with the noisy policy, store them, then run ``frames_per_batch * utd_ratio``
updates on ``[batch_size, horizon]`` slices; evaluate, log and checkpoint on frame intervals.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
import tqdm
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torchrl import timeit
from torchrl.objectives import SoftUpdate
from torchrl.record.loggers import generate_exp_name, get_logger

from alm_torchrl.envs import make_env
from alm_torchrl.lower_bound import lower_bound_bias
from alm_torchrl.replay import TRAJ_KEY, sample_slices
from alm_torchrl.training import (
    NonFiniteGradientError,
    checkpoint_state,
    configure_cpu_runtime,
    evaluate,
    make_collector,
    make_loss,
    make_modules,
    make_optimizers,
    make_recipe_replay_buffer,
    make_update,
    resolve_device,
    resume_training,
    save_checkpoint,
    updates_per_batch,
    validate_config,
)

torch.set_float32_matmul_precision("high")


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> None:
    if cfg.checkpoint.resume:
        cfg.checkpoint.resume = hydra.utils.to_absolute_path(cfg.checkpoint.resume)
    try:
        validate_config(cfg)
    except ValueError as err:
        sys.exit(f"alm.py: invalid config: {err}")
    device = resolve_device(cfg.collector.device)
    configure_cpu_runtime(cfg.compile.num_threads)
    timeit.reset()  # a process-pool launcher may run several jobs in one process
    torch.manual_seed(cfg.env.seed)
    np.random.seed(cfg.env.seed)
    random.seed(cfg.env.seed)

    # Environments: the env steps on the CPU (MuJoCo); the policy and learner run on `device`.
    env = make_env(cfg.env.name, seed=cfg.env.seed, max_episode_steps=cfg.env.max_episode_steps)
    # The evaluation episodes run side by side: one policy call per step for all of them.
    eval_env = make_env(cfg.env.name, seed=cfg.env.seed + 1, max_episode_steps=cfg.env.max_episode_steps,
                        num_envs=cfg.logger.num_eval_episodes)

    # Networks, loss, optimizers and the update step.
    modules = make_modules(cfg, env, device)
    loss = make_loss(cfg, modules, device)
    target_updater = SoftUpdate(loss, tau=cfg.loss.tau)
    optimizer = make_optimizers(loss, cfg.optim.lr, capturable=cfg.compile.cudagraphs)
    num_updates_per_batch = updates_per_batch(cfg)
    update = make_update(
        loss,
        optimizer,
        target_updater,
        max_grad_norm=cfg.optim.max_grad_norm,
        compile=cfg.compile.compile,
        compile_mode=cfg.compile.compile_mode,
        cudagraphs=cfg.compile.cudagraphs,
        # One host sync per batch of updates, not per update: a non-finite step is skipped on the device meanwhile.
        check_every=num_updates_per_batch,
    )

    replay_buffer = make_recipe_replay_buffer(cfg, device)

    collected_frames = num_updates = 0
    traj_id_offset = 0
    if cfg.checkpoint.resume:
        collected_frames, num_updates = resume_training(
            cfg.checkpoint.resume,
            loss=loss,
            optimizer=optimizer,
            exploration_noise=modules.exploration_noise,
            replay_buffer=replay_buffer,
            device=device,
        )
        # New trajectory ids must not continue a stored trajectory, or the slice sampler would join them.
        traj_id_offset = int(replay_buffer.storage[: len(replay_buffer)].get(TRAJ_KEY).max()) + 1
        env.set_seed(cfg.env.seed + collected_frames)
        print(f"Resumed from {cfg.checkpoint.resume} at frame {collected_frames}", file=sys.stderr)

    collector = make_collector(cfg, env, modules.policy, device, collected_frames)

    logger = None
    if cfg.logger.backend:
        logger = get_logger(
            cfg.logger.backend,
            logger_name="alm_logging",
            experiment_name=generate_exp_name("ALM", cfg.logger.exp_name),
            wandb_kwargs={"config": OmegaConf.to_container(cfg, resolve=True), "project": "alm"},
        )

    checkpoint_path = Path(cfg.checkpoint.dir) / "checkpoint.pt"

    def checkpoint() -> None:
        state = checkpoint_state(cfg, collected_frames=collected_frames, num_updates=num_updates, loss=loss,
                                 optimizer=optimizer, exploration_noise=modules.exploration_noise,
                                 replay_buffer=replay_buffer)
        save_checkpoint(checkpoint_path, state)

    pbar = tqdm.tqdm(total=cfg.collector.total_frames, initial=collected_frames, unit="frames")
    # Running sums of the update metrics since the last log. Keeping every update's output alive instead
    # pins freed activation memory on the CPU heap (RSS grew by ~3 MB per update in our measurements).
    metric_sums: TensorDict | None = None
    num_pending_updates = 0
    last_eval_return = float("nan")
    collector_iter = iter(collector)
    for _ in range(len(collector)):
        with timeit("collect"):
            data = next(collector_iter)
        data[TRAJ_KEY] += traj_id_offset
        frames = data.numel()
        previous_frames, collected_frames = collected_frames, collected_frames + frames
        pbar.update(frames)
        # Store only what the loss and the slice sampler read, not the policy's latents (3 x 50 floats a step).
        replay_buffer.extend(data.reshape(-1).select(*loss.in_keys, TRAJ_KEY))

        if collected_frames >= cfg.collector.init_random_frames:
            # The noise anneals over the frames collected after the warm-up; the losses sample with the same std.
            if modules.exploration_noise is not None:
                modules.exploration_noise.step(min(frames, collected_frames - cfg.collector.init_random_frames))
                loss.actor_std = float(modules.exploration_noise.sigma)
            for _ in range(num_updates_per_batch):
                try:
                    batch = sample_slices(replay_buffer, cfg.optim.batch_size, cfg.loss.horizon)
                except RuntimeError as err:  # e.g. every stored episode is shorter than the horizon
                    sys.exit(f"alm.py: {err} (frame {collected_frames})")
                with timeit("update"):
                    try:
                        update_metrics = update(batch)
                    except NonFiniteGradientError as err:
                        sys.exit(
                            f"alm.py: {err}, found at frame {collected_frames} (update {num_updates}); "
                            f"the last good checkpoint is kept at {checkpoint_path.resolve()}"
                        )
                metric_sums = update_metrics.clone() if metric_sums is None else metric_sums.add_(update_metrics)
                num_pending_updates += 1
                num_updates += 1

        # Training metrics are averaged and logged at episode ends, not every batch of 10 frames.
        done = data["next", "done"].squeeze(-1)
        metrics: dict[str, float] = {}
        if done.any():
            metrics["train/episode_return"] = data["next", "episode_reward"][done].mean().item()
            metrics["train/episode_length"] = data["next", "step_count"][done].float().mean().item()
            if num_pending_updates:
                means = metric_sums / num_pending_updates
                metrics.update({f"train/{key}": value.item() for key, value in means.items()})
                metric_sums, num_pending_updates = None, 0
            metrics["train/num_updates"] = num_updates
            metrics["train/actor_std"] = float(loss.actor_std)
            metrics["train/frames_per_s"] = pbar.format_dict["rate"] or 0.0
            metrics.update(timeit.todict(prefix="time"))

        if collected_frames // cfg.logger.eval_iter > previous_frames // cfg.logger.eval_iter:
            with timeit("eval"):
                result = evaluate(eval_env, modules.eval_policy, cfg.logger.num_eval_episodes,
                                  cfg.env.max_episode_steps)
            if cfg.logger.lower_bound_bias:
                with timeit("eval_lower_bound"):
                    result.update(lower_bound_bias(eval_env, loss, modules.eval_policy, cfg.logger.num_eval_episodes,
                                                   cfg.loss.horizon, max_steps=cfg.env.max_episode_steps))
            last_eval_return = result["return_mean"]
            metrics.update({f"eval/{key}": value for key, value in result.items()})
            pbar.set_postfix(eval_return=f"{last_eval_return:.1f}")

        if logger is not None:
            for key, value in metrics.items():
                logger.log_scalar(key, value, step=collected_frames)
        if collected_frames // cfg.checkpoint.interval > previous_frames // cfg.checkpoint.interval:
            checkpoint()

    checkpoint()
    pbar.close()
    collector.shutdown()
    eval_env.close()
    print(f"Done: {collected_frames} frames, {num_updates} updates, last eval return {last_eval_return:.1f}")


if __name__ == "__main__":
    main()
