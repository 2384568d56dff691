"""The frame-efficient replay storage: each frame stored once, stacks rebuilt exactly, never across episodes."""
from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.envs import SerialEnv

from alm_torchrl.checkpoint import TrainingCheckpoints
from alm_torchrl.frames import FRAME_IDS_KEY, FrameStackStorage
from alm_torchrl.replay import TRAJ_KEY, make_replay_buffer, sample_slices

from pixel_env import episode_and_step, make_pixel_env

KEYS = ["pixels", "action", ("next", "pixels"), ("next", "reward"), ("next", "done"), ("next", "terminated"),
        ("next", "step_count"), "step_count", TRAJ_KEY]


def collect(total_frames: int, *, num_envs: int = 1, seed: int = 0, **env_kwargs) -> list[TensorDict]:
    """Batches of transitions from the toy pixel env, flattened in time order per env (what a buffer gets)."""
    if num_envs == 1:
        env = make_pixel_env(seed=seed, **env_kwargs)
    else:
        env = SerialEnv(num_envs, [lambda i=i: make_pixel_env(seed=seed + i, **env_kwargs) for i in range(num_envs)])
    collector = Collector(env, None, frames_per_batch=10 * num_envs, total_frames=total_frames)
    batches = [data.select(*KEYS).reshape(-1) for data in collector]
    collector.shutdown()
    return batches


def stored_stacks(storage: FrameStackStorage) -> TensorDict:
    return storage.rebuild(storage[:])


def test_stacks_are_rebuilt_exactly_each_frame_stored_once():
    batches = collect(400, max_steps=15)
    storage = FrameStackStorage(1000)
    for batch in batches:
        storage.set(torch.arange(len(storage), len(storage) + len(batch)), batch.clone())
    data = torch.cat(batches)
    rebuilt = stored_stacks(storage)
    assert torch.equal(rebuilt["pixels"], data["pixels"])
    assert torch.equal(rebuilt["next", "pixels"], data["next", "pixels"])
    assert FRAME_IDS_KEY not in rebuilt.keys()
    # One frame per transition plus the one first frame of each episode ("same" padding repeats it).
    episode_starts = int((data["step_count"] == 0).sum())
    assert 0 < episode_starts < len(data)
    assert storage.frames_written == len(data) + episode_starts


def test_episode_start_repeats_the_first_frame_and_stacks_never_mix_episodes():
    data = torch.cat(collect(300, max_steps=12, terminate_prob=0.2))
    storage = FrameStackStorage(300, frame_capacity=450)  # room for the many episode starts
    storage.set(torch.arange(len(data)), data.clone())
    rebuilt = stored_stacks(storage)
    for key in ("pixels", ("next", "pixels")):
        episodes, steps = episode_and_step(rebuilt[key])
        assert (episodes == episodes[:, :1]).all()  # one episode per stack
    frames = rebuilt["pixels"].unflatten(-3, (3, -1))
    starts = (data["step_count"] == 0).squeeze(-1)
    assert (frames[starts] == frames[starts][:, :1]).all()  # CatFrames' padding="same": the first frame, 3 times
    _, steps = episode_and_step(rebuilt["pixels"][~starts])
    assert (steps[:, -1] > 0).all()


def test_slices_never_cross_an_episode_end():
    buffer = make_replay_buffer(size=2000, batch_size=64, slice_len=3, pixels_key="pixels")
    for batch in collect(600, max_steps=10, terminate_prob=0.15):
        buffer.extend(batch)
    torch.manual_seed(0)
    for _ in range(20):
        batch = sample_slices(buffer, batch_size=64, slice_len=3)
        assert batch["pixels"].shape == (64, 3, 9, 12, 12) and batch["pixels"].dtype == torch.uint8
        episodes, steps = episode_and_step(batch["pixels"])
        next_episodes, next_steps = episode_and_step(batch["next", "pixels"])
        assert (episodes == episodes[:, :1, :1]).all() and (next_episodes == episodes[:, :1, :1]).all()
        assert (batch[TRAJ_KEY] == batch[TRAJ_KEY][:, :1]).all()
        # consecutive steps, and the next observation is the following step's observation
        assert (steps[:, 1:, -1] == steps[:, :-1, -1] + 1).all()
        assert torch.equal(batch["next", "pixels"][:, :-1], batch["pixels"][:, 1:])


def test_ring_wraps_and_data_of_several_envs_interleaved():
    # Two envs, flattened env after env in each batch: an episode's transitions arrive in pieces.
    batches = collect(600, num_envs=2, max_steps=25, terminate_prob=0.05)
    storage = FrameStackStorage(80, frame_capacity=120)  # wraps several times
    written = 0
    for batch in batches:
        storage.set(torch.arange(written, written + len(batch)) % 80, batch.clone(), set_cursor=True)
        written += len(batch)
    last = torch.cat(batches)[-80:]
    order = torch.arange(written - 80, written) % 80
    rebuilt = storage.rebuild(storage[order])
    assert torch.equal(rebuilt["pixels"], last["pixels"])
    assert torch.equal(rebuilt["next", "pixels"], last["next", "pixels"])
    # each transition's stack was stitched from frames of an earlier batch of its episode, not re-stored
    assert storage.frames_written < written + int((torch.cat(batches)["step_count"] == 0).sum()) + 2 * 3


def test_ring_grows_rather_than_lose_frames_of_short_episodes():
    data = torch.cat(collect(300, max_steps=3, terminate_prob=0.5))  # episodes of 1 to 3 transitions
    storage = FrameStackStorage(60, frame_capacity=60)
    with pytest.warns(UserWarning, match="frame_capacity="):
        for start in range(0, len(data), 10):
            storage.set(torch.arange(start, start + 10) % 60, data[start:start + 10].clone())
    assert storage.frame_capacity > 60
    rebuilt = storage.rebuild(storage[torch.arange(len(data) - 60, len(data)) % 60])
    assert torch.equal(rebuilt["pixels"], data[-60:]["pixels"])
    assert torch.equal(rebuilt["next", "pixels"], data[-60:]["next", "pixels"])


def test_a_batch_rebuilt_after_later_writes_is_exact_or_refused():
    # A buffer transforms (rebuilds) a sample after releasing its lock: with a prefetching thread, writes may come in
    # between. The ring keeps `margin` frames past the transitions written over; past that, rebuilding raises.
    data = torch.cat(collect(1300, max_steps=2000, terminate_prob=0.0))  # one long episode
    storage = FrameStackStorage(640, frame_capacity=660)
    assert storage.margin == 10
    for start in range(0, 1000, 10):
        storage.set(torch.arange(start, start + 10) % 640, data[start:start + 10].clone())
    oldest = storage[torch.arange(360, 365)]  # transitions 360-364 of the episode, next to be written over
    storage.set(torch.arange(1000, 1010) % 640, data[1000:1010].clone())
    assert torch.equal(storage.rebuild(oldest)["pixels"], data[360:365]["pixels"])
    for start in range(1010, 1300, 10):
        storage.set(torch.arange(start, start + 10) % 640, data[start:start + 10].clone())
    with pytest.raises(RuntimeError, match="was overwritten"):
        storage.rebuild(oldest)


def test_checkpoint_round_trip_and_continuing_after_resume(tmp_path):
    batches = collect(300, max_steps=40, terminate_prob=0.0)  # the last episode is unfinished at the save
    buffer = make_replay_buffer(size=150, batch_size=8, slice_len=3, pixels_key="pixels")
    for batch in batches[:-1]:
        buffer.extend(batch.clone())
    net = torch.nn.Linear(1, 1)
    checkpoints = TrainingCheckpoints(tmp_path, loss=net, optimizer=torch.optim.Adam(net.parameters()),
                                      replay_buffer=buffer)
    checkpoints.save(step=1, metadata={})

    restored = make_replay_buffer(size=150, batch_size=8, slice_len=3, pixels_key="pixels")
    checkpoints = TrainingCheckpoints(tmp_path, loss=net, optimizer=torch.optim.Adam(net.parameters()),
                                      replay_buffer=restored)
    checkpoints.load(tmp_path)  # the replay buffer is read with torch.load(weights_only=True)
    before, after = buffer.storage, restored.storage
    assert len(after) == len(before) and after.frames_written == before.frames_written
    assert torch.equal(after.rebuild(after[:])["pixels"], before.rebuild(before[:])["pixels"])
    # The unfinished episode continues from its stored frames: one new frame per transition.
    for storage_buffer in (buffer, restored):
        storage_buffer.extend(batches[-1].clone())
    assert after.frames_written == before.frames_written
    assert torch.equal(after.rebuild(after[:])["next", "pixels"], before.rebuild(before[:])["next", "pixels"])
    expected = torch.cat(batches)[-150:]
    assert torch.equal(after.rebuild(after[torch.arange(300 - 150, 300) % 150])["pixels"], expected["pixels"])


def test_a_new_collector_reusing_an_unfinished_trajectory_id_starts_a_new_episode():
    # After a resume the new collector numbers its trajectories from 0 again: the same id as an episode the buffer
    # holds unfinished. Frames are only shared when they are equal, so the new episode gets its own.
    first = torch.cat(collect(30, max_steps=40, terminate_prob=0.0, seed=0))
    second = torch.cat(collect(30, max_steps=40, terminate_prob=0.0, seed=1))
    assert (first[TRAJ_KEY] == 0).all() and (second[TRAJ_KEY] == 0).all()
    storage = FrameStackStorage(100)
    storage.set(torch.arange(30), first.clone())
    storage.set(torch.arange(30, 60), second.clone())
    rebuilt = storage.rebuild(storage[:])
    assert torch.equal(rebuilt["pixels"], torch.cat([first, second])["pixels"])
    assert storage.frames_written == 60 + 2


def test_memory_is_one_frame_per_transition():
    data = torch.cat(collect(200, max_steps=200, terminate_prob=0.0))
    storage = FrameStackStorage(200)
    storage.set(torch.arange(len(data)), data.clone())
    assert storage.frames_written == len(data) + 1  # a single episode
    assert storage.frame_capacity == 200 + 200 // 8
    frames = storage.state_dict()["frame_store"]["frames"]  # the ring: one uint8 frame per slot
    assert frames.shape == (200 + 200 // 8, 3, 12, 12) and frames.dtype == torch.uint8
    assert storage[:1].bytes() < 200  # the rest of a transition: action, reward, flags, ids, frame numbers


def test_bad_input_is_refused_in_one_line():
    data = torch.cat(collect(20))
    storage = FrameStackStorage(50)
    with pytest.raises(KeyError, match="trajectory ids"):
        storage.set(torch.arange(5), data[:5].exclude(TRAJ_KEY))
    shuffled = data[:5].clone()
    shuffled["next", "pixels"] = data[5:10]["next", "pixels"]
    with pytest.raises(ValueError, match="shifted by one frame"):
        storage.set(torch.arange(5), shuffled)
    with pytest.raises(ValueError, match="not a multiple of num_frames=4"):
        FrameStackStorage(50, num_frames=4).set(torch.arange(5), data[:5].clone())
    with pytest.raises(ValueError, match="frame_capacity must be"):
        FrameStackStorage(50, frame_capacity=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FrameStackStorage(50).set(torch.arange(20), data.clone())
