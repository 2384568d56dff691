"""Train ALM (Aligned Latent Models, Ghugare et al., ICLR 2023) with TorchRL.

    python recipes/alm/alm.py env.name=Walker2d-v5
    python recipes/alm/alm.py checkpoint.resume=outputs/HalfCheetah-v5/<run>/checkpoints

Collect ``frames_per_batch`` steps with the noisy policy, store them, then run ``frames_per_batch * utd_ratio``
updates on ``[batch_size, horizon]`` slices; evaluate, log and checkpoint on frame intervals. The factories are in
``utils.py``.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
from pathlib import Path

import hydra
import mujoco
import numpy as np
import torch
import tqdm
from omegaconf import DictConfig
from tensordict import TensorDict
from torchrl import timeit

from alm_torchrl.evaluation import evaluate, lower_bound_bias
from alm_torchrl.replay import TRAJ_KEY, sample_slices
from alm_torchrl.update import NonFiniteGradientError
from utils import (
    apply_schema,
    checkpoint_metadata,
    ConfigError,
    configure_runtime,
    log_metrics,
    make_checkpoints,
    make_collector,
    make_environment,
    make_learner,
    make_logger,
    make_replay_buffer,
    make_video_env,
    resolve_device,
    updates_per_batch,
    validate_config,
)

torch.set_float32_matmul_precision("high")

# Hydra's sweep launchers (joblib, submitit) run main() in worker processes, which must import utils.py as well.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


class WithoutModelDeprecations(logging.Filter):
    """Drops MuJoCo's notices that a model file uses a deprecated attribute: gymnasium's and dm_control's model files
    use 'settotalmass' (deprecated in MuJoCo 3.x), one notice per env built, which a user of the recipe cannot act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "is deprecated" not in record.getMessage()


QUIET_DEPRECATIONS = WithoutModelDeprecations()


def exit_on_config_error(main):
    """A bad config value ends the run with one ``alm.py: invalid config: ...`` line, before any training."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> None:
        try:
            main(cfg)
        except ConfigError as err:
            sys.exit(f"alm.py: invalid config: {err}")

    return wrapper


@hydra.main(version_base="1.3", config_path=".", config_name="config")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    if cfg.checkpoint.resume:
        cfg.checkpoint.resume = hydra.utils.to_absolute_path(cfg.checkpoint.resume)
    # The progress bar and real warnings only: no INFO lines of TorchRL (spec checks, storage initialisation),
    # dm_control (absl) and PyOpenGL, and MuJoCo's warnings through logging without its model-file deprecations
    # (dm_control sends them to absl; gymnasium leaves them to MuJoCo, which would print them).
    for name in ("torchrl", "OpenGL", "absl", "mujoco"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("absl", "mujoco"):
        logging.getLogger(name).addFilter(QUIET_DEPRECATIONS)
    mujoco.set_mju_user_warning(logging.getLogger("mujoco").warning)
    cfg = apply_schema(cfg)
    validate_config(cfg)
    device = resolve_device(cfg)
    configure_runtime(cfg)
    timeit.reset()  # a process-pool launcher may run several jobs in one process
    torch.manual_seed(cfg.env.seed)
    np.random.seed(cfg.env.seed)
    random.seed(cfg.env.seed)

    # Environments: the env steps on the CPU (MuJoCo); the policy and learner run on `device`.
    train_env, eval_env = make_environment(cfg)

    # Networks, loss, target updater, optimizer and the update step; then the replay buffer.
    learner = make_learner(cfg, train_env, device)
    agent, loss, update = learner.agent, learner.loss, learner.update
    replay_buffer = make_replay_buffer(cfg, device)
    checkpoints = make_checkpoints(cfg, learner, replay_buffer)

    collected_frames = num_updates = 0
    traj_id_offset = 0
    if cfg.checkpoint.resume:
        stored = checkpoints.load(cfg.checkpoint.resume, device=device)
        collected_frames, num_updates = stored["collected_frames"], stored["num_updates"]
        # New trajectory ids must not continue a stored trajectory, or the slice sampler would join them.
        traj_id_offset = int(replay_buffer.storage[: len(replay_buffer)].get(TRAJ_KEY).max()) + 1
        train_env.set_seed(cfg.env.seed + collected_frames)
        print(f"Resumed from {cfg.checkpoint.resume} at frame {collected_frames}", file=sys.stderr)

    collector = make_collector(cfg, train_env, agent.policy, device, collected_frames)
    logger = make_logger(cfg)
    video_env = make_video_env(cfg, logger)  # None unless logger.video
    num_updates_per_batch = updates_per_batch(cfg)
    last_checkpoint, last_checkpoint_frames = None, None

    def checkpoint() -> None:
        nonlocal last_checkpoint, last_checkpoint_frames
        if last_checkpoint_frames != collected_frames:
            metadata = checkpoint_metadata(cfg, collected_frames, num_updates)
            last_checkpoint, last_checkpoint_frames = checkpoints.save(collected_frames, metadata), collected_frames

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
        frames = data.numel() * cfg.env.frame_skip  # env steps, as every frame count of the config
        previous_frames, collected_frames = collected_frames, collected_frames + frames
        pbar.update(frames)
        # Store only what the loss and the slice sampler read, not the policy's latents (3 x 50 floats a step).
        replay_buffer.extend(data.reshape(-1).select(*loss.in_keys, TRAJ_KEY))

        if collected_frames >= cfg.collector.init_random_frames:
            # The noise anneals over the frames collected after the warm-up; the losses sample with the same std.
            if agent.exploration_noise is not None:
                agent.exploration_noise.step(min(frames, collected_frames - cfg.collector.init_random_frames))
                loss.actor_std = float(agent.exploration_noise.sigma)
            for _ in range(num_updates_per_batch):
                try:
                    batch = sample_slices(replay_buffer, cfg.optim.batch_size, cfg.loss.horizon)
                except RuntimeError as err:  # e.g. every stored episode is shorter than the horizon
                    sys.exit(f"alm.py: {err} (frame {collected_frames})")
                with timeit("update"):
                    try:
                        update_metrics = update(batch)
                    except NonFiniteGradientError as err:
                        kept = f"kept at {last_checkpoint}" if last_checkpoint else "none was written yet"
                        sys.exit(
                            f"alm.py: {err}, found at frame {collected_frames} (update {num_updates}); "
                            f"the last good checkpoint is {kept}"
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
                result = evaluate(eval_env, agent.eval_policy, cfg.logger.num_eval_episodes, cfg.env.max_episode_steps)
            if cfg.logger.lower_bound_bias:
                with timeit("eval_lower_bound"):
                    result.update(lower_bound_bias(eval_env, loss, agent.eval_policy, cfg.logger.num_eval_episodes,
                                                   cfg.loss.horizon, max_steps=cfg.env.max_episode_steps))
            evaluation = collected_frames // cfg.logger.eval_iter
            if video_env is not None and evaluation % cfg.logger.video_every == 0:
                with timeit("eval_video"):  # one more mean-action episode, rendered and logged as a video
                    recorded = evaluate(video_env, agent.eval_policy, 1, cfg.env.max_episode_steps)
                    video_env.transform.dump(step=collected_frames)
                result["video_return"] = recorded["return_mean"]
            last_eval_return = result["return_mean"]
            metrics.update({f"eval/{key}": value for key, value in result.items()})
            pbar.set_postfix(eval_return=f"{last_eval_return:.1f}")

        log_metrics(logger, metrics, step=collected_frames)
        if collected_frames // cfg.checkpoint.interval > previous_frames // cfg.checkpoint.interval:
            checkpoint()

    checkpoint()
    pbar.close()
    collector.shutdown()
    eval_env.close()
    if video_env is not None:
        video_env.close()
    print(f"Done: {collected_frames} frames, {num_updates} updates, last eval return {last_eval_return:.1f}")


if __name__ == "__main__":
    main()
