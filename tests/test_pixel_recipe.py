"""ALM from pixels through the recipe (``env.from_pixels=true``): the env's stacked frames, the buffer that stores each
frame once, and tiny training runs on a DMC task and on a gymnasium MuJoCo task (subprocesses: see
``test_dmc_video.py`` for why rendering runs each get a process of their own)."""
from __future__ import annotations

import av
import pytest
import torch

from alm_torchrl.envs import SimulatorState
from alm_torchrl.frames import FrameStackStorage
from alm_torchrl.modules import ConvFeatures
from alm_torchrl.transforms import RandomShift
from recipes.alm.utils import (
    ConfigError,
    load_config,
    make_environment,
    make_learner,
    make_replay_buffer,
    resolve_device,
    validate_config,
)

from conftest import TINY_RECIPE as TINY
from test_dmc_video import _run, _scalar  # a recipe subprocess that must succeed; a logged scalar's rows

TINY = [override for override in TINY if not override.startswith("env.max_episode_steps=")]
# 16x16 frames (the smallest the DrQ-v2 encoder takes is 15x15), 8 channels; action repeat 2 (the pixel default).
PIXELS = [*TINY, "env.from_pixels=true", "env.image_size=16", "network.conv_channels=8",
          "network.conv_feature_dim=8", "env.max_episode_steps=60", "checkpoint.interval=100000"]


def test_pixel_config_builds_stacked_frames_a_conv_encoder_and_a_frame_buffer():
    cfg = load_config(*PIXELS, "env.name=dmc/cartpole-swingup", "logger.num_eval_episodes=2")
    validate_config(cfg)
    assert cfg.env.frame_skip == 2  # DrQ-v2's action repeat, the pixel default (1 from states)
    assert load_config(*TINY).env.frame_skip == 1
    train_env, eval_env = make_environment(cfg)
    reset = train_env.reset()
    assert "observation" not in reset.keys() and "observation" not in train_env.observation_spec.keys()
    assert reset["pixels"].shape == (9, 16, 16) and reset["pixels"].dtype == torch.uint8
    # An episode starts with its first frame repeated (CatFrames' padding="same").
    assert (reset["pixels"][:3] == reset["pixels"][3:6]).all() and (reset["pixels"][:3] == reset["pixels"][6:]).all()
    stepped = train_env.rand_step(reset)
    assert (stepped["next", "pixels"][:6] == reset["pixels"][3:]).all()  # the stack moved by one frame
    assert eval_env.reset()["pixels"].shape == (2, 9, 16, 16)  # the evaluation's copies, side by side
    device = resolve_device(cfg)
    learner = make_learner(cfg, train_env, device)
    assert any(isinstance(module, ConvFeatures) for module in learner.agent.encoder.modules())
    assert "pixels" in learner.loss.in_keys and "observation" not in learner.loss.in_keys
    replay_buffer = make_replay_buffer(cfg, device)
    assert isinstance(replay_buffer.storage, FrameStackStorage)
    assert any(isinstance(transform, RandomShift) for transform in replay_buffer.transform)
    no_shift = make_replay_buffer(load_config(*PIXELS, "env.name=dmc/cartpole-swingup", "replay_buffer.random_shift=0"),
                                  device)
    assert not any(isinstance(transform, RandomShift) for transform in no_shift.transform)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["env.name=Pendulum-v1"], "env.from_pixels=true renders DMC and gymnasium MuJoCo tasks, not "
                                   "env.name='Pendulum-v1'"),
        (["env.image_size=12"], "env.image_size=12 is too small for the image encoder's four 3x3 convolutions"),
        (["env.num_frames=0"], "env.num_frames must be >= 1 (frames stacked; DrQ-v2: 3), got 0"),
        (["replay_buffer.random_shift=-1"], "replay_buffer.random_shift must be >= 0"),
    ],
)
def test_bad_pixel_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate_config(load_config(*PIXELS, "env.name=dmc/cartpole-swingup", *overrides))


def test_a_dmc_pixel_run_trains_records_what_the_agent_sees_and_resumes(tmp_path):
    # 200 env steps (100 agent steps) of dmc/cartpole-swingup from 16x16 pixels, with a video of the evaluation, then
    # resumed to 240 in place.
    overrides = [*PIXELS, "env.name=dmc/cartpole-swingup", "logger.eval_iter=200", "logger.video=true",
                 "logger.video_every=1"]
    first = _run([*overrides, "collector.total_frames=200"], tmp_path)
    # 10 updates per batch of 10 agent steps (20 env steps), from the batch that ends the 100-step warm-up: 6 batches.
    assert "Done: 200 frames, 60 updates" in first.stdout
    assert [step for step, _ in _scalar(tmp_path, "eval/return_mean")] == [200]
    # The video env gives the policy its stacked frames and records the unstacked ones: the agent's view.
    (video,) = tmp_path.glob("alm_logging/*/videos/eval/video_200.mp4")
    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 30 + 1 and frames[0].shape == (16, 16, 3)  # 60 env steps at action repeat 2, and the reset
    assert all(value == value for _, value in _scalar(tmp_path, "train/loss_model"))  # no NaN
    second = _run([*overrides, "collector.total_frames=240"], tmp_path)  # checkpoint.resume=auto: the same run
    assert "Resumed from" in second.stderr and "at frame 200" in second.stderr
    assert "Done: 240 frames, 80 updates" in second.stdout


def test_a_gymnasium_pixel_run_trains(tmp_path):
    result = _run([*PIXELS, "env.name=InvertedPendulum-v5", "env.frame_skip=1", "collector.total_frames=200",
                   "logger.eval_iter=200"], tmp_path)
    assert "Done: 200 frames, 110 updates" in result.stdout
    (step, value), = _scalar(tmp_path, "eval/return_mean")
    assert step == 200 and value > 0  # InvertedPendulum pays 1 per step until the pole falls


def test_a_pixel_env_is_not_restored_mid_episode():
    # CatFrames remembers the frames of the episode in progress, which a checkpoint does not hold: a resumed pixel run
    # starts a fresh episode (the state task's is continued exactly: tests/test_reliability.py).
    state_env, _ = make_environment(load_config(*TINY, "env.name=InvertedPendulum-v5"))
    pixel_env, _ = make_environment(load_config(*PIXELS, "env.name=InvertedPendulum-v5"))
    assert SimulatorState(state_env).restorable and not SimulatorState(pixel_env).restorable
    assert SimulatorState(pixel_env).state_dict() == {}
