"""Sequence replay buffer for ALM: uniform ``[B, K]`` slices of consecutive transitions within one episode.

Slices are cut by ``SliceSampler`` along ``("collector", "traj_ids")`` (written by every TorchRL collector), so a
slice never runs across a termination *or* a time-limit truncation, and stays correct after the storage wraps around.

Slice starts are drawn uniformly over every stored position from which a whole slice fits inside its episode
(:class:`TransitionSliceSampler`), as the original ALM's replay memory draws them. TorchRL's ``SliceSampler`` draws
a trajectory uniformly first, which gives every stored episode the same share of a batch whatever its length: the
few transitions of the episode being collected are then over-sampled (``make_replay_buffer(sampling="trajectory")``
keeps that behaviour).
Note that the sampler rewrites ``("next", "truncated")`` / ``("next", "done")`` in samples to mark slice ends; only
``("next", "terminated")`` is the stored flag, so bootstrap masks must use it.

With ``pixels_key``, stacked image frames are stored once per frame (:class:`~alm_torchrl.frames.FrameStackStorage`)
and the sampled slices get their stacks back from a buffer transform.
"""

from __future__ import annotations

import torch
from tensordict import NestedKey, TensorDictBase
from torchrl.data import LazyTensorStorage, SliceSampler, TensorDictReplayBuffer

from alm_torchrl.frames import FrameStackStorage

__all__ = [
    "SAMPLING_MODES",
    "TRAJ_KEY",
    "NonFiniteDataError",
    "TransitionSliceSampler",
    "check_finite",
    "make_replay_buffer",
    "sample_slices",
]

TRAJ_KEY = ("collector", "traj_ids")
SAMPLING_MODES = ("transition", "trajectory")
"""``make_replay_buffer(sampling=...)``: slice starts uniform over transitions (the original ALM's), or TorchRL's
``SliceSampler`` (a trajectory uniformly, then a start in it)."""


class TransitionSliceSampler(SliceSampler):
    """A :class:`~torchrl.data.SliceSampler` whose slice starts are uniform over all valid start positions.

    ``SliceSampler`` draws a trajectory uniformly, then a start inside it, so a trajectory's share of the slices does
    not depend on its length: a 20-step episode in progress next to ten finished 1000-step ones gets 1/11 of every
    batch. This sampler draws each trajectory with probability proportional to its number of valid starts (with
    ``strict_length=True``, ``length - slice_len + 1``, and trajectories shorter than a slice are never drawn; with
    ``strict_length=False``, ``max(length - slice_len + 1, 1)``: a short trajectory is one truncated slice), then the
    start uniformly inside it, as ``SliceSampler`` does. Together every valid start ``(trajectory, position)`` is
    equally likely: these are the windows ``SliceSampler._sampleable_count`` counts. Everything else (trajectory
    boundaries from ``traj_key``/``end_key``, storage wrap-around, ``cache_values``, ``strict_length``, the
    ``truncated``/``is_init`` marks written into the sample) is ``SliceSampler``'s own.

    Written as the smallest change to ``SliceSampler`` (the trajectory draw of ``_sample_slices``), so that it could
    go upstream as an option of ``SliceSampler`` itself. ``span`` and ``fragmented`` change which starts are valid and
    are not supported.
    """

    def __init__(self, **kwargs) -> None:
        span = kwargs.get("span", False)
        if kwargs.get("fragmented", False) or any(span if isinstance(span, tuple) else (span,)):
            raise NotImplementedError(f"{type(self).__name__} supports neither span nor fragmented")
        super().__init__(**kwargs)

    def _sample_slices(
        self,
        lengths: torch.Tensor,
        start_idx: torch.Tensor,
        stop_idx: torch.Tensor,
        seq_length: int,
        num_slices: int,
        storage_length: int,
        traj_idx: torch.Tensor | None = None,
        *,
        storage,
    ):
        if traj_idx is None:
            starts_per_traj = (lengths - seq_length + 1).clamp_min(0 if self.strict_length else 1)
            sampleable = starts_per_traj > 0
            # With no trajectory long enough, the parent draws and raises its own error (it names the lengths).
            if sampleable.any():
                if not sampleable.all():
                    # Drop the trajectories too short for a slice here: given a traj_idx, the parent would
                    # de-duplicate it while filtering them, returning fewer slices than asked.
                    lengths, start_idx, stop_idx = lengths[sampleable], start_idx[sampleable], stop_idx[sampleable]
                    starts_per_traj = starts_per_traj[sampleable]
                traj_idx = torch.multinomial(
                    starts_per_traj.to(torch.float64), num_slices, replacement=True, generator=self._rng
                )
        return super()._sample_slices(
            lengths, start_idx, stop_idx, seq_length, num_slices, storage_length, traj_idx, storage=storage
        )


def make_replay_buffer(
    *,
    size: int,
    batch_size: int,
    slice_len: int,
    device: torch.device | str = "cpu",
    prefetch: int | None = None,
    pixels_key: NestedKey | None = None,
    num_frames: int = 3,
    sampling: str = "transition",
    batches_per_draw: int = 1,
) -> TensorDictReplayBuffer:
    """A buffer of ``size`` transitions whose ``sample()`` returns ``batch_size`` slices of ``slice_len`` steps.

    ``sample()`` yields a flat batch of ``batch_size * slice_len`` transitions, slice after slice; use
    ``sample_slices`` to get it as ``[batch_size, slice_len]``. Trajectories shorter than ``slice_len`` are never
    sampled (``strict_length=True``), so the batch size is always exact.

    ``batches_per_draw`` makes each ``sample()`` draw that many batches at once (``sample_slices(..., num_batches=)``
    gives them as ``[batches_per_draw, batch_size, slice_len]``): the slices are independent either way, and one draw
    costs about as much as one batch at small sizes (about 1 ms of TorchRL's sampling and indexing).

    ``sampling="transition"`` (the original ALM's) draws slice starts uniformly over every stored position from
    which a whole slice fits inside its episode (:class:`TransitionSliceSampler`); ``"trajectory"`` is TorchRL's
    ``SliceSampler``: a stored trajectory uniformly, then a start inside it.

    ``pixels_key`` names an entry of ``num_frames`` stacked image frames (``CatFrames(N=num_frames, dim=-3)``) to
    store once per frame instead of twice per stack (:class:`~alm_torchrl.frames.FrameStackStorage`); the buffer's
    first transform rebuilds the stacks of what it samples.
    """
    if slice_len < 1:
        raise ValueError(f"slice_len must be >= 1 (the slice length K; paper: 3), got {slice_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (slices per batch; paper: 512), got {batch_size}")
    if size < slice_len:
        raise ValueError(f"size must be >= slice_len ({slice_len}), got {size}")
    if prefetch is not None and prefetch < 0:
        raise ValueError(f"prefetch must be >= 0 (batches sampled ahead by a thread; 0: none), got {prefetch}")
    if isinstance(batches_per_draw, bool) or not isinstance(batches_per_draw, int) or batches_per_draw < 1:
        raise ValueError(f"batches_per_draw must be an int >= 1, got {batches_per_draw!r}")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(map(repr, SAMPLING_MODES))}, got {sampling!r}")
    sampler_class = TransitionSliceSampler if sampling == "transition" else SliceSampler
    if pixels_key is None:
        storage, transform = LazyTensorStorage(size, device=device), None
    else:
        storage = FrameStackStorage(
            size, pixels_key=pixels_key, num_frames=num_frames, traj_key=TRAJ_KEY, device=device
        )
        transform = storage.rebuild_transform()
    return TensorDictReplayBuffer(
        storage=storage,
        transform=transform,
        # cache_values: the trajectory boundaries are found once per write instead of once per sample (TorchRL keys
        # the cache on the storage's write count and cursor). With the recipe's 10 samples per write of 10 frames, a
        # batch of 512 slices took 1.1 instead of 1.3 ms from 100k transitions, 1.4 instead of 2.7 ms from 1e6 (2-core
        # AMD VM); at a GPU's 500 updates/s, sampling has 2 ms per update.
        sampler=sampler_class(slice_len=slice_len, traj_key=TRAJ_KEY, strict_length=True, cache_values=True),
        batch_size=batches_per_draw * batch_size * slice_len,
        prefetch=prefetch,
    )


def sample_slices(
    buffer: TensorDictReplayBuffer, batch_size: int, slice_len: int, num_batches: int | None = None
) -> TensorDictBase:
    """Sample ``batch_size`` slices of ``slice_len`` consecutive transitions, shaped ``[batch_size, slice_len]``.

    With ``num_batches``, the ``[num_batches, batch_size, slice_len]`` batches of one draw of a buffer built with
    ``batches_per_draw=num_batches``. The sizes must be the buffer's own (its prefetched samples have that size).

    Raises a ``RuntimeError`` naming ``slice_len`` and the longest stored trajectory when no stored trajectory is
    long enough yet (e.g. right after a reset-heavy warm-up).
    """
    sampler_slice_len = getattr(buffer.sampler, "slice_len", None)
    if sampler_slice_len != slice_len:
        raise ValueError(f"slice_len={slice_len} does not match the buffer's sampler (slice_len={sampler_slice_len})")
    if buffer.batch_size != (num_batches or 1) * batch_size * slice_len:
        raise ValueError(
            f"batch_size={batch_size} x slice_len={slice_len} x num_batches={num_batches} does not match the buffer's "
            f"draw of {buffer.batch_size} transitions (make_replay_buffer's batch_size x slice_len x batches_per_draw)"
        )
    if len(buffer) == 0:
        raise RuntimeError("cannot sample slices: the replay buffer is empty")
    try:
        flat = buffer.sample()
    except RuntimeError as err:
        if "sufficient length" not in str(err):
            raise
        raise RuntimeError(
            f"cannot sample slices of slice_len={slice_len}: no stored trajectory is that long "
            f"({_stored_lengths_summary(buffer)}); collect more steps or lower slice_len"
        ) from err
    if num_batches is None:
        return flat.reshape(batch_size, slice_len)
    return flat.reshape(num_batches, batch_size, slice_len)


class NonFiniteDataError(ValueError):
    """Collected data holds a NaN or an infinite value; the message names the key, the frame and the value."""

    def __init__(self, key: NestedKey, frame: int, value: float, episode_step: int | None = None) -> None:
        where = f"frame {frame}" + (f" (step {episode_step} of its episode)" if episode_step is not None else "")
        super().__init__(f"non-finite {key!r} ({value}) at {where}")
        self.key, self.frame, self.value, self.episode_step = key, frame, value, episode_step


def check_finite(batch: TensorDictBase, first_frame: int = 1) -> None:
    """Raise :class:`NonFiniteDataError` if a floating-point entry of a collected ``batch`` is NaN or infinite.

    ``batch`` is a flat ``[T]`` batch of transitions, the first of which is frame ``first_frame`` of the run (counted
    from 1); the error names the first bad frame and its key (and the episode step, from ``("next", "step_count")``
    when the batch has it). One vectorised ``isfinite`` per floating-point entry and one host sync per batch: run it
    on every collected batch before storing it, and a NaN never reaches the replay buffer.
    """
    entries = [(key, value) for key, value in batch.items(True, True) if value.is_floating_point()]
    if not entries:
        return
    finite = torch.stack([torch.isfinite(value).reshape(value.shape[0], -1).all(-1) for _, value in entries])
    if bool(finite.all()):
        return
    index = int((~finite).any(0).nonzero()[0])  # the first bad frame, then its first bad key
    key, value = entries[int((~finite[:, index]).nonzero()[0])]
    bad = value[index].reshape(-1)
    step_count = batch.get(("next", "step_count"), None)
    episode_step = int(step_count[index].reshape(-1)[0]) if step_count is not None else None
    raise NonFiniteDataError(key, first_frame + index, bad[~torch.isfinite(bad)][0].item(), episode_step)


def _stored_lengths_summary(buffer: TensorDictReplayBuffer) -> str:
    """Describe stored trajectory lengths (contiguous runs of one traj id), for error messages only."""
    traj_ids = buffer.storage[:].get(TRAJ_KEY)
    _, lengths = torch.unique_consecutive(traj_ids, return_counts=True)
    return f"longest has {lengths.max().item()} transitions, over {lengths.numel()} stored trajectories"
