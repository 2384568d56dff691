"""Tests for alm_torchrl.replay: [B, K] slices that never cross an episode boundary."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector

from alm_torchrl.envs import make_env
from alm_torchrl.replay import make_replay_buffer, sample_slices

BATCH_SIZE, SLICE_LEN = 32, 3


@pytest.fixture(scope="module")
def hopper_batches() -> list[TensorDict]:
    """Random-policy Hopper batches with a 20-step limit: episodes both terminate (falls) and truncate."""
    torch.manual_seed(0)
    env = make_env("Hopper-v5", seed=0, max_episode_steps=20)
    collector = Collector(env, policy=None, frames_per_batch=100, total_frames=800)
    batches = [batch.reshape(-1) for batch in collector]
    collector.shutdown()
    return batches


def test_slices_never_cross_episode_boundaries(hopper_batches: list[TensorDict]) -> None:
    data = torch.cat(hopper_batches)
    terminated = data["next", "terminated"]
    truncated = data["next", "truncated"] & ~terminated
    assert terminated.any() and truncated.any(), "test data needs both terminations and truncations"

    # 250 slots for 800 frames: the storage wraps around and cuts the oldest trajectories.
    buffer = make_replay_buffer(size=250, batch_size=BATCH_SIZE, slice_len=SLICE_LEN)
    for batch in hopper_batches:
        buffer.extend(batch)
        for _ in range(20):
            sample = sample_slices(buffer, BATCH_SIZE, SLICE_LEN)
            assert sample.shape == (BATCH_SIZE, SLICE_LEN)
            traj_ids = sample["collector", "traj_ids"]
            assert (traj_ids == traj_ids[:, :1]).all()
            assert torch.equal(sample["next", "observation"][:, :-1], sample["observation"][:, 1:])
            assert (sample["step_count"][:, 1:] == sample["step_count"][:, :-1] + 1).all()
            assert not sample["next", "terminated"][:, :-1].any()


def test_a_write_invalidates_the_cached_trajectory_boundaries() -> None:
    """The sampler caches trajectory boundaries between writes. Overwrite a full buffer with episodes cut elsewhere,
    leaving its cursor and length as they were: slices cut at the old boundaries would cross the new episodes."""
    buffer = make_replay_buffer(size=10, batch_size=64, slice_len=3)

    def extend(*lengths: int, first_id: int) -> None:
        ids = torch.cat([torch.full((length,), first_id + i) for i, length in enumerate(lengths)])
        buffer.extend(TensorDict({"observation": torch.arange(10.0).unsqueeze(-1), ("collector", "traj_ids"): ids},
                                 batch_size=[10]))

    extend(4, 6, first_id=0)
    assert set(sample_slices(buffer, 64, 3)["collector", "traj_ids"][:, 0].tolist()) == {0, 1}  # fills the cache
    extend(7, 3, first_id=2)
    for _ in range(5):
        traj_ids = sample_slices(buffer, 64, 3)["collector", "traj_ids"]
        assert (traj_ids == traj_ids[:, :1]).all() and set(traj_ids[:, 0].tolist()) == {2, 3}


def test_sample_shape(hopper_batches: list[TensorDict]) -> None:
    buffer = make_replay_buffer(size=1000, batch_size=4, slice_len=5, prefetch=2)
    buffer.extend(hopper_batches[0])
    for _ in range(3):
        sample = sample_slices(buffer, 4, 5)
        assert sample.shape == (4, 5)
        assert sample["observation"].shape == (4, 5, 11)
        assert sample["is_init"][:, 0].all()


def test_no_trajectory_long_enough(hopper_batches: list[TensorDict]) -> None:
    buffer = make_replay_buffer(size=1000, batch_size=4, slice_len=21)
    buffer.extend(hopper_batches[0])
    with pytest.raises(RuntimeError, match=r"slice_len=21.*longest has \d+ transitions"):
        sample_slices(buffer, 4, 21)


def test_empty_buffer() -> None:
    buffer = make_replay_buffer(size=10, batch_size=2, slice_len=3)
    with pytest.raises(RuntimeError, match="empty"):
        sample_slices(buffer, 2, 3)


def test_slice_len_mismatch() -> None:
    buffer = make_replay_buffer(size=10, batch_size=2, slice_len=3)
    with pytest.raises(ValueError, match="slice_len=4"):
        sample_slices(buffer, 2, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 10, "batch_size": 2, "slice_len": 0}, "slice_len must be >= 1"),
        ({"size": 10, "batch_size": 0, "slice_len": 3}, "batch_size must be >= 1"),
        ({"size": 2, "batch_size": 2, "slice_len": 3}, "size must be >= slice_len"),
    ],
)
def test_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_replay_buffer(**kwargs)
