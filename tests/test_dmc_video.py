"""DMC tasks and evaluation videos end to end: tiny recipe runs (subprocesses) whose logs and mp4 files are read back.

The runs render, so each is its own process: after dm_control has rendered, gymnasium's EGL renderer returns black
frames in the same process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from alm_torchrl.envs import check_offscreen_rendering
from alm_torchrl.video import DEFAULT_VIDEO_SIZE, MP4CSVLogger, write_mp4
from recipes.alm.utils import ConfigError, load_config, validate_config

from conftest import TINY_RECIPE as TINY
from test_sweeps import _flat  # every leaf of a config by dotted key

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "alm" / "alm.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
# dmc/cartpole-swingup at action repeat 2 with 100-env-step episodes (50 agent steps), 400 env steps in all: a 100-step
# warm-up, then 5 updates per 10 agent steps (UTD 0.5); evaluations at 200 and 400, a video at the second only.
TINY = [override for override in TINY if not override.startswith("env.max_episode_steps=")]
DMC_RUN = [*TINY, "env.name=dmc/cartpole-swingup", "env.frame_skip=2", "env.max_episode_steps=100",
           "optim.utd_ratio=0.5", "collector.total_frames=400", "logger.eval_iter=200", "logger.video=true",
           "logger.video_every=2", "checkpoint.interval=100000"]
# HalfCheetah-v5 with 30-step episodes, a video at the only evaluation, rendered without shadows and reflections.
GYM_RUN = [*TINY, "env.name=HalfCheetah-v5", "env.max_episode_steps=30", "collector.total_frames=200",
           "logger.eval_iter=200", "logger.video=true", "logger.video_every=1", "logger.video_fast_render=true",
           "checkpoint.interval=100000"]


def _run(overrides: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RECIPE), *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _scalar(run_dir: Path, name: str) -> list[tuple[int, float]]:
    (csv,) = run_dir.glob(f"alm_logging/*/scalars/{name}.csv")
    return [(int(step), float(value)) for step, value in (row.split(",") for row in csv.read_text().splitlines())]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def dmc_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("dmc")
    return run_dir, _run(DMC_RUN, run_dir)


def test_dmc_run_counts_env_steps(dmc_run):
    run_dir, result = dmc_run
    # 200 agent steps = 400 env steps in 20 batches of 10; updates from the batch that ends the 100-env-step warm-up
    # on: 16 batches x 5.
    assert "Done: 400 frames, 80 updates" in result.stdout
    assert [step for step, _ in _scalar(run_dir, "eval/return_mean")] == [200, 400]
    assert [length for _, length in _scalar(run_dir, "eval/length_mean")] == [50.0, 50.0]  # agent steps
    assert {length for _, length in _scalar(run_dir, "train/episode_length")} == {50.0}
    returns = [value for _, value in _scalar(run_dir, "train/episode_return")]
    assert len(returns) == 4 and all(0 <= value <= 100 for value in returns)  # DMC rewards are in [0, 1] per env step
    # Neither dm_control's nor PyOpenGL's INFO lines nor MuJoCo's deprecation warnings reach the terminal.
    assert "absl" not in result.stderr and "INFO" not in result.stderr


def test_dmc_run_resumes_only_with_its_frame_skip(dmc_run):
    run_dir, _ = dmc_run
    overrides = [override for override in DMC_RUN if not override.startswith("env.frame_skip=")]
    cfg = load_config(*overrides, "env.frame_skip=1", "collector.total_frames=800",
                      f"checkpoint.resume={run_dir / 'checkpoints'}")
    with pytest.raises(ConfigError, match="was trained with env.frame_skip=2, not env.frame_skip=1; resume with "
                                          "env.frame_skip=2"):
        validate_config(cfg)
    validate_config(load_config(*DMC_RUN, "collector.total_frames=800", f"checkpoint.resume={run_dir / 'checkpoints'}"))


def test_dmc_run_records_one_video_every_video_every_evaluations(dmc_run):
    run_dir, _ = dmc_run
    videos = sorted(run_dir.glob("alm_logging/*/videos/**/*.mp4"))
    assert [video.relative_to(video.parents[2]).as_posix() for video in videos] == ["videos/eval/video_400.mp4"]
    frames = _decode(videos[0])
    # The reset frame and one per agent step of the 50-step episode, at the recorded size, not blank.
    assert frames.shape == (51, *DEFAULT_VIDEO_SIZE, 3)
    assert frames.std() > 10 and np.abs(frames[-1].astype(int) - frames[0]).mean() > 0.1
    ((step, video_return),) = _scalar(run_dir, "eval/video_return")
    assert step == 400 and 0 <= video_return <= 100


def test_gymnasium_run_records_a_video(tmp_path):
    result = _run(GYM_RUN, tmp_path)
    (video,) = tmp_path.glob("alm_logging/*/videos/eval/video_200.mp4")
    frames = _decode(video)
    assert frames.shape == (31, *DEFAULT_VIDEO_SIZE, 3) and frames.std() > 10
    # MuJoCo 3.17 warns at every HalfCheetah it builds that the model file uses a deprecated attribute: not shown.
    assert "deprecated" not in result.stderr and "WARNING" not in result.stderr


def test_mp4_csv_logger_writes_where_torchrl_would(tmp_path):
    logger = MP4CSVLogger("exp", log_dir=str(tmp_path))
    video = torch.randint(0, 256, (1, 7, 3, 33, 48), dtype=torch.uint8)
    logger.log_video("eval/video", video, step=10)
    logger.log_video("eval/video", video)  # no step: numbered per tag from 0
    assert _decode(tmp_path / "exp" / "videos" / "eval" / "video_10.mp4").shape == (7, 32, 48, 3)  # even height
    assert (tmp_path / "exp" / "videos" / "eval" / "video_0.mp4").is_file()


def test_write_mp4_keeps_the_frames(tmp_path):
    frames = torch.zeros(5, 64, 64, 3, dtype=torch.uint8)
    frames[:, 16:48, 16:48] = torch.tensor([200, 40, 40], dtype=torch.uint8)
    write_mp4(tmp_path / "square.mp4", frames, fps=10)
    decoded = _decode(tmp_path / "square.mp4").astype(int)
    assert decoded.shape == (5, 64, 64, 3)
    assert np.abs(decoded - frames.numpy()).mean() < 3  # lossy, but close


@pytest.mark.parametrize(("overrides", "message"), [
    (["logger.backend="], "logger.video=true needs logger.backend=csv or tensorboard or wandb, not logger.backend=''"),
    (["logger.video_every=0"], "logger.video_every must be a positive integer, got 0"),
])
def test_bad_video_config_is_one_line(overrides, message):
    cfg = load_config("logger.video=true", *overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert str(info.value) == message


def test_video_of_a_task_that_cannot_render_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if not installed, whether it is or not: classic control's
    with pytest.raises(ConfigError) as info:
        validate_config(load_config("logger.video=true", "env.name=Pendulum-v1"))
    assert str(info.value) == ("logger.video=true: 'Pendulum-v1' cannot render here: pygame is not installed, run "
                               "`pip install \"gymnasium[classic_control]\"`")


def test_rendering_that_cannot_work_says_what_to_install(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "glfw")  # GLFW needs a display, and there is none
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(RuntimeError) as info:
        check_offscreen_rendering()
    message = str(info.value)
    assert "\n" not in message and "MUJOCO_GL=glfw" in message and "apt install libegl1" in message


def test_tensorboard_logs_the_video_natively(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("moviepy.editor")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from recipes.alm.utils import make_logger

    monkeypatch.chdir(tmp_path)
    logger = make_logger(load_config("logger.backend=tensorboard", "logger.video=true"))
    logger.log_video("eval/video", torch.randint(0, 256, (1, 4, 3, 16, 16), dtype=torch.uint8), step=5)
    logger.experiment.flush()
    (events,) = tmp_path.glob("alm_logging/**/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    ((image,),) = [accumulator.Images(tag) for tag in accumulator.Tags()["images"]]
    assert image.step == 5 and (image.width, image.height) == (16, 16)


def test_wandb_logs_the_video_natively(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("moviepy")
    from recipes.alm.utils import make_logger

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = make_logger(load_config("logger.backend=wandb", "logger.video=true"))
    logger.log_video("eval/video", torch.randint(0, 256, (1, 6, 3, 32, 32), dtype=torch.uint8), step=5)
    logger.experiment.finish()
    (video,) = tmp_path.glob("**/files/media/videos/eval/video_*.mp4")
    assert _decode(video).shape[1:] == (32, 32, 3)


# ------------------------------------------------------------------------- experiment=dmc/<task> presets and sweeps
CONFIG_DIR = REPO / "recipes" / "alm"
FORK_TASKS = ["acrobot-swingup", "cheetah-run", "fish-swim", "quadruped-walk", "walker-walk", "humanoid-walk",
              "dog-walk", "dog-run"]
HARD_TASKS = ["walker-run", "quadruped-run", "hopper-hop", "humanoid-run", "finger-turn_hard", "reacher-hard"]
# What settings/alm_dmc_fork.yaml sets, and what the humanoid and dog presets raise.
FORK_SETTINGS = {"env.frame_skip": 2, "collector.total_frames": 1_000_000, "collector.init_random_frames": 10_000,
                 "replay_buffer.size": 500_000, "optim.utd_ratio": 0.5, "exploration.annealing_frames": 100_000,
                 "logger.eval_iter": 25_000, "logger.num_eval_episodes": 10}
LARGE_BODY = {"collector.total_frames": 5_000_000, "replay_buffer.size": 1_000_000, "network.latent_dim": 100,
              "exploration.annealing_frames": 250_000}


def test_every_dmc_preset_file_is_tested():
    assert sorted(p.stem for p in (CONFIG_DIR / "experiment" / "dmc").glob("*.yaml")) == sorted(
        FORK_TASKS + HARD_TASKS)


@pytest.mark.parametrize("task", FORK_TASKS + HARD_TASKS)
def test_dmc_preset_sets_the_fork_settings_and_nothing_else(task):
    text = (CONFIG_DIR / "experiment" / "dmc" / f"{task}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert ("github.com/zhaoyi11/alm_dmc" in text) == (task in FORK_TASKS)
    for source in ("github.com/nicklashansen/tdmpc2", "github.com/facebookresearch/MRQ", "as a terminal"):
        assert source in text
    cfg = load_config(f"experiment=dmc/{task}")
    validate_config(cfg)  # the task exists in the suite, and the frame counts fit the action repeat
    expected = {"env.name": f"dmc/{task}", **FORK_SETTINGS,
                **(LARGE_BODY if task.split("-")[0] in ("humanoid", "dog") else {})}
    preset, plain = _flat(cfg), _flat(load_config())
    assert {key: preset[key] for key in expected} == expected
    changed = {key for key in expected if plain[key] != expected[key]}
    assert {key for key in plain if preset[key] != plain[key]} == changed


def test_dmc_presets_sweep_with_the_local_launcher(tmp_path):
    """Two presets, tiny, through hydra/launcher=local: one job dir per task, named by the task."""
    sweep_dir = tmp_path / "multirun"
    tiny = [*TINY, "env.max_episode_steps=100", "collector.total_frames=200", "logger.eval_iter=200",
            "replay_buffer.size=1000", "checkpoint.interval=100000"]
    command = [sys.executable, str(RECIPE), "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2",
               f"hydra.sweep.dir={sweep_dir}", "experiment=dmc/reacher-hard,dmc/finger-turn_hard", *tiny]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, task in enumerate(["reacher-hard", "finger-turn_hard"]):
        job_dir = sweep_dir / "dmc" / task / f"seed0_job{job}"
        assert [step for step, _ in _scalar(job_dir, "eval/return_mean")] == [200]
        assert [length for _, length in _scalar(job_dir, "eval/length_mean")] == [50.0]  # the preset's action repeat


# ------------------------------------------------------------------------------------------------- benchmarks
def test_learning_benchmark_dmc_suite_commands(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import learning
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert learning.main(["--suite", "dmc", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if "recipes/alm/alm.py" in line]
    assert len(commands) == 9 and all("env.frame_skip=2" in line and "collector.total_frames=100000" in line
                                      for line in commands)
    assert {line.split("env.name=")[1].split()[0] for line in commands} == {"dmc/cartpole-swingup", "dmc/reacher-easy",
                                                                            "dmc/cartpole-balance"}
    (results,) = [line for line in lines if "alm_torchrl.results" in line]
    assert "docs/results/dmc_small_scale" in results and "--reference-dir" not in results
    assert "--frames 25000 50000 75000 100000" in results


def test_video_cost_benchmark_reports_its_parts():
    command = [sys.executable, str(REPO / "benchmarks" / "video_cost.py"), "--env", "dmc/cartpole-swingup",
               "--repeats", "1", "env.frame_skip=2", "env.max_episode_steps=20", "logger.num_eval_episodes=2",
               "network.hidden_dim=16", "network.model_hidden_dim=16", "network.latent_dim=4"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stdout.splitlines()
    report = json.loads(line)
    assert report["video_frames"] == 11 and report["num_eval_episodes"] == 2
    assert report["video_s"] == pytest.approx(report["video_episode_s"] + report["encode_s"], abs=2e-3)
    assert report["rendering_s"] > 0 and report["eval_s"] > 0
