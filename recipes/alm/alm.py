"""Train ALM (Aligned Latent Models, Ghugare et al., ICLR 2023) with TorchRL.

    python recipes/alm/alm.py env.name=Walker2d-v5
    python recipes/alm/alm.py checkpoint.resume=outputs/HalfCheetah-v5/<run>/checkpoints

Collect ``frames_per_batch`` steps with the noisy policy, store them, then run ``frames_per_batch * utd_ratio``
updates on ``[batch_size, horizon]`` slices; evaluate, log and checkpoint on frame intervals. The factories are in
``utils.py``.

SIGTERM, SIGUSR1, SIGUSR2 (a cluster's preemption or time-limit warning) and a first Ctrl-C finish the current batch
of updates, write a checkpoint and exit with status 75 (``RESUMABLE_EXIT_CODE``; during start-up, at once, before
anything is built); run the same command in the same run directory again (``checkpoint.resume=auto``, the default)
and it continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import mujoco
import numpy as np
import torch
import tqdm
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torchrl import timeit

from alm_torchrl.checkpoint import TrainingCheckpoints
from alm_torchrl.evaluation import evaluate, lower_bound_bias
from alm_torchrl.preemption import RESUMABLE_EXIT_CODE, StopSignals
from alm_torchrl.replay import TRAJ_KEY, NonFiniteDataError, check_finite
from alm_torchrl.update import NonFiniteGradientError
from utils import (
    apply_schema,
    checkpoint_metadata,
    ConfigError,
    configure_runtime,
    make_adaptive_threads,
    make_checkpoints,
    make_collector,
    make_environment,
    make_learner,
    make_logger,
    make_replay_buffer,
    make_video_env,
    sample_batches,
    MetricsLog,
    resolve_device,
    RESUME_AUTO,
    resume_checkpoint,
    UpdateMetrics,
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
    """A bad config value ends the run with one ``alm.py: invalid config: ...`` line, before any training; a second
    Ctrl-C (the first one checkpoints) with one line, at once."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> None:
        try:
            main(cfg)
        except ConfigError as err:
            sys.exit(f"alm.py: invalid config: {err}")
        except KeyboardInterrupt:
            tqdm.tqdm.write("alm.py: interrupted: stopped at once, without writing a checkpoint", file=sys.stderr)
            sys.exit(130)

    return wrapper


CONFIG_NAME = "config"


def continue_command() -> str:
    """The command that continues this run: the same config and overrides, in the same run directory."""
    hydra_config = HydraConfig.get()
    # Hydra's task overrides leave out the config options of the command line, without which a run of another config
    # (--config-name quick_start) would continue with config.yaml, whose values its checkpoint does not match.
    options = []
    for source in hydra_config.runtime.config_sources:
        file = source.schema == "file"
        location = source.path if file else f"{source.schema}://{source.path}"
        if source.provider == "main" and not (file and Path(location).resolve() == Path(__file__).resolve().parent):
            options += ["--config-path", location]
        elif source.provider == "command-line":
            options += ["--config-dir", location]
    if hydra_config.job.config_name != CONFIG_NAME:
        options += ["--config-name", hydra_config.job.config_name]
    overrides = [*hydra_config.overrides.task, f"hydra.run.dir={os.getcwd()}"]
    return shlex.join([Path(sys.executable).name, str(Path(__file__).resolve()), *options, *overrides])


@hydra.main(version_base="1.3", config_path=".", config_name=CONFIG_NAME)
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    if cfg.checkpoint.resume not in (None, RESUME_AUTO):
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
    say = functools.partial(tqdm.tqdm.write, file=sys.stderr)  # a line of its own, not after the progress bar's
    # SIGTERM, SIGUSR1/2, Ctrl-C: stop at the next safe point, resumable. Caught from the start-up checks on, which read
    # every byte of a checkpoint to resume (a minute for a Humanoid buffer's).
    with StopSignals(announce=say) as stop:
        stopped_at = train(cfg, stop, say)
    if stopped_at is not None:  # the signal handlers are back to what they were
        print(f"alm.py: stopped by {stop.requested.name} at {stopped_at}, to be resumed: {continue_command()}",
              file=sys.stderr, flush=True)
        stop.forward()  # submitit's handler, when it runs us: requeues the job and exits
        sys.exit(RESUMABLE_EXIT_CODE)


def train(cfg: DictConfig, stop: StopSignals, say: Callable[[str], None]) -> str | None:
    """Check the config, build everything and train to ``collector.total_frames``, or until a stop is requested: during
    start-up, before anything is built; later, after the current batch of updates and a checkpoint. Returns None once
    the run is over, else where it stopped and what is saved (``"frame <n> (<checkpoint>)"``)."""
    validate_config(cfg)
    resume = resume_checkpoint(cfg)  # with checkpoint.resume=auto: this run dir's own checkpoint, if any
    resumed = TrainingCheckpoints.metadata(resume) if resume is not None else None
    if resumed is not None and resumed["collected_frames"] >= cfg.collector.total_frames:  # only with auto
        print(f"alm.py: {resume.resolve()} holds this run, finished at frame {resumed['collected_frames']}",
              file=sys.stderr)
        return None
    device = resolve_device(cfg)
    configure_runtime(cfg)
    if stop.requested:  # during the start-up checks: the checkpoint to resume stays the last one
        if resume is None:
            return "frame 0 (nothing to save yet)"
        return f"frame {resumed['collected_frames']} (checkpoint {TrainingCheckpoints.find(resume).resolve()})"
    timeit.reset()  # a process-pool launcher may run several jobs in one process
    torch.manual_seed(cfg.env.seed)
    np.random.seed(cfg.env.seed)
    random.seed(cfg.env.seed)

    # Environments: the env steps on the CPU (MuJoCo); the policy and learner run on `device`.
    train_env, eval_env = make_environment(cfg)

    # Networks, loss, target updater, optimizer and the update step; torch's threads; the replay buffer.
    learner = make_learner(cfg, train_env, device)
    agent, loss, update = learner.agent, learner.loss, learner.update
    threads = make_adaptive_threads(cfg, learner, device)
    replay_buffer = make_replay_buffer(cfg, device)
    collector = make_collector(cfg, train_env, agent.policy, device)
    update_metrics = UpdateMetrics()  # averaged over the updates between two logs
    checkpoints = make_checkpoints(cfg, learner, replay_buffer, collector=collector, eval_env=eval_env,
                                   update_metrics=update_metrics)

    collected_frames = num_updates = 0
    last_checkpoint = last_checkpoint_frames = None
    if resume is not None:
        # Loaded after everything is built, the RNG states last: building draws random numbers (the collector
        # runs the policy once), as it did before the checkpoint in the run that wrote it.
        checkpoints.load(resume, device=device, verify=False)  # validate_config verified every file
        collected_frames, num_updates = resumed["collected_frames"], resumed["num_updates"]
        last_checkpoint, last_checkpoint_frames = TrainingCheckpoints.find(resume).resolve(), collected_frames
        restarts = ""
        if not checkpoints.collector_state.restored_episode:  # a task whose simulator state is not saved
            train_env.set_seed(cfg.env.seed + collected_frames)  # not a repeat of the first episode
            collector.reset()
            restarts = "; the episode in progress restarts"
        print(f"Resumed from {resume.resolve()} at frame {collected_frames}{restarts}", file=sys.stderr)

    logger = make_logger(cfg, resumed)  # a run resumed in place goes on writing its own logs
    metrics_log = MetricsLog(logger, announce=say)
    video_env = make_video_env(cfg, logger)  # None unless logger.video

    def kept() -> str:
        if last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint is {last_checkpoint} (frame {last_checkpoint_frames})"

    def checkpoint(then: str) -> bool:
        """Write a checkpoint of the current frame, unless one exists. A write that fails (a full disk) leaves the
        previous checkpoint whole and says so in one line, ending with ``then``; returns whether it was written."""
        nonlocal last_checkpoint, last_checkpoint_frames
        if last_checkpoint_frames == collected_frames:
            return True
        metadata = checkpoint_metadata(cfg, collected_frames, num_updates, metrics_log.logger)
        try:
            last_checkpoint = checkpoints.save(collected_frames, metadata)
        except OSError as err:
            say(f"alm.py: the checkpoint of frame {collected_frames} was not written ({err}); {kept()}; {then}")
            return False
        last_checkpoint_frames = collected_frames
        return True

    pbar = tqdm.tqdm(total=cfg.collector.total_frames, initial=collected_frames, unit="frames")

    def fail(message: str) -> None:
        pbar.close()
        sys.exit(f"alm.py: {message}")

    last_eval_return = float("nan")
    collector_iter = iter(collector)
    while collected_frames < cfg.collector.total_frames and not stop.requested:
        with timeit("collect"):
            data = next(collector_iter)
        frames = data.numel() * cfg.env.frame_skip  # env steps, as every frame count of the config
        previous_frames, collected_frames = collected_frames, collected_frames + frames
        pbar.update(frames)
        # Store only what the loss and the slice sampler read, not the policy's latents (3 x 50 floats a step),
        # and never a NaN or infinity (one check per batch).
        stored = data.reshape(-1).select(*loss.in_keys, TRAJ_KEY, ("next", "step_count"))
        try:
            check_finite(stored, first_frame=previous_frames + 1)
        except NonFiniteDataError as err:
            fail(f"{err} in the collected data; it was not stored and the run stops; {kept()}")
        replay_buffer.extend(stored.exclude(("next", "step_count")))

        if collected_frames >= cfg.collector.init_random_frames:
            # The noise anneals over the frames collected after the warm-up; the losses sample with the same std.
            if agent.exploration_noise is not None:
                agent.exploration_noise.step(min(frames, collected_frames - cfg.collector.init_random_frames))
                loss.actor_std = float(agent.exploration_noise.sigma)
            try:
                batches = sample_batches(cfg, replay_buffer)  # all of them in one draw, from states
            except RuntimeError as err:  # e.g. every stored episode is shorter than the horizon
                fail(f"{err} (frame {collected_frames})")
            for batch in batches:
                with timeit("update"):
                    try:
                        update_metrics.add(update(batch))
                    except NonFiniteGradientError as err:
                        fail(f"{err}, found at frame {collected_frames} (update {num_updates}); {kept()}")
                num_updates += 1
            if threads is not None:
                threads.update()  # follows the load of the machine, every half minute

        # Training metrics are averaged and logged at episode ends, not every batch of 10 frames.
        done = data["next", "done"].squeeze(-1)
        metrics: dict[str, float] = {}
        if done.any():
            metrics["train/episode_return"] = data["next", "episode_reward"][done].mean().item()
            metrics["train/episode_length"] = data["next", "step_count"][done].float().mean().item()
            metrics.update({f"train/{key}": value for key, value in update_metrics.pop_means().items()})
            metrics["train/num_updates"] = num_updates
            metrics["train/actor_std"] = float(loss.actor_std)
            metrics["train/frames_per_s"] = pbar.format_dict["rate"] or 0.0
            metrics.update(timeit.todict(prefix="time"))

        if collected_frames // cfg.logger.eval_iter > previous_frames // cfg.logger.eval_iter:
            with timeit("eval"):
                result = evaluate(eval_env, agent.eval_policy, cfg.logger.num_eval_episodes,
                                  cfg.env.max_episode_steps)
            if cfg.logger.lower_bound_bias:
                with timeit("eval_lower_bound"):
                    result.update(lower_bound_bias(eval_env, loss, agent.eval_policy,
                                                   cfg.logger.num_eval_episodes, cfg.loss.horizon,
                                                   max_steps=cfg.env.max_episode_steps,
                                                   sample_latents=cfg.logger.eval_latent == "sample"))
            evaluation = collected_frames // cfg.logger.eval_iter
            if video_env is not None and evaluation % cfg.logger.video_every == 0:
                with timeit("eval_video"):  # one more mean-action episode, rendered and logged as a video
                    recorded = evaluate(video_env, agent.eval_policy, 1, cfg.env.max_episode_steps)
                    video_env.transform.dump(step=collected_frames)
                result["video_return"] = recorded["return_mean"]
            last_eval_return = result["return_mean"]
            metrics.update({f"eval/{key}": value for key, value in result.items()})
            pbar.set_postfix(eval_return=f"{last_eval_return:.1f}")

        metrics_log.log(metrics, step=collected_frames)
        if collected_frames // cfg.checkpoint.interval > previous_frames // cfg.checkpoint.interval:
            next_try = (collected_frames // cfg.checkpoint.interval + 1) * cfg.checkpoint.interval
            checkpoint(then=f"training goes on and tries again at frame {next_try}")

    pbar.close()
    finished = collected_frames >= cfg.collector.total_frames
    if finished:
        written = checkpoint(then="the run is over")
    else:  # stopped by a signal
        written = collected_frames == 0 or checkpoint(then="stopping anyway")
    collector.shutdown()
    eval_env.close()
    if video_env is not None:
        video_env.close()

    if not finished:
        saved = (f"checkpoint {last_checkpoint}" if written and collected_frames
                 else "nothing to save yet" if not collected_frames else kept())
        return f"frame {collected_frames} ({saved})"
    if not written:
        sys.exit(f"alm.py: finished at frame {collected_frames}, but its final checkpoint could not be written")
    print(f"Done: {collected_frames} frames, {num_updates} updates, last eval return {last_eval_return:.1f}")
    return None


if __name__ == "__main__":
    main()
