"""Tests for alm_torchrl.envs: presets, keys and dtypes, and time-limit truncation semantics."""

from __future__ import annotations

import pytest
import torch

from alm_torchrl.envs import ENV_PRESETS, check_env_name, make_env, replay_buffer_size_for, rollout_episodes

from conftest import fixed_policy

EXPECTED_KEYS = [
    "observation",
    "step_count",
    "is_init",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "truncated"),
    ("next", "done"),
    ("next", "episode_reward"),
]


@pytest.mark.parametrize("env_name", ["HalfCheetah-v5", "Pendulum-v1"])
def test_env_keys_and_dtypes(env_name: str) -> None:
    env = make_env(env_name, seed=0)
    rollout = env.rollout(5)
    keys = rollout.keys(include_nested=True)
    for key in EXPECTED_KEYS:
        assert key in keys, key
    assert rollout["observation"].dtype == torch.float32
    assert rollout["next", "observation"].dtype == torch.float32
    assert rollout["next", "reward"].dtype == torch.float32


@pytest.mark.parametrize(("env_name", "obs_dim"), [("T-Ant", 27), ("T-Humanoid", 45)])
def test_truncated_observation_presets(env_name: str, obs_dim: int) -> None:
    env = make_env(env_name)
    assert env.observation_spec["observation"].shape == (obs_dim,)
    assert env.reset()["observation"].shape == (obs_dim,)
    assert make_env(env_name, num_envs=2).reset()["observation"].shape == (2, obs_dim)


def test_step_counter_truncation_is_not_termination() -> None:
    # Pendulum never terminates, and its own 200-step TimeLimit must not interfere.
    env = make_env("Pendulum-v1", seed=0, max_episode_steps=20)
    rollout = env.rollout(50, break_when_any_done=False)
    truncated = rollout["next", "truncated"].squeeze(-1)
    assert truncated.nonzero().squeeze(-1).tolist() == [19, 39]
    assert not rollout["next", "terminated"].any()
    assert torch.equal(rollout["next", "done"].squeeze(-1), truncated)


def test_gymnasium_time_limit_is_disabled() -> None:
    # Pendulum-v1 registers a 200-step TimeLimit; StepCounter alone must decide.
    env = make_env("Pendulum-v1", seed=0, max_episode_steps=250)
    rollout = env.rollout(240)
    assert rollout.shape == (240,)
    assert not rollout["next", "done"].any()


def test_seed_is_reproducible() -> None:
    first = make_env("Hopper-v5", seed=3).reset()["observation"]
    second = make_env("Hopper-v5", seed=3).reset()["observation"]
    assert torch.equal(first, second)


def test_unknown_env_name() -> None:
    with pytest.raises(ValueError, match="HalfCheetah-v9") as info:
        make_env("HalfCheetah-v9")
    message = str(info.value)
    assert "\n" not in message
    assert "T-Humanoid" in message and "gymnasium" in message


def test_presets_need_from_preset() -> None:
    check_env_name("T-Ant")
    with pytest.raises(ValueError, match="T-Ant"):
        make_env("T-Ant", from_preset=False)


def test_replay_buffer_sizes() -> None:
    assert replay_buffer_size_for("Humanoid-v5") == 1_000_000
    assert replay_buffer_size_for("T-Humanoid") == 1_000_000
    assert replay_buffer_size_for("HalfCheetah-v5") == 100_000
    assert replay_buffer_size_for("Pendulum-v1") == 100_000
    assert all(preset.max_episode_steps == 1000 for preset in ENV_PRESETS.values())


def test_batched_env_runs_the_episodes_of_separately_seeded_envs() -> None:
    batched = make_env("Hopper-v5", seed=7, num_envs=3, max_episode_steps=200)
    assert batched.batch_size == (3,)
    policy = fixed_policy(batched)
    episodes = rollout_episodes(batched, policy, max_steps=200)
    alone = [rollout_episodes(make_env("Hopper-v5", seed=7 + i, max_episode_steps=200), policy, 200)[0]
             for i in range(3)]
    lengths = [len(episode) for episode in episodes]
    # Copies that finish early repeat their last step until the last one is done: those steps must be cut off.
    assert len(set(lengths)) > 1 and lengths == [len(episode) for episode in alone]
    for side_by_side, single in zip(episodes, alone):
        assert side_by_side["next", "done"][-1].item() and not side_by_side["next", "done"][:-1].any()
        torch.testing.assert_close(side_by_side["observation"], single["observation"])
        torch.testing.assert_close(side_by_side["next", "reward"], single["next", "reward"])


def test_rollout_episodes_of_an_unbatched_env_stops_at_the_time_limit() -> None:
    env = make_env("Pendulum-v1", seed=0, max_episode_steps=20)
    (episode,) = rollout_episodes(env, fixed_policy(env), max_steps=50)
    assert len(episode) == 20 and episode["next", "truncated"][-1].item()


def test_num_envs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_envs must be >= 1, got 0"):
        make_env("Pendulum-v1", num_envs=0)
