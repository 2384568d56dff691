"""Training checkpoints on TorchRL's :mod:`torchrl.checkpoint`: everything a run needs to continue where it stopped.

A checkpoint is a :class:`~torchrl.checkpoint.Checkpoint` directory (a JSON manifest, then one folder per component)
holding the loss (every parameter and target), the optimizer's moments and step counts, the exploration noise
schedule, the process's RNG states (:class:`~torchrl.checkpoint.GlobalRNGState`) and the replay buffer's contents.
What identifies the run (task, network sizes, buffer capacity, frame and update counters) goes into the manifest's
``metadata``, which :meth:`TrainingCheckpoints.metadata` reads without loading anything else, so a resume can be
checked before anything is built.

:class:`TrainingCheckpoints` keeps a run's checkpoints in one directory with TorchRL's
:class:`~torchrl.checkpoint.CheckpointRotation`: each save writes a new ``checkpoint-<frames>`` directory (staged under
a hidden name, then renamed into place: a kill at any moment, mid-write included, or a full disk leaves the previous
checkpoint whole), then removes the older ones. Every file is JSON, raw tensor data or a ``torch.save`` file read with
``weights_only=True`` (tensors and plain containers only): loading a checkpoint never runs code.

Two components need more than TorchRL's generic adapters, each through an adapter of its own:

- the optimizer (:class:`OptimizerStateAdapter`): its moments and step counts come from the checkpoint but its
  settings (learning rate, ``capturable``, ...) stay the live optimizer's, so a run can resume with another learning
  rate or with CUDA graphs (a non-capturable step from the checkpoint would fail to capture);
- the replay buffer (:class:`ReplayBufferAdapter`): TorchRL's own ``ReplayBuffer.dumps`` also pickles the prefetch
  queue and ``loads`` unpickles it, which would let a crafted checkpoint run code, and it writes the storage through
  memory maps, which keeps a whole Humanoid buffer's pages resident while saving; this adapter streams the storage's
  tensors to one file, read back with ``torch.load(weights_only=True)``, and saves the writer (JSON) and the sampler.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrl.checkpoint import (
    Checkpoint,
    CheckpointAdapter,
    CheckpointError,
    CheckpointRotation,
    GlobalRNGState,
    StateDictCheckpointAdapter,
)
from torchrl.data import ReplayBuffer

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "OptimizerStateAdapter",
    "ReplayBufferAdapter",
    "TrainingCheckpoints",
]

CHECKPOINT_PREFIX = "checkpoint"
"""Checkpoints are ``<directory>/checkpoint-<frames, 12 digits>/``."""


class OptimizerStateAdapter(StateDictCheckpointAdapter):
    """Restores an optimizer's state (moments, step counts) but keeps its own settings (lr, ``capturable``, ...).

    ``Optimizer.load_state_dict`` would also take the saved param-group settings; the run's configuration decides
    those instead.
    """

    adapter_id = "alm_torchrl.optimizer_state"

    def load(self, component: torch.optim.Optimizer, path: Path, **kwargs: Any) -> None:
        settings = [{key: value for key, value in group.items() if key != "params"} for group in component.param_groups]
        super().load(component, path, **kwargs)
        for group, setting in zip(component.param_groups, settings):
            group.update(setting)


class ReplayBufferAdapter(CheckpointAdapter):
    """Saves a replay buffer's storage (its tensors), writer (JSON) and sampler; never unpickles an object.

    The storage's state is streamed to one file with ``torch.save`` (writing a 3 GB Humanoid buffer through memory
    maps instead, as ``ReplayBuffer.dumps`` does, keeps every written page resident until the save ends: 5.9 instead
    of 3.3 GiB at the peak, ``benchmarks/README.md``) and read back with ``torch.load(weights_only=True)``, which
    accepts tensors and plain containers only. Loading maps that file, copies the transitions into the buffer's own
    storage on its device, and releases the file.
    """

    adapter_id = "alm_torchrl.replay_buffer"

    def save(self, component: ReplayBuffer, path: Path, *, args: tuple, kwargs: Mapping[str, Any]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        size = len(component)
        if size:
            torch.save(component.storage.state_dict(), path / "storage.pt")
        component.writer.dumps(path / "writer")
        component.sampler.dumps(path / "sampler")
        (path / "buffer.json").write_text(json.dumps({"len": size}))

    def load(self, component: ReplayBuffer, path: Path, *, map_location: Any, **kwargs: Any) -> None:
        if json.loads((path / "buffer.json").read_text())["len"]:
            device = getattr(component.storage, "device", None) or map_location
            state = torch.load(path / "storage.pt", weights_only=True, mmap=True, map_location=device)
            component.storage.load_state_dict(state)  # copies (clones) out of the mapped file
            del state
        component.writer.loads(path / "writer")
        if (path / "sampler").exists():
            component.sampler.loads(path / "sampler")


class TrainingCheckpoints:
    """A run's checkpoints: save every component of training into ``directory``, load them back.

    Args:
        directory: where the checkpoints go, one ``checkpoint-<frames>`` directory each.

    Keyword Args:
        loss: the loss module (its ``state_dict`` holds every network's parameters and targets).
        optimizer: restored through :class:`OptimizerStateAdapter` (its settings stay the live ones).
        replay_buffer: restored through :class:`ReplayBufferAdapter`.
        exploration_noise: the behaviour policy's noise module (its annealed std), if it has one.
        keep_last: how many checkpoints to keep (the newest ones). Defaults to ``1``.

    Examples:
        >>> import tempfile, torch
        >>> from torchrl.data import LazyTensorStorage, ReplayBuffer
        >>> net = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.Adam(net.parameters())
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     checkpoints = TrainingCheckpoints(directory, loss=net, optimizer=optimizer,
        ...                                       replay_buffer=ReplayBuffer(storage=LazyTensorStorage(10)))
        ...     path = checkpoints.save(step=100, metadata={"task": "demo"})
        ...     TrainingCheckpoints.metadata(directory)["task"], path.name
        ('demo', 'checkpoint-000000000100')
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        loss: nn.Module,
        optimizer: torch.optim.Optimizer,
        replay_buffer: ReplayBuffer,
        exploration_noise: nn.Module | None = None,
        keep_last: int = 1,
    ) -> None:
        self.directory = Path(directory)
        self.rotation = CheckpointRotation(self.directory, keep_last=keep_last, prefix=CHECKPOINT_PREFIX)
        self.checkpoint = Checkpoint(loss=loss, rng=GlobalRNGState())
        self.checkpoint.register("optimizer", optimizer, adapter=OptimizerStateAdapter())
        self.checkpoint.register("replay_buffer", replay_buffer, adapter=ReplayBufferAdapter())
        if exploration_noise is not None:
            self.checkpoint.register("exploration_noise", exploration_noise)

    def save(self, step: int, metadata: Mapping[str, Any]) -> Path:
        """Write a checkpoint for ``step`` (frames collected) with JSON ``metadata``, then drop the older ones.

        Returns its path. A failure (a full disk, say) raises and leaves the previous checkpoints as they were.
        """
        self._remove_unfinished_writes()
        return self.rotation.save(self.checkpoint, step=step, metadata=metadata)

    def load(self, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Load the checkpoint at ``path`` (one checkpoint, or a directory of them: the newest) into the components.

        Tensors go to ``device``; the RNG states are restored too. Returns the checkpoint's metadata.
        """
        result = self.checkpoint.load(self.find(path), map_location=device)
        return dict(result.manifest["metadata"])

    @staticmethod
    def find(path: str | os.PathLike) -> Path:
        """The checkpoint at ``path``: ``path`` itself if it is one, else the newest one in the directory ``path``.

        Raises ``FileNotFoundError`` when there is none, and :class:`~torchrl.checkpoint.CheckpointError` when
        ``path`` looks like a checkpoint but its manifest cannot be read.
        """
        path = Path(path)
        if (path / "manifest.json").exists():
            Checkpoint.manifest(path)  # raises on a damaged or foreign manifest
            return path
        latest = CheckpointRotation(path, keep_last=1, prefix=CHECKPOINT_PREFIX).latest() if path.is_dir() else None
        if latest is None:
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        return latest

    @classmethod
    def metadata(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The metadata saved with the checkpoint at ``path`` (see :meth:`find`), read from its manifest alone."""
        return dict(Checkpoint.manifest(cls.find(path)).get("metadata", {}))

    def _remove_unfinished_writes(self) -> None:
        """Remove what a killed save or prune left (hidden ``.checkpoint-*.stage-*`` / ``.delete-*`` entries)."""
        if not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            name = entry.name
            if name.startswith(f".{CHECKPOINT_PREFIX}-") and (".stage-" in name or ".delete-" in name):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
