"""Tests for alm_torchrl.replay: [B, K] slices that never cross an episode boundary, with starts uniform over
transitions (the original ALM's) or, with ``sampling="trajectory"``, over trajectories (TorchRL's SliceSampler)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from alm_torchrl.envs import make_env
from alm_torchrl.replay import TRAJ_KEY, TransitionSliceSampler, make_replay_buffer, sample_slices

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


@pytest.mark.parametrize("sampling", ["transition", "trajectory"])
def test_slices_never_cross_episode_boundaries(hopper_batches: list[TensorDict], sampling: str) -> None:
    data = torch.cat(hopper_batches)
    terminated = data["next", "terminated"]
    truncated = data["next", "truncated"] & ~terminated
    assert terminated.any() and truncated.any(), "test data needs both terminations and truncations"

    # 250 slots for 800 frames: the storage wraps around and cuts the oldest trajectories.
    buffer = make_replay_buffer(size=250, batch_size=BATCH_SIZE, slice_len=SLICE_LEN, sampling=sampling)
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


def test_several_batches_in_one_draw(hopper_batches: list[TensorDict]) -> None:
    """batches_per_draw draws them at once, for one draw's overhead; each slice still lies inside one episode."""
    buffer = make_replay_buffer(size=1000, batch_size=4, slice_len=3, batches_per_draw=10)
    for batch in hopper_batches:
        buffer.extend(batch)
    batches = sample_slices(buffer, 4, 3, num_batches=10)
    assert batches.shape == (10, 4, 3) and batches["observation"].shape == (10, 4, 3, 11)
    traj_ids = batches["collector", "traj_ids"]
    assert (traj_ids == traj_ids[..., :1]).all()
    assert torch.equal(batches["next", "observation"][..., :-1, :], batches["observation"][..., 1:, :])
    assert batches["is_init"][:, :, 0].all()
    # Independent draws: the ten batches are not copies of one another.
    assert len({tuple(ids.tolist()) for ids in traj_ids[..., 0]}) > 1
    # Sizes other than the buffer's own draw are refused (a prefetched sample would have the buffer's size).
    for args in ((4, 3), (4, 3, 5), (8, 3, 10)):
        with pytest.raises(ValueError, match="does not match the buffer's draw of 120 transitions"):
            sample_slices(buffer, *args)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"batches_per_draw must be an int >= 1, got {bad!r}"):
            make_replay_buffer(size=10, batch_size=2, slice_len=3, batches_per_draw=bad)


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
        ({"size": 10, "batch_size": 2, "slice_len": 3, "sampling": "uniform"},
         "sampling must be one of 'transition', 'trajectory', got 'uniform'"),
        ({"size": 10, "batch_size": 2, "slice_len": 3, "prefetch": -1}, "prefetch must be >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_replay_buffer(**kwargs)


# ------------------------------------------------------------------------------ the distribution of slice starts
def _episodes_buffer(size: int, lengths: list[int], sampling: str, slice_len: int = 3):
    """A buffer holding episodes of ``lengths`` written in order (the last one still in progress: nothing marks its
    end), whose observation is the frame's number in the stream, so a slice's start says where it began."""
    buffer = make_replay_buffer(size=size, batch_size=256, slice_len=slice_len, sampling=sampling)
    traj_ids = torch.cat([torch.full((length,), episode) for episode, length in enumerate(lengths)])
    frames = torch.arange(traj_ids.numel())
    buffer.extend(TensorDict({"observation": frames.unsqueeze(-1), TRAJ_KEY: traj_ids}, batch_size=[frames.numel()]))
    return buffer


def _slice_starts(buffer, batches: int, slice_len: int = 3) -> torch.Tensor:
    """The first frame of ``batches x 256`` sampled slices, checking that every slice is consecutive frames of one
    episode."""
    starts = []
    for _ in range(batches):
        sample = sample_slices(buffer, 256, slice_len)
        frames, traj_ids = sample["observation"].squeeze(-1), sample[TRAJ_KEY]
        assert (frames[:, 1:] == frames[:, :-1] + 1).all() and (traj_ids == traj_ids[:, :1]).all()
        starts.append(frames[:, 0])
    return torch.cat(starts)


def _chi_square(counts: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against equal expected counts, and its degrees of freedom."""
    expected = counts.sum() / counts.numel()
    return (((counts - expected) ** 2) / expected).sum().item(), counts.numel() - 1


def _is_uniform(counts: torch.Tensor) -> bool:
    # chi-square(df) has mean df and std sqrt(2 df); 8 std above the mean is a p-value far below 1e-9 (the seed is
    # fixed, so the test cannot flake; a non-uniform sampler lands hundreds of std above it, see the tests below).
    statistic, df = _chi_square(counts)
    return statistic < df + 8 * (2 * df) ** 0.5


def test_transition_sampling_draws_every_valid_start_equally_often() -> None:
    """Episodes of 100, 40, 3 (one slice), 2 (too short) and 25 steps (in progress): the 98 + 38 + 1 + 0 + 23 = 160
    valid starts are equally likely, so each episode's share is its number of starts and starts are uniform within
    each episode; the in-progress episode gets 23/160 of the slices, not the 1/4 a uniform draw of trajectories
    gives it."""
    torch.manual_seed(0)
    lengths = [100, 40, 3, 2, 25]
    valid_starts = [frame for first, length in zip(torch.tensor([0, *lengths]).cumsum(0).tolist(), lengths)
                    for frame in range(first, first + length - 2)]
    assert len(valid_starts) == 160
    starts = _slice_starts(_episodes_buffer(1000, lengths, "transition"), batches=200)  # 51,200 slices
    assert set(starts.tolist()) == set(valid_starts)  # never the 2-step episode, never a start too late
    counts = torch.bincount(starts)[valid_starts].double()
    assert _is_uniform(counts), _chi_square(counts)
    in_progress_share = (starts >= 145).double().mean().item()
    assert abs(in_progress_share - 23 / 160) < 0.01


def test_trajectory_sampling_is_torchrl_slice_sampler() -> None:
    """``sampling="trajectory"`` keeps SliceSampler's draw: each trajectory long enough for a slice gets the same
    share whatever its length, then a uniform start inside it (the behaviour the default replaces)."""
    torch.manual_seed(0)
    lengths = [100, 40, 3, 2, 25]
    starts = _slice_starts(_episodes_buffer(1000, lengths, "trajectory"), batches=200)
    episode = torch.bucketize(starts, torch.tensor([100, 140, 143, 145]), right=True)
    shares = torch.bincount(episode, minlength=5).double() / starts.numel()
    assert torch.allclose(shares, torch.tensor([0.25, 0.25, 0.25, 0.0, 0.25], dtype=torch.float64), atol=0.01)
    first_episode = torch.bincount(starts[episode == 0], minlength=98).double()
    assert _is_uniform(first_episode)
    per_start = torch.bincount(starts)[starts.unique()].double()
    assert not _is_uniform(per_start)  # the uniformity check above does tell the two samplers apart


def test_transition_sampling_after_the_storage_wraps_around() -> None:
    """Four 30-step episodes and 5 steps of a fifth written into 100 slots: the first episode keeps its last 5 steps
    (its head overwritten), the fourth spans the storage's end and start, the fifth is in progress. Their
    3 + 28 + 28 + 28 + 3 = 90 valid starts are equally likely and no slice runs across the cursor."""
    torch.manual_seed(0)
    buffer = _episodes_buffer(100, [30, 30, 30, 30, 5], "transition")
    starts = _slice_starts(buffer, batches=100)
    valid_starts = [*range(25, 28), *range(30, 58), *range(60, 88), *range(90, 118), *range(120, 123)]
    assert set(starts.tolist()) == set(valid_starts)
    counts = torch.bincount(starts)[valid_starts].double()
    assert _is_uniform(counts), _chi_square(counts)


@pytest.mark.parametrize("option", [{"span": True}, {"span": (False, 1)}, {"fragmented": True}])
def test_transition_sampler_refuses_what_changes_the_valid_starts(option: dict) -> None:
    with pytest.raises(NotImplementedError, match="neither span nor fragmented"):
        TransitionSliceSampler(slice_len=3, traj_key=TRAJ_KEY, **option)


def test_transition_sampler_without_strict_length_counts_a_short_trajectory_as_one_slice() -> None:
    """With ``strict_length=False`` a trajectory shorter than a slice is one (shorter) slice, as SliceSampler's
    ``_sampleable_count`` counts it: episodes of 10 and 2 steps have 8 + 1 starts, so the short one gets 1/9."""
    torch.manual_seed(0)
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(20),
        sampler=TransitionSliceSampler(slice_len=3, traj_key=TRAJ_KEY, strict_length=False, cache_values=True),
    )
    traj_ids = torch.tensor([0] * 10 + [1] * 2)
    buffer.extend(TensorDict({"observation": torch.arange(12).unsqueeze(-1), TRAJ_KEY: traj_ids}, batch_size=[12]))
    slice_traj_ids = []
    for _ in range(100):
        sample = buffer.sample(3 * 300)  # 300 slices, flat; the sampler marks each slice's last step as truncated
        slice_traj_ids.append(sample[TRAJ_KEY][sample["next", "truncated"].squeeze(-1)])
    slice_traj_ids = torch.cat(slice_traj_ids)
    assert slice_traj_ids.numel() == 30_000
    assert abs((slice_traj_ids == 1).double().mean().item() - 1 / 9) < 0.01
