"""Tests for alm_torchrl.envs: presets, keys and dtypes, and time-limit truncation semantics."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control import PendulumEnv

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


# ------------------------------------------------------------------------------- DeepMind Control Suite tasks
def test_dmc_observation_entries_are_concatenated_in_float32() -> None:
    env = make_env("dmc/cheetah-run", seed=0)
    assert env.observation_spec["observation"].shape == (17,)  # position (8) and velocity (9)
    rollout = env.rollout(5)
    for key in EXPECTED_KEYS:
        assert key in rollout.keys(include_nested=True), key
    assert "position" not in rollout.keys() and "velocity" not in rollout.keys()
    for key in ("observation", ("next", "observation"), ("next", "reward"), "action"):
        assert rollout[key].dtype == torch.float32, key
    # Matrix-valued entries (stacker's arm and box positions) are flattened into the same vector.
    assert make_env("dmc/stacker-stack_2", seed=0).observation_spec["observation"].shape == (49,)


@pytest.mark.parametrize("frame_skip", [2, 5])
def test_dmc_time_limit_is_a_truncation_not_a_terminal(frame_skip: int) -> None:
    # max_episode_steps above the suite's own 1000 steps: the DMC time limit (LAST, discount 1) ends the episode.
    env = make_env("dmc/walker-walk", seed=0, frame_skip=frame_skip, max_episode_steps=3000)
    steps = 1000 // frame_skip
    rollout = env.rollout(2 * steps, break_when_any_done=False)
    truncated = rollout["next", "truncated"].squeeze(-1)
    assert truncated.nonzero().squeeze(-1).tolist() == [steps - 1, 2 * steps - 1]
    assert not rollout["next", "terminated"].any()
    assert torch.equal(rollout["next", "done"].squeeze(-1), truncated)
    assert rollout["next", "step_count"][steps - 1].item() == steps


def test_dmc_time_limit_is_bootstrapped_through() -> None:
    """The critic's TD target at DMC's time limit is r + gamma min Q(z', a'), not r as a terminal would give."""
    from alm_torchrl import make_alm_modules
    from alm_torchrl.objectives import ALMLoss
    from alm_torchrl.update import make_target_updater

    env = make_env("dmc/cartpole-swingup", seed=0, frame_skip=2)
    last = env.rollout(1000)[-1:]  # the truncated step
    assert last["next", "truncated"].item() and not last["next", "terminated"].item()
    torch.manual_seed(0)
    modules = make_alm_modules(env.observation_spec_unbatched, env.action_spec_unbatched, latent_dim=4,
                               hidden_dim=16, model_hidden_dim=16)
    loss = ALMLoss(**modules.loss_kwargs())
    loss.make_value_estimator(gamma=0.99)
    make_target_updater(loss, tau=0.005)
    batch = last.unsqueeze(1)  # one slice of one step

    def target(batch):
        torch.manual_seed(1)
        return loss.qvalue_loss(batch)[1]["target_q_mean"]

    terminal = batch.clone()
    terminal["next", "terminated"] = torch.ones_like(terminal["next", "terminated"])
    reward = batch["next", "reward"].squeeze()
    torch.testing.assert_close(target(terminal), reward)
    assert (target(batch) - reward).abs() > 1e-3


def test_frame_skip_repeats_the_action_and_sums_the_rewards() -> None:
    """frame_skip=2 gives every other state of frame_skip=1 under the repeated actions, and pairwise reward sums."""
    repeated = make_env("dmc/cheetah-run", seed=5, frame_skip=2)
    single = make_env("dmc/cheetah-run", seed=5)
    actions = torch.rand(20, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    td_repeated, td_single = repeated.reset(), single.reset()
    torch.testing.assert_close(td_repeated["observation"], td_single["observation"])
    for action in actions:
        td_repeated = repeated.step(td_repeated.set("action", action))
        rewards = []
        for _ in range(2):
            td_single = single.step(td_single.set("action", action))
            rewards.append(td_single["next", "reward"])
            td_single = td_single["next"]
        torch.testing.assert_close(td_repeated["next", "observation"], td_single["observation"])
        torch.testing.assert_close(td_repeated["next", "reward"], sum(rewards))
        td_repeated = td_repeated["next"]


def test_scale_actions_maps_the_agents_unit_box_onto_the_task_bounds() -> None:
    """Pendulum's torque bound is 2: scaled, the agent acts in [-1, 1] and its actions reach the env doubled, while
    the transitions keep the agent's actions (what the replay buffer stores and the model learns from)."""
    scaled = make_env("Pendulum-v1", seed=3, scale_actions=True)
    unscaled = make_env("Pendulum-v1", seed=3)
    assert scaled.action_spec.space.high.tolist() == [1.0] and scaled.action_spec.space.low.tolist() == [-1.0]
    assert unscaled.action_spec.space.high.tolist() == [2.0]
    td_scaled, td_unscaled = scaled.reset(), unscaled.reset()
    for action in (1.0, -0.5, 0.25):
        td_scaled = scaled.step(td_scaled.set("action", torch.tensor([action])))
        td_unscaled = unscaled.step(td_unscaled.set("action", torch.tensor([2 * action])))
        assert td_scaled["action"].item() == action
        torch.testing.assert_close(td_scaled["next", "observation"], td_unscaled["next", "observation"])
        torch.testing.assert_close(td_scaled["next", "reward"], td_unscaled["next", "reward"])
        td_scaled, td_unscaled = td_scaled["next"], td_unscaled["next"]
    # A batched env (the evaluation copies) is scaled copy by copy.
    batched = make_env("Pendulum-v1", seed=3, num_envs=2, scale_actions=True)
    assert batched.action_spec.space.high.tolist() == [[1.0], [1.0]]


class _UnboundedPendulum(PendulumEnv):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.action_space = gymnasium.spaces.Box(-np.inf, np.inf, (1,), np.float32)


def test_scale_actions_needs_finite_bounds() -> None:
    gymnasium.register("UnboundedActions-v0", entry_point=_UnboundedPendulum)
    try:
        with pytest.raises(ValueError, match=r"^scale_actions needs finite action bounds to scale to \[-1, 1\]; "
                                             r"UnboundedActions-v0: ActionScaling .*Unbounded action spec"):
            make_env("UnboundedActions-v0", scale_actions=True)
        make_env("UnboundedActions-v0")  # unscaled, the same task is fine
    finally:
        gymnasium.registry.pop("UnboundedActions-v0")


def test_batched_dmc_env_runs_separately_seeded_copies() -> None:
    batched = make_env("dmc/cartpole-swingup", seed=3, num_envs=2, frame_skip=4)
    assert batched.batch_size == (2,)
    episodes = rollout_episodes(batched, fixed_policy(batched), max_steps=1000)
    assert [len(episode) for episode in episodes] == [250, 250]
    assert not torch.equal(episodes[0]["observation"][0], episodes[1]["observation"][0])
    assert all(episode["next", "truncated"][-1].item() for episode in episodes)


def test_batched_gymnasium_env_repeats_each_copys_action_on_its_own() -> None:
    """With frame_skip, a copy's episode end does not cut the other copies' repeats (a SerialEnv, not a vector env)."""
    batched = make_env("Hopper-v5", seed=1, num_envs=3, frame_skip=2, max_episode_steps=400)
    policy = fixed_policy(batched)
    episodes = rollout_episodes(batched, policy, max_steps=200)
    # TorchRL seeds the copies in turn, each with the seed the previous one returns: so do the lone envs.
    alone, seed = [], 1
    for _ in range(3):
        env = make_env("Hopper-v5", frame_skip=2, max_episode_steps=400)
        seed = env.set_seed(seed)
        alone.append(rollout_episodes(env, policy, 200)[0])
    lengths = [len(episode) for episode in episodes]
    assert len(set(lengths)) > 1 and lengths == [len(episode) for episode in alone]
    for side_by_side, single in zip(episodes, alone):
        torch.testing.assert_close(side_by_side["observation"], single["observation"])
        torch.testing.assert_close(side_by_side["next", "reward"], single["next", "reward"])


def test_unknown_dmc_task_is_one_line_with_close_matches() -> None:
    with pytest.raises(ValueError) as info:
        make_env("dmc/cheetah-runn")
    message = str(info.value)
    assert "\n" not in message and "'dmc/cheetah-run'" in message and "dm_control.suite.ALL_TASKS" in message
    with pytest.raises(ValueError, match="'dmc/walker-walk'"):
        check_env_name("dmc/walker_walk")


def test_frame_skip_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match="^frame_skip must be a positive integer, got 0$"):
        make_env("Pendulum-v1", frame_skip=0)
