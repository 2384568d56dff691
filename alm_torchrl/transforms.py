"""Image augmentation for learning from pixels: DrQ's random shift as a TorchRL transform.

TorchRL has no random-shift transform (pytorch/rl issue #32 asks for one); :class:`RandomShift` is written to be
proposed there: a :class:`~torchrl.envs.transforms.Transform` that works on any tensordict, most usefully on
replay-buffer samples (``replay_buffer.append_transform(RandomShift(...))``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict.utils import NestedKey
from torchrl.envs.transforms import Transform

__all__ = ["RandomShift", "random_shift"]


def random_shift(images: torch.Tensor, pad: int = 4, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shifts each image of ``images`` (``[*B, C, H, W]``) by up to ``pad`` pixels along each axis, at random.

    What DrQ does (Kostrikov et al., 2020, arXiv:2004.13649): pad each image by ``pad`` pixels on every side,
    repeating its border pixels, then crop it back to ``H x W`` at a random offset. Each image (each index of the
    batch dims ``*B``) gets its own shifts, one per axis, drawn uniformly from the ``2 * pad + 1`` integers in
    ``[-pad, pad]``; its channels share them. DrQ-v2 (Yarats et al., 2021) writes the same integer shifts with
    ``grid_sample`` on float images; gathering pixels instead keeps ``uint8`` images ``uint8`` and exact.

    Args:
        images: ``[*B, C, H, W]`` images of any dtype.
        pad: the largest shift, in pixels (DrQ: 4 for 84x84 images).

    Keyword Args:
        generator: the random number generator the shifts are drawn with (default: torch's global one).

    Returns:
        The shifted images, with the shape, dtype and device of ``images``.
    """
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer (DrQ: 4), got {pad!r}.")
    if images.ndim < 3:
        raise ValueError(f"images must be [*B, C, H, W] or [C, H, W], got shape {tuple(images.shape)}.")
    *batch_shape, channels, height, width = images.shape
    num_images = torch.Size(batch_shape).numel()
    # Drawn on the generator's device, so that a seeded generator gives the same shifts whatever the images' device.
    draw_device = generator.device if generator is not None else images.device
    shifts = torch.randint(-pad, pad + 1, (num_images, 2), generator=generator, device=draw_device)
    shifts = shifts.to(images.device)
    # Replicate padding then a crop at offset (pad + dy, pad + dx) reads pixel (clamp(i + dy), clamp(j + dx)).
    rows = (torch.arange(height, device=images.device) + shifts[:, :1]).clamp_(0, height - 1)  # [N, H]
    cols = (torch.arange(width, device=images.device) + shifts[:, 1:]).clamp_(0, width - 1)  # [N, W]
    source = (rows.unsqueeze(-1) * width + cols.unsqueeze(-2)).view(num_images, 1, height * width)
    flat = images.reshape(num_images, channels, height * width)
    shifted = flat.gather(2, source.expand(num_images, channels, height * width))
    return shifted.view(images.shape)


class RandomShift(Transform):
    """Random-shift augmentation of images (DrQ, DrQ-v2): each image moves by up to ``pad`` pixels per axis.

    Each image is padded by ``pad`` pixels on every side, repeating its border pixels, and cropped back to its size
    at a random offset (:func:`random_shift`). Every image of the tensordict, and every entry, gets its own shifts:
    in a ``[B, K]`` batch of slices, the K steps of a slice and an observation and its next observation are shifted
    independently, as DrQ-v2 shifts a critic's observation and next observation and TD-MPC each step of its
    latent-consistency targets. The shapes, dtypes and devices of the entries do not change.

    Meant for sampled batches: ``replay_buffer.append_transform(RandomShift(in_keys=["pixels", ("next",
    "pixels")]))``. In an environment it would shift what the policy sees too, which DrQ does not do.

    Args:
        pad (int, optional): the largest shift, in pixels. Defaults to ``4`` (DrQ's, for 84x84 images).
        in_keys (sequence of NestedKey, optional): the ``[*B, C, H, W]`` image entries to shift. Defaults to
            ``["pixels", ("next", "pixels")]``.
        out_keys (sequence of NestedKey, optional): where the shifted images go. Defaults to ``in_keys``.

    Keyword Args:
        generator (torch.Generator, optional): draws the shifts, for reproducible augmentation. Defaults to torch's
            global generator.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> images = torch.randint(0, 256, (8, 3, 9, 84, 84), dtype=torch.uint8)
        >>> batch = TensorDict({"pixels": images, "next": {"pixels": images.clone()}}, batch_size=[8, 3])
        >>> shifted = RandomShift(pad=4, generator=torch.Generator().manual_seed(0))(batch)
        >>> shifted["pixels"].shape, shifted["pixels"].dtype
        (torch.Size([8, 3, 9, 84, 84]), torch.uint8)
    """

    def __init__(
        self,
        pad: int = 4,
        in_keys: Sequence[NestedKey] | None = None,
        out_keys: Sequence[NestedKey] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be a non-negative integer (DrQ: 4), got {pad!r}.")
        if in_keys is None:
            in_keys = ["pixels", ("next", "pixels")]
        if out_keys is None:
            out_keys = list(in_keys)
        super().__init__(in_keys=in_keys, out_keys=out_keys)
        self.pad = pad
        self.generator = generator

    def _apply_transform(self, images: torch.Tensor) -> torch.Tensor:
        return random_shift(images, self.pad, generator=self.generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad={self.pad}, in_keys={self.in_keys}, out_keys={self.out_keys})"
