"""DrQ's random shift (RandomShift / random_shift): shapes, determinism under a seed, and shifts of at most pad."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from alm_torchrl.replay import make_replay_buffer, sample_slices
from alm_torchrl.transforms import RandomShift, random_shift

from pixel_env import make_pixel_env


def coordinate_images(num_images: int, height: int = 20, width: int = 24) -> torch.Tensor:
    """``[N, 2, H, W]`` images whose channels hold each pixel's row and column."""
    rows = torch.arange(height).view(height, 1).expand(height, width)
    cols = torch.arange(width).view(1, width).expand(height, width)
    return torch.stack([rows, cols]).expand(num_images, 2, height, width).clone()


def recovered_shifts(shifted: torch.Tensor, pad: int) -> torch.Tensor:
    """The (row, column) shift of each coordinate image, read at a pixel that no shift of ``pad`` clamps."""
    return torch.stack([shifted[:, 0, pad, pad] - pad, shifted[:, 1, pad, pad] - pad], dim=1)


@pytest.mark.parametrize("pad", [1, 4])
def test_never_shifts_by_more_than_pad_and_pads_by_repeating_the_border(pad):
    images = coordinate_images(3000)
    shifted = random_shift(images, pad, generator=torch.Generator().manual_seed(0))
    shifts = recovered_shifts(shifted, pad)
    assert shifts.abs().max() <= pad
    # Every shift in [-pad, pad] occurs, on both axes, and rows and columns are drawn independently.
    for axis in range(2):
        assert set(shifts[:, axis].tolist()) == set(range(-pad, pad + 1))
    assert len(set(map(tuple, shifts.tolist()))) == (2 * pad + 1) ** 2
    # Each output is exactly its input moved by that shift, with the border pixels repeated into the padding.
    height, width = images.shape[-2:]
    rows = (torch.arange(height) + shifts[:, :1]).clamp(0, height - 1)
    cols = (torch.arange(width) + shifts[:, 1:]).clamp(0, width - 1)
    assert torch.equal(shifted[:, 0], rows.unsqueeze(-1).expand(-1, height, width))
    assert torch.equal(shifted[:, 1], cols.unsqueeze(-2).expand(-1, height, width))


def test_shapes_dtypes_and_batch_dims_are_kept():
    generator = torch.Generator().manual_seed(0)
    for images in (torch.randint(0, 256, (4, 3, 9, 21, 21), dtype=torch.uint8), torch.rand(2, 5, 3, 16, 18),
                   torch.rand(3, 10, 10)):
        shifted = random_shift(images, 4, generator=generator)
        assert shifted.shape == images.shape and shifted.dtype == images.dtype
    # The channels of an image (its stacked frames) move together.
    frames = torch.randint(0, 256, (50, 1, 16, 16), dtype=torch.uint8).expand(50, 9, 16, 16)
    shifted = random_shift(frames, 4, generator=generator)
    assert (shifted == shifted[:, :1]).all()
    assert torch.equal(random_shift(frames, 0), frames)


def test_same_seed_same_shifts_and_entries_shifted_independently():
    images = coordinate_images(64).view(8, 8, 2, 20, 24)
    batch = TensorDict({"pixels": images, "next": {"pixels": images.clone()}}, batch_size=[8, 8])

    def shift(seed):
        return RandomShift(pad=4, generator=torch.Generator().manual_seed(seed))(batch.clone())

    first, again, other = shift(0), shift(0), shift(1)
    assert torch.equal(first["pixels"], again["pixels"])
    assert torch.equal(first["next", "pixels"], again["next", "pixels"])
    assert not torch.equal(first["pixels"], other["pixels"])
    # One shift per image: the steps of a slice, and an observation and its next observation, differ.
    shifts = recovered_shifts(first["pixels"].flatten(0, 1), 4).view(8, 8, 2)
    next_shifts = recovered_shifts(first["next", "pixels"].flatten(0, 1), 4).view(8, 8, 2)
    assert not (shifts == shifts[:, :1]).all()
    assert not torch.equal(shifts, next_shifts)


def test_bad_pad_is_refused():
    for pad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="pad must be a non-negative integer"):
            RandomShift(pad=pad)
    with pytest.raises(ValueError, match=r"images must be \[\*B, C, H, W\]"):
        random_shift(torch.zeros(4, 4))


def test_random_shift_on_replay_buffer_samples():
    from torchrl.collectors import Collector

    from alm_torchrl.replay import TRAJ_KEY

    buffer = make_replay_buffer(size=200, batch_size=4, slice_len=3, pixels_key="pixels")
    buffer.append_transform(RandomShift(pad=4, generator=torch.Generator().manual_seed(0)))
    collector = Collector(make_pixel_env(frame_shape=(3, 16, 16)), None, frames_per_batch=50, total_frames=100)
    for data in collector:
        buffer.extend(data.select("pixels", ("next", "pixels"), "action", ("next", "done"), TRAJ_KEY))
    collector.shutdown()
    batch = sample_slices(buffer, batch_size=4, slice_len=3)
    assert batch["pixels"].shape == (4, 3, 9, 16, 16) and batch["pixels"].dtype == torch.uint8
    stored = buffer.storage.rebuild(buffer.storage[batch["index"].flatten()])["pixels"].view(4, 3, 9, 16, 16)
    assert not torch.equal(batch["pixels"], stored)
    # ... each sampled image is its stored one moved by some shift of at most 4 pixels per axis.
    sampled, stored = batch["pixels"].flatten(0, 1), stored.flatten(0, 1)
    rows, cols = torch.arange(16), torch.arange(16)
    matched = torch.zeros(len(sampled), dtype=torch.bool)
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            moved = stored[:, :, (rows + dy).clamp(0, 15)][:, :, :, (cols + dx).clamp(0, 15)]
            matched |= (moved == sampled).flatten(1).all(1)
    assert matched.all()
