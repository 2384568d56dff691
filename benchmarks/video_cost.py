"""What ``logger.video=true`` adds to an evaluation: the recorded episode, its rendering and its encoding.

Builds the evaluation env, the video env, the logger and the agent with the recipe's config and factories, then
times, as the recipe runs them (``--repeats`` times each, medians reported as one JSON line on stdout):

- ``eval_s``: one evaluation without video (``logger.num_eval_episodes`` mean-action episodes side by side);
- ``video_s``: what a video evaluation adds (``time/eval_video`` of the recipe): one more mean-action episode in the
  rendering env, then ``dump``, i.e. encoding and writing the mp4 (CSV logger);
- the parts of ``video_s``: ``video_episode_s`` (the episode with rendering and recording), ``encode_s``, and
  ``episode_without_rendering_s``, the same episode in an env that does not render (same task, seed, policy), so that
  ``rendering_s = video_episode_s - episode_without_rendering_s`` is what rendering and recording the frames cost;
- ``video_frames``, ``ms_per_rendered_frame`` and ``video_mb``.

The agent is untrained (random weights): evaluation cost does not depend on what it learned, except through episode
length, which is fixed on the tasks timed here (HalfCheetah-v5, DMC). One task per process: once dm_control has
rendered, gymnasium's renderer returns black frames in the same process.

    python benchmarks/video_cost.py                                          # HalfCheetah-v5, paper sizes
    python benchmarks/video_cost.py --env dmc/cheetah-run env.frame_skip=2   # a DMC task at action repeat 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for recipes.alm.utils
from alm_torchrl.envs import make_env  # noqa: E402
from alm_torchrl.evaluation import evaluate  # noqa: E402
from alm_torchrl.runtime import configure_cpu_runtime  # noqa: E402
from recipes.alm.utils import (  # noqa: E402
    load_config,
    make_alm_agent,
    make_environment,
    make_logger,
    make_video_env,
    validate_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="HalfCheetah-v5", help="env.name")
    parser.add_argument("--repeats", type=int, default=2, help="timed evaluations of each kind (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (compile.num_threads)")
    parser.add_argument("overrides", nargs="*", help="more recipe config overrides, e.g. env.frame_skip=2")
    return parser.parse_args(argv)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    configure_cpu_runtime(args.threads)
    cfg = load_config(f"env.name={args.env}", "logger.backend=csv", "logger.video=true", *args.overrides)
    validate_config(cfg)
    os.chdir(tempfile.mkdtemp(prefix="video_cost_"))  # the CSV logger writes to ./alm_logging
    torch.manual_seed(0)
    _, eval_env = make_environment(cfg)
    logger = make_logger(cfg)
    video_env = make_video_env(cfg, logger)
    quiet_env = make_env(cfg.env.name, seed=cfg.env.seed + 1 + cfg.logger.num_eval_episodes,
                         max_episode_steps=cfg.env.max_episode_steps, frame_skip=cfg.env.frame_skip,
                         scale_actions=cfg.env.scale_actions)
    agent = make_alm_agent(cfg, eval_env, torch.device("cpu"))
    policy, max_steps = agent.eval_policy, cfg.env.max_episode_steps

    # Warm-up: first calls, the rendering context, the encoder (a few steps each).
    for env in (eval_env, video_env, quiet_env):
        evaluate(env, policy, 1 if env is not eval_env else cfg.logger.num_eval_episodes, 10)
    video_env.transform.dump(step=0)
    times: dict[str, list[float]] = {"eval_s": [], "video_episode_s": [], "encode_s": [],
                                     "episode_without_rendering_s": []}
    for repeat in range(1, args.repeats + 1):  # interleaved, so that a change of machine load hits every kind
        times["eval_s"].append(timed(lambda: evaluate(eval_env, policy, cfg.logger.num_eval_episodes, max_steps))[0])
        seconds, recorded = timed(lambda: evaluate(video_env, policy, 1, max_steps))
        times["video_episode_s"].append(seconds)
        times["encode_s"].append(timed(partial(video_env.transform.dump, step=repeat))[0])
        times["episode_without_rendering_s"].append(timed(lambda: evaluate(quiet_env, policy, 1, max_steps))[0])
    result = {key: round(statistics.median(values), 3) for key, values in times.items()}
    result["video_s"] = round(result["video_episode_s"] + result["encode_s"], 3)
    result["rendering_s"] = round(result["video_episode_s"] - result["episode_without_rendering_s"], 3)
    frames = int(recorded["length_mean"]) + 1  # the reset frame and one per step
    videos = sorted(Path(logger.experiment.log_dir, "videos").rglob("*.mp4"))
    result.update({
        "benchmark": "video_cost", "env": cfg.env.name, "frame_skip": cfg.env.frame_skip,
        "num_eval_episodes": cfg.logger.num_eval_episodes, "repeats": args.repeats, "video_frames": frames,
        "ms_per_rendered_frame": round(1000 * result["rendering_s"] / frames, 1),
        "video_mb": round(videos[-1].stat().st_size / 2**20, 2),
        "all_s": {key: [round(value, 3) for value in values] for key, values in times.items()},
        "mujoco_gl": os.environ.get("MUJOCO_GL"), "cpu": cpu_model(),
        "load_average": os.getloadavg(), "overrides": args.overrides,
    })
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
