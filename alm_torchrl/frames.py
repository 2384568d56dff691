"""A replay storage for stacked image frames that keeps each frame once.

An agent that sees the last ``F`` frames (:class:`~torchrl.envs.CatFrames`) collects transitions whose observation
and next observation are both stacks of ``F`` frames, of which only one frame is new: stored as they come, a
transition of 3 stacked 84x84 RGB frames costs 127 KB, 12.7 GB for 100,000 transitions.
:class:`FrameStackStorage` stores each frame once, in a ring of frames, and each transition the numbers of the
``F + 1`` frames its two stacks are made of; :class:`RebuildFrameStacks`, a replay-buffer transform, turns the numbers
of a sampled batch back into stacks. A transition then costs one frame (21 KB) and a few bytes.

The storage's ``get`` returns transitions with their frame numbers (``frame_ids``) in place of the stacks: what a
sampler reads (trajectory ids, done flags, ``storage[:]`` for the slice boundaries) stays small and cheap, so any
TorchRL sampler works unchanged, and only the sampled batch is rebuilt.

Why not TorchRL's own answer (``CatFrames.make_rb_transform_and_sampler``): it stores one frame at the root and one
under ``"next"`` (two per transition), and rebuilds stacks from slices of its own ``SliceSampler``, one slice per
sampled transition, which cannot be combined with the K-step slices ALM samples, nor with another sampler.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torchrl.data import LazyTensorStorage
from torchrl.envs.transforms import Transform

__all__ = ["FRAME_IDS_KEY", "FrameStackStorage", "RebuildFrameStacks"]

FRAME_IDS_KEY = "frame_ids"
"""Where :class:`FrameStackStorage` keeps each transition's frame numbers: ``[F + 1]`` int64, the observation's
frames first (oldest to newest), then the next observation's newest frame."""


class FrameStackStorage(LazyTensorStorage):
    """A :class:`~torchrl.data.LazyTensorStorage` of transitions whose stacked frames are kept once each.

    Transitions come as the environment gives them: ``pixels_key`` and ``("next", pixels_key)`` hold ``num_frames``
    frames concatenated along ``dim`` (:class:`~torchrl.envs.CatFrames`'s layout), the next observation being the
    observation shifted by one frame plus a new one. Each write stores the new frame of every transition in a ring
    of frames, and the frames of an observation that no earlier transition of its trajectory (``traj_key``) has
    stored: at an episode's start, the frames of its first observation, equal ones once (with CatFrames'
    ``padding="same"``, one frame repeated ``num_frames`` times). A transition is taken to continue its trajectory's
    previous one only if its observation's frames *are* that transition's next frames (compared pixel by pixel), so
    a rebuilt stack is always exactly what the environment gave, and never mixes two episodes.

    The ring holds ``frame_capacity`` frames: one per stored transition, plus the extra first frames of the episodes
    in the buffer. If a write would overwrite a frame that a stored transition still needs (many short episodes),
    the ring grows (with a warning giving the size to pass as ``frame_capacity``) rather than lose it. It also keeps
    the frames of the last transitions written over for a while (``margin`` frames): a replay buffer transforms a
    sample after releasing its lock, so a batch that a prefetching thread sampled may be rebuilt after a write has
    replaced some of its transitions. A frame overwritten anyway is never returned: rebuilding then raises.

    Sampled transitions carry :data:`FRAME_IDS_KEY` instead of the stacks; a buffer on this storage needs
    :meth:`rebuild_transform` (``TensorDictReplayBuffer(storage=storage, transform=storage.rebuild_transform())``)
    to give them back.

    Args:
        max_size (int): capacity in transitions.

    Keyword Args:
        pixels_key (NestedKey, optional): the stacked frames, read at the root and under ``"next"``. Defaults to
            ``"pixels"``.
        num_frames (int, optional): frames per stack (CatFrames's ``N``). Defaults to ``3``.
        dim (int, optional): the dim of ``pixels_key`` along which the frames are concatenated (CatFrames's
            ``dim``, negative). Defaults to ``-3``, the channels of ``[F * C, H, W]`` images.
        frame_capacity (int, optional): frames the ring holds. Defaults to ``max_size + max_size // 8``: room for
            one episode start per 8 transitions (DMC's episodes have 500 with action repeat 2) and the margin.
        traj_key (NestedKey, optional): trajectory ids, as TorchRL's collectors write them. Defaults to
            ``("collector", "traj_ids")``.
        done_key (NestedKey, optional): the done flag, read under ``"next"``: a trajectory that is done is not
            continued. Defaults to ``"done"``.
        device (torch.device, optional): where transitions and frames are stored. Defaults to ``"cpu"``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl.data import TensorDictReplayBuffer
        >>> storage = FrameStackStorage(100, num_frames=3)
        >>> buffer = TensorDictReplayBuffer(storage=storage, transform=storage.rebuild_transform(), batch_size=4)
        >>> frames = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 8, 8)  # an episode's frames
        >>> stacks = torch.cat([frames[:1], frames[:1], frames], 0).unfold(0, 3, 1).movedim(-1, 1)  # "same" padding
        >>> stacks = stacks.flatten(1, 2)  # [7, 9, 8, 8]: frames along the channels
        >>> episode = TensorDict({"pixels": stacks[:-1], "next": {"pixels": stacks[1:],
        ...     "done": torch.zeros(6, 1, dtype=torch.bool)}, "collector": {"traj_ids": torch.zeros(6)}}, [6])
        >>> _ = buffer.extend(episode)
        >>> len(buffer), storage.frames_written  # 6 transitions, 7 distinct frames
        (6, 7)
        >>> sample = buffer.sample()
        >>> torch.equal(sample["pixels"], stacks[sample["index"]])
        True
    """

    def __init__(
        self,
        max_size: int,
        *,
        pixels_key: NestedKey = "pixels",
        num_frames: int = 3,
        dim: int = -3,
        frame_capacity: int | None = None,
        traj_key: NestedKey = ("collector", "traj_ids"),
        done_key: NestedKey = "done",
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer (DrQ-v2: 3), got {num_frames!r}.")
        if not isinstance(dim, int) or dim >= 0:
            raise ValueError(f"dim must be a negative integer (CatFrames's dim; -3 for [F * C, H, W]), got {dim!r}.")
        if frame_capacity is None:
            frame_capacity = max_size + max_size // 8
        if isinstance(frame_capacity, bool) or not isinstance(frame_capacity, int) or frame_capacity < max_size:
            raise ValueError(f"frame_capacity must be an integer >= max_size ({max_size}), got {frame_capacity!r}.")
        super().__init__(max_size, device=device)
        self.pixels_key = pixels_key
        self.next_pixels_key = ("next", *(pixels_key if isinstance(pixels_key, tuple) else (pixels_key,)))
        self.num_frames = num_frames
        self.dim = dim
        self.traj_key = traj_key
        self.next_done_key = ("next", *(done_key if isinstance(done_key, tuple) else (done_key,)))
        self.margin = min(1024, max_size // 64)
        """Frames kept after the last transition needing them is overwritten (see the class docstring)."""
        self.frames_written = 0
        """Frames written since the storage was created: the number the next new frame gets."""
        # (frames [capacity, *frame_shape], capacity): frame n lives at n % capacity. One attribute, so that a
        # reading thread never pairs a tensor with another ring's capacity.
        self._ring: tuple[torch.Tensor | None, int] = (None, frame_capacity)
        # Each unfinished trajectory's last next-observation frame numbers, to continue it on the next write.
        self._open_trajectories: dict[int, torch.Tensor] = {}

    @property
    def frame_capacity(self) -> int:
        """Frames the ring holds (it grows when the stored transitions need more)."""
        return self._ring[1]

    # ---------------------------------------------------------------------------------------------- frame layout
    def _split(self, stacks: torch.Tensor) -> torch.Tensor:
        """``[n, *stack_shape]`` stacks -> ``[n, F, *frame_shape]`` frames (a view when the frame dim is first)."""
        position = stacks.ndim + self.dim
        if position < 1:
            raise ValueError(
                f"{self.pixels_key!r} of shape {tuple(stacks.shape[1:])} per transition has no dim {self.dim}."
            )
        if stacks.shape[position] % self.num_frames:
            raise ValueError(
                f"{self.pixels_key!r} has {stacks.shape[position]} entries along dim {self.dim}, not a multiple of "
                f"num_frames={self.num_frames}."
            )
        return stacks.unflatten(position, (self.num_frames, -1)).movedim(position, 1)

    def _join(self, frames: torch.Tensor) -> torch.Tensor:
        """``[n, F, *frame_shape]`` frames -> ``[n, *stack_shape]`` stacks (the inverse of :meth:`_split`)."""
        position = frames.ndim - 1 + self.dim
        return frames.movedim(1, position).flatten(position, position + 1)

    # ----------------------------------------------------------------------------------------------------- write
    def set(self, cursor: int | torch.Tensor, data: TensorDictBase, *, set_cursor: bool = True) -> None:
        if not isinstance(data, TensorDictBase):
            raise TypeError(f"{type(self).__name__} stores TensorDicts, got {type(data).__name__}.")
        if isinstance(cursor, int):
            cursor, data = torch.tensor([cursor]), data.unsqueeze(0)
        elif isinstance(cursor, slice):
            cursor = torch.arange(self.max_size)[cursor]
        if data.batch_dims != 1:
            raise ValueError(
                f"{type(self).__name__} takes transitions with one batch dim, got batch_size={list(data.batch_size)}; "
                "flatten them in time order first (e.g. data.reshape(-1) of [env, time] data)."
            )
        frame_ids = self._write_frames(torch.as_tensor(cursor, dtype=torch.long).reshape(-1).cpu(), data)
        transitions = data.exclude(self.pixels_key, self.next_pixels_key)
        transitions.set(FRAME_IDS_KEY, frame_ids.to(transitions.device or frame_ids.device))
        super().set(cursor, transitions, set_cursor=set_cursor)

    def _write_frames(self, cursor: torch.Tensor, data: TensorDictBase) -> torch.Tensor:
        """Writes the frames no stored transition holds yet; returns each transition's ``[F + 1]`` frame numbers."""
        num_frames = self.num_frames
        if not len(data):
            return torch.empty(0, num_frames + 1, dtype=torch.long)
        observations = self._split(data.get(self.pixels_key))
        next_observations = self._split(data.get(self.next_pixels_key))
        if observations.shape != next_observations.shape:
            raise ValueError(
                f"{self.pixels_key!r} and {self.next_pixels_key!r} differ in shape: "
                f"{tuple(observations.shape)} and {tuple(next_observations.shape)} (as frames)."
            )
        shifted = (next_observations[:, :-1] == observations[:, 1:]).flatten(1).all(1)
        if not shifted.all():
            first = int((~shifted).nonzero()[0])
            raise ValueError(
                f"transition {first}: its next observation is not its observation shifted by one frame plus a new "
                f"one, as CatFrames(N={num_frames}, dim={self.dim}) stacks them; {type(self).__name__} stores "
                "frames stacked that way."
            )
        traj_ids = data.get(self.traj_key, None)
        if traj_ids is None:
            raise KeyError(
                f"{type(self).__name__} needs trajectory ids at {self.traj_key!r} (TorchRL's collectors write them) "
                "to tell which frames an episode's transitions share."
            )
        traj_ids = traj_ids.reshape(len(data)).tolist()
        done = data.get(self.next_done_key, None)
        done = [False] * len(data) if done is None else done.reshape(len(data), -1).any(-1).tolist()
        # A transition continues the previous one of this write when it is of the same trajectory and its frames are
        # that one's next frames (compared for all of them at once).
        continues_previous = [False] + (
            (observations[1:] == next_observations[:-1]).flatten(1).all(1).tolist() if len(data) > 1 else []
        )

        frame_ids = torch.empty(len(data), num_frames + 1, dtype=torch.long)
        new_frames: list[torch.Tensor] = []
        next_number = self.frames_written
        for i, traj_id in enumerate(traj_ids):
            if continues_previous[i] and traj_ids[i - 1] == traj_id and not done[i - 1]:
                observation_ids = frame_ids[i - 1, 1:]
            else:
                observation_ids = self._open_trajectories.get(traj_id)
                if observation_ids is None or not torch.equal(self.frames(observation_ids), observations[i]):
                    # The first observation of a trajectory in the buffer: its frames, equal neighbours once.
                    observation_ids = torch.empty(num_frames, dtype=torch.long)
                    for j in range(num_frames):
                        if j and torch.equal(observations[i, j], observations[i, j - 1]):
                            observation_ids[j] = observation_ids[j - 1]
                        else:
                            observation_ids[j] = next_number
                            new_frames.append(observations[i, j])
                            next_number += 1
            frame_ids[i, :num_frames] = observation_ids
            frame_ids[i, num_frames] = next_number
            new_frames.append(next_observations[i, -1])
            next_number += 1
            if done[i]:
                self._open_trajectories.pop(traj_id, None)
            else:
                self._open_trajectories[traj_id] = frame_ids[i, 1:]

        self._make_room(cursor, frame_ids, next_number, new_frames[0])
        frames, capacity = self._ring
        numbers = torch.arange(self.frames_written, next_number, device=frames.device)
        # Counted before they are written: a reader that checks the count after gathering sees any overwrite.
        self.frames_written = next_number
        frames[numbers % capacity] = torch.stack(new_frames).to(frames.device)
        # Trajectories whose frames are overwritten can no longer be continued.
        self._open_trajectories = {
            traj_id: ids
            for traj_id, ids in self._open_trajectories.items()
            if int(ids.min()) >= self.frames_written - capacity
        }
        return frame_ids

    def _make_room(self, cursor: torch.Tensor, frame_ids: torch.Tensor, frames_after: int, frame: torch.Tensor) -> None:
        """Allocates the ring on the first write (``frame``: one frame); grows it if writing the frames numbered up
        to ``frames_after`` would overwrite one that a transition still stored after this write needs, or one of the
        ``margin`` frames before it."""
        frames, capacity = self._ring
        if frames is None:
            device = frame.device if self.device == "auto" else self.device
            # torch.empty: pages become resident as frames are written, not before.
            self._ring = (torch.empty((capacity, *frame.shape), dtype=frame.dtype, device=device), capacity)
        needed_from = int(frame_ids[:, 0].min())  # the oldest frame of a stack comes first
        stored = self._len_along_dim0 if self.initialized else 0
        if stored:
            oldest = self._storage.get(FRAME_IDS_KEY)[:stored, 0].cpu()
            kept = torch.ones(stored, dtype=torch.bool)
            kept[cursor[cursor < stored]] = False  # overwritten by this write
            if kept.any():
                needed_from = min(needed_from, int(oldest[kept].min()))
        needed = frames_after - max(needed_from - self.margin, 0)
        if needed > capacity:
            self._grow(max(needed, capacity + capacity // 4))

    def _grow(self, capacity: int) -> None:
        """Moves the ring's frames into a ring of ``capacity`` frames."""
        old, old_capacity = self._ring
        new = torch.empty((capacity, *old.shape[1:]), dtype=old.dtype, device=old.device)
        _copy_frames(old, old_capacity, new, self.frames_written)
        self._ring = (new, capacity)
        warnings.warn(
            f"{type(self).__name__}: the stored transitions need more frames than its ring held ({old_capacity}): "
            f"many short episodes, each adding its first frame; the ring now holds {capacity} frames "
            f"({capacity * new[0].numel() * new.element_size() / 2**30:.2f} GiB). Pass frame_capacity={capacity} "
            "to allocate it at the start.",
            stacklevel=4,
        )

    # ------------------------------------------------------------------------------------------------------ read
    def frames(self, frame_ids: torch.Tensor) -> torch.Tensor:
        """The frames numbered ``frame_ids`` (any shape), as ``[*frame_ids.shape, *frame_shape]``."""
        ring, capacity = self._ring
        if ring is None:
            raise RuntimeError(f"{type(self).__name__} holds no frames yet.")
        frames = ring[(frame_ids % capacity).to(ring.device)]
        # Checked after the gather, against the count a writer raises before overwriting (see _write_frames).
        if frame_ids.numel() and int(frame_ids.min()) < self.frames_written - capacity:
            raise RuntimeError(
                f"frame {int(frame_ids.min())} was overwritten ({self.frames_written} frames written into a ring of "
                f"{capacity}) before the batch needing it was rebuilt; a larger frame_capacity leaves more margin."
            )
        return frames

    def rebuild(self, transitions: TensorDictBase) -> TensorDictBase:
        """Replaces :data:`FRAME_IDS_KEY` in ``transitions`` (any batch shape) by the stacks at ``pixels_key`` and
        ``("next", pixels_key)``; both are views into one tensor of ``F + 1`` frames per transition."""
        frame_ids = transitions.get(FRAME_IDS_KEY)
        frames = self.frames(frame_ids.reshape(-1, self.num_frames + 1))  # [n, F + 1, *frame_shape]
        stack_shape = (*transitions.batch_size, *self._join(frames[:1, : self.num_frames]).shape[1:])
        transitions = transitions.exclude(FRAME_IDS_KEY)
        transitions.set(self.pixels_key, self._join(frames[:, : self.num_frames]).reshape(stack_shape))
        transitions.set(self.next_pixels_key, self._join(frames[:, 1:]).reshape(stack_shape))
        return transitions

    def rebuild_transform(self) -> RebuildFrameStacks:
        """The replay-buffer transform that rebuilds the stacks of sampled transitions (:meth:`rebuild`)."""
        return RebuildFrameStacks(self)

    # ------------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        frames, capacity = self._ring
        open_ids = list(self._open_trajectories.items())
        state["frame_store"] = {
            "frame_capacity": capacity,
            "frames_written": self.frames_written,
            # The whole ring (torch.save writes a view's whole storage anyway); a copy of its written part would
            # double the buffer's memory while saving.
            "frames": frames if frames is not None else torch.empty(0),
            "open_traj_ids": torch.tensor([traj_id for traj_id, _ in open_ids], dtype=torch.long),
            "open_frame_ids": (
                torch.stack([ids for _, ids in open_ids])
                if open_ids
                else torch.empty(0, self.num_frames, dtype=torch.long)
            ),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        frame_store = state_dict["frame_store"]
        super().load_state_dict({key: value for key, value in state_dict.items() if key != "frame_store"})
        saved, saved_capacity = frame_store["frames"], int(frame_store["frame_capacity"])
        capacity = max(self.frame_capacity, saved_capacity)
        self.frames_written = int(frame_store["frames_written"])
        frames = None
        if saved.numel():
            # Copied out of the (possibly memory-mapped) state into a ring of our own.
            frames = torch.empty((capacity, *saved.shape[1:]), dtype=saved.dtype, device=self.device)
            _copy_frames(saved, saved_capacity, frames, self.frames_written)
        self._ring = (frames, capacity)
        self._open_trajectories = dict(
            zip(frame_store["open_traj_ids"].tolist(), frame_store["open_frame_ids"].clone().unbind(0))
        )

    def dumps(self, path) -> None:
        raise NotImplementedError(self._SAVE_WITH_STATE_DICT)

    def loads(self, path) -> None:
        raise NotImplementedError(self._SAVE_WITH_STATE_DICT)

    _SAVE_WITH_STATE_DICT = (
        "FrameStackStorage is saved with state_dict() (torch.save) and load_state_dict(), as "
        "alm_torchrl.checkpoint.ReplayBufferAdapter does; ReplayBuffer.dumps would leave its frames out."
    )

    def _empty(self) -> None:
        super()._empty()
        self._open_trajectories = {}


class RebuildFrameStacks(Transform):
    """Replay-buffer transform: rebuilds the frame stacks of transitions sampled from a :class:`FrameStackStorage`.

    Reads :data:`FRAME_IDS_KEY` and writes the storage's ``pixels_key`` and ``("next", pixels_key)``
    (:meth:`FrameStackStorage.rebuild`). Put it first among a buffer's transforms, so that the others (an
    augmentation, say) see the stacks.
    """

    def __init__(self, storage: FrameStackStorage) -> None:
        super().__init__(in_keys=[FRAME_IDS_KEY], out_keys=[storage.pixels_key, storage.next_pixels_key])
        self.storage = storage

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.storage.rebuild(tensordict)

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        return tensordict  # the storage itself takes the stacks apart when they are written


def _copy_frames(source: torch.Tensor, source_capacity: int, target: torch.Tensor, frames_written: int) -> None:
    """Copies the frames of the ring ``source`` (``source_capacity`` slots, ``frames_written`` frames written into
    it) into the ring ``target``, each frame ``n`` from slot ``n % source_capacity`` to slot ``n % len(target)``:
    the last ``min(frames_written, source_capacity, len(target))`` frames."""
    first = max(0, frames_written - min(source_capacity, len(target)))
    chunk = 4096  # a chunk at a time: the copy adds no third ring-sized tensor to the memory peak
    for start in range(first, frames_written, chunk):
        numbers = torch.arange(start, min(start + chunk, frames_written))
        target[(numbers % len(target)).to(target.device)] = source[(numbers % source_capacity).to(source.device)].to(
            target.device
        )
