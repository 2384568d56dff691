"""Training checkpoints on TorchRL's :mod:`torchrl.checkpoint`: everything a run needs to continue where it stopped.

A checkpoint is a :class:`~torchrl.checkpoint.Checkpoint` directory (a JSON manifest, then one folder per component)
holding the loss (every parameter and target), the optimizer's moments and step counts, the exploration noise
schedule, the process's RNG states (:class:`~torchrl.checkpoint.GlobalRNGState`), the replay buffer's contents and,
when given, the collector's progress with the step in progress and the simulators' states
(:class:`CollectorState`, :class:`~alm_torchrl.envs.SimulatorState`). With all of them, a resumed run repeats the
uninterrupted run's next updates bitwise on the CPU. What identifies the run (task, network sizes, buffer capacity,
frame and update counters) goes into the manifest's ``metadata``, which :meth:`TrainingCheckpoints.metadata` reads
without loading anything else, so a resume can be checked before anything is built.

:class:`TrainingCheckpoints` keeps a run's checkpoints in one directory with TorchRL's
:class:`~torchrl.checkpoint.CheckpointRotation`: each save writes a new ``checkpoint-<frames>`` directory (staged under
a hidden name, flushed to disk, then renamed into place: a kill at any moment, mid-write included, a full disk or a
power loss leaves the previous checkpoint whole), then removes the older ones.

Loading never runs code, and never loads a damaged file. Every component records the size and CRC-32 of each of its
files (``checksums.json``); :meth:`TrainingCheckpoints.verify` checks them, and what kind of file each one is, before
anything is loaded: JSON, raw tensor data (TensorDict's memory-mapped ``.memmap`` files, whose ``meta.json`` must
describe a plain TensorDict), or ``torch.save`` files that hold tensors and plain containers only (read with
``weights_only=True``). Anything else is refused, naming the file. That check matters beyond damage: TorchRL 0.14's
state-dict adapter reads its tensors with ``tensordict.load``, which unpickles an ``other.pickle`` file it finds there
(tensordict 0.14 defaults to ``allow_pickle=None``, a warning), so a crafted checkpoint could otherwise run code.
The load paths, each checked: the manifest and every ``state.json`` schema are JSON, decoded into plain values,
tensors, dtypes and devices only (TorchRL's state-dict adapter, used for the loss, the optimizer's state, the noise
schedule, :class:`~torchrl.checkpoint.GlobalRNGState`, the collector, the simulators and the pending metrics); their
tensors are memory-mapped ``.memmap`` files read through ``tensordict.load``; the replay buffer's storage is
``torch.load(weights_only=True)``, its writer JSON and a ``.memmap``, its sampler nothing (``SliceSampler`` saves no
state).

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

import errno
import json
import os
import shutil
import zlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torch import nn
from torchrl.checkpoint import (
    Checkpoint,
    CheckpointAdapter,
    CheckpointError,
    CheckpointRotation,
    GlobalRNGState,
    StateDictCheckpointAdapter,
)
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer
from torchrl.envs import EnvBase

from alm_torchrl.envs import SimulatorState

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "CollectorState",
    "OptimizerStateAdapter",
    "ReplayBufferAdapter",
    "TrainingCheckpoints",
    "VerifiedAdapter",
]

CHECKPOINT_PREFIX = "checkpoint"
"""Checkpoints are ``<directory>/checkpoint-<frames, 12 digits>/``."""
CHECKPOINT_FORMAT = "alm-torchrl/2"
"""Written into every checkpoint's metadata; :meth:`TrainingCheckpoints.verify` refuses a checkpoint of another
format. 2: checksums, the collector and simulator states."""
CHECKSUMS = "checksums.json"
_TENSORDICT_TYPE = str(TensorDict)  # the only class a checkpoint's meta.json may name (tensordict.load picks it)
_CHUNK = 16 * 2**20


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
            # Through a Python file, so that a failed write (a full disk) is the OSError that callers handle as one:
            # torch.save given a path writes in C++ and reports it as a RuntimeError ("unexpected pos ..."); given a
            # file, it raises that RuntimeError while handling the file's OSError, which is the one to raise.
            with (path / "storage.pt").open("wb") as file:
                try:
                    torch.save(component.storage.state_dict(), file)
                except RuntimeError as err:
                    if isinstance(err.__context__, OSError):
                        raise err.__context__ from None
                    raise
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


class VerifiedAdapter(CheckpointAdapter):
    """Wraps another adapter and records the size and CRC-32 of every file it writes, in ``checksums.json``.

    :meth:`TrainingCheckpoints.verify` checks them before any component is loaded; loading itself is the wrapped
    adapter's.
    """

    def __init__(self, adapter: CheckpointAdapter) -> None:
        self.adapter = adapter
        self.adapter_id = f"{adapter.adapter_id}+crc32"
        self.format_version = adapter.format_version

    def save(self, component: Any, path: Path, *, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        result = self.adapter.save(component, path, args=args, kwargs=kwargs)
        path.mkdir(parents=True, exist_ok=True)
        checksums = {
            file.relative_to(path).as_posix(): [file.stat().st_size, _crc32(file)]
            for file in sorted(path.rglob("*"))
            if file.is_file() and file.name != CHECKSUMS
        }
        (path / CHECKSUMS).write_text(json.dumps(checksums, indent=1, sort_keys=True))
        return result

    def load(self, component: Any, path: Path, **kwargs: Any) -> Any:
        return self.adapter.load(component, path, **kwargs)


def _crc32(file: Path) -> int:
    crc = 0
    with file.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class _DurableCheckpoint(Checkpoint):
    """A :class:`~torchrl.checkpoint.Checkpoint` whose files are on disk before it is published.

    TorchRL writes a checkpoint under a hidden name, renames it into place and (``CheckpointRotation``) then deletes
    the older ones, flushing nothing: after a power loss, the rename and the deletion can have reached the disk while
    the new files' data has not, leaving no whole checkpoint. TorchRL 0.14 has no hook between writing a checkpoint and
    publishing it, so this overrides the (private) step that publishes, ``_publish_path``: it flushes every staged file
    and directory first, and the directory the checkpoint is renamed into after, before anything older is deleted.
    """

    @staticmethod
    def _publish_path(source: Path, destination: Path) -> None:
        _fsync_tree(source)
        Checkpoint._publish_path(source, destination)
        _fsync(destination.parent)


def _fsync_tree(root: Path) -> None:
    """Flush ``root`` to disk: a file's data, or a directory's files, then each directory's entries."""
    if not root.is_dir():
        _fsync(root)
    for directory, _, files in os.walk(root, topdown=False):  # nothing for a file
        for name in files:
            _fsync(Path(directory, name))
        _fsync(Path(directory))


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class CollectorState:
    """A TorchRL :class:`~torchrl.collectors.Collector` as a checkpoint component.

    Holds ``Collector.state_dict()`` (frames collected, iterations, the next trajectory id; not the policy's weights,
    which the loss holds), and, when its env's simulator state can be captured (:class:`~alm_torchrl.envs.
    SimulatorState`), that state and the step in progress: the tensordict the collector carries from one step to
    the next (observation, step count, episode return, trajectory id), which ``Collector.state_dict`` leaves out
    because an env's state cannot in general be saved. Loading then continues the episode in progress exactly, with
    its trajectory id; otherwise the collector starts a fresh trajectory (TorchRL's behaviour) and
    :attr:`restored_episode` is False.
    """

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.simulator = SimulatorState(collector.env)
        self.restored_episode = False

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.collector.state_dict())
        state.pop("policy_state_dict", None)
        if self.simulator.restorable:
            state["simulator"] = self.simulator.state_dict()
            # The collector's private carrier: TorchRL has no public accessor for the step in progress.
            state["carrier"] = self.collector._carrier.to_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        simulator, carrier = state.pop("simulator", None), state.pop("carrier", None)
        self.collector.load_state_dict(state, strict=False)  # starts a fresh trajectory, with a new id
        self.restored_episode = simulator is not None and self.simulator.restorable
        if not self.restored_episode:
            return
        self.simulator.load_state_dict(simulator)
        fresh = self.collector._carrier
        restored = TensorDict(carrier, batch_size=fresh.batch_size).to(self.collector.env.device)
        if fresh.device is None:
            restored.clear_device_()
        self.collector._carrier = restored
        self.collector._traj_pool.load_state_dict(state["traj_pool"])  # the episode keeps its id: no new one taken


class TrainingCheckpoints:
    """A run's checkpoints: save every component of training into ``directory``, load them back.

    Args:
        directory: where the checkpoints go, one ``checkpoint-<frames>`` directory each.

    Keyword Args:
        loss: the loss module (its ``state_dict`` holds every network's parameters and targets).
        optimizer: restored through :class:`OptimizerStateAdapter` (its settings stay the live ones).
        replay_buffer: restored through :class:`ReplayBufferAdapter`.
        exploration_noise: the behaviour policy's noise module (its annealed std), if it has one.
        collector: the training collector (:class:`CollectorState`), so that the episode in progress continues.
        eval_env: the evaluation env (:class:`~alm_torchrl.envs.SimulatorState`: the random generators of its
            resets), so that the evaluations after a resume start from the same states as without it.
        extra_state: more components by name: anything with ``state_dict()`` and ``load_state_dict()`` whose state is
            tensors and plain values.
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
        collector: Collector | None = None,
        eval_env: EnvBase | None = None,
        extra_state: Mapping[str, Any] | None = None,
        keep_last: int = 1,
    ) -> None:
        self.directory = Path(directory)
        self.rotation = CheckpointRotation(self.directory, keep_last=keep_last, prefix=CHECKPOINT_PREFIX)
        self.checkpoint = _DurableCheckpoint()
        self.collector_state = CollectorState(collector) if collector is not None else None
        components = {
            "loss": (loss, StateDictCheckpointAdapter()),
            "rng": (GlobalRNGState(), StateDictCheckpointAdapter()),
            "optimizer": (optimizer, OptimizerStateAdapter()),
            "replay_buffer": (replay_buffer, ReplayBufferAdapter()),
            "exploration_noise": (exploration_noise, StateDictCheckpointAdapter()),
            "collector": (self.collector_state, StateDictCheckpointAdapter()),
            "eval_env": (SimulatorState(eval_env) if eval_env is not None else None, StateDictCheckpointAdapter()),
            **{name: (value, StateDictCheckpointAdapter()) for name, value in (extra_state or {}).items()},
        }
        for name, (component, adapter) in components.items():
            if component is not None:
                self.checkpoint.register(name, component, adapter=VerifiedAdapter(adapter))

    def save(self, step: int, metadata: Mapping[str, Any]) -> Path:
        """Write a checkpoint for ``step`` (frames collected) with JSON ``metadata``, then drop the older ones.

        Returns its path. Its files reach the disk before it is published and the older ones are removed, so that even
        a power loss leaves one whole checkpoint. A failed write (a full disk, say) raises ``OSError`` and leaves the
        previous checkpoints as they were.
        """
        self._remove_unfinished_writes()
        self._check_room()
        metadata = {**metadata, "format": CHECKPOINT_FORMAT}
        return self.rotation.save(self.checkpoint, step=step, metadata=metadata)

    def _check_room(self) -> None:
        """Raise ``OSError`` (ENOSPC) if the disk has less room than the newest checkpoint takes, the size of the next.

        Some components are written through memory-mapped files (tensordict's), and a disk that fills while one is
        written ends the process with SIGBUS, not with an error the caller can handle; the previous checkpoint survives
        that too, but the run would end without saying why. Every checkpoint of a run has the same size (the replay
        buffer is saved whole), so the newest one says what the next one needs.
        """
        newest = self.rotation.latest() if self.directory.is_dir() else None
        if newest is None:
            return
        needed = sum(file.stat().st_size for file in newest.rglob("*") if file.is_file())
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"{free / 2**20:.0f} MiB free on the disk of {self.directory}, where a checkpoint takes "
                f"{needed / 2**20:.0f} MiB",
            )

    def load(self, path: str | os.PathLike, *, device: torch.device | str = "cpu", verify: bool = True) -> dict:
        """Load the checkpoint at ``path`` (one checkpoint, or a directory of them: the newest) into the components.

        Tensors go to ``device``; the RNG states are restored too. Returns the checkpoint's metadata. The files are
        checked first (:meth:`verify`) unless ``verify=False`` (they were just verified).
        """
        path = self.verify(path, components=tuple(self.checkpoint.components)) if verify else self.find(path)
        result = self.checkpoint.load(path, map_location=device)
        return dict(result.manifest["metadata"])

    @staticmethod
    def find(path: str | os.PathLike) -> Path:
        """The checkpoint at ``path``: ``path`` itself if it is one, else the newest one in the directory ``path``.

        Raises ``FileNotFoundError`` when there is none, and :class:`~torchrl.checkpoint.CheckpointError`, naming the
        manifest, when ``path`` is or holds checkpoints but no manifest can be read.
        """
        path = Path(path)
        manifest = path / "manifest.json"
        if manifest.exists():
            try:
                Checkpoint.manifest(path)
            except CheckpointError as err:
                raise CheckpointError(f"{manifest}: {err}") from None
            return path
        latest = CheckpointRotation(path, keep_last=1, prefix=CHECKPOINT_PREFIX).latest() if path.is_dir() else None
        if latest is not None:
            return latest
        published = sorted(path.glob(f"{CHECKPOINT_PREFIX}-*")) if path.is_dir() else []
        if not published:
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        # Checkpoints, none of them readable: name the newest one's manifest rather than say there is none.
        manifest = published[-1] / "manifest.json"
        if not manifest.exists():
            raise CheckpointError(f"{manifest}: missing")
        return TrainingCheckpoints.find(published[-1])

    @classmethod
    def metadata(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The metadata saved with the checkpoint at ``path`` (see :meth:`find`), read from its manifest alone."""
        return dict(Checkpoint.manifest(cls.find(path)).get("metadata", {}))

    @classmethod
    def verify(cls, path: str | os.PathLike, components: Collection[str] = ()) -> Path:
        """Check the checkpoint at ``path`` (see :meth:`find`) without loading any of it; return its directory.

        Raises :class:`~torchrl.checkpoint.CheckpointError`, its message starting with the file at fault, when the
        checkpoint has another format (:data:`CHECKPOINT_FORMAT`), when it lacks one of ``components`` (the names of
        those that will be loaded from it), when a file is missing, unexpected, of another size or CRC-32 than when it
        was written, or of a kind whose loading could run code: a pickle, a ``meta.json`` naming another class than
        TensorDict, a ``torch.save`` file holding objects other than tensors and plain containers, a link. The kinds are
        checked first, then the sizes, then the contents.
        """
        checkpoint = cls.find(path)
        manifest_file = checkpoint / "manifest.json"
        manifest = Checkpoint.manifest(checkpoint)
        found = manifest.get("metadata", {}).get("format")
        if found != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{manifest_file}: checkpoint format {found!r}; this version of alm_torchrl reads {CHECKPOINT_FORMAT!r}"
            )
        missing = sorted(set(components) - set(manifest["components"]))
        if missing:
            raise CheckpointError(
                f"{manifest_file}: lacks {', '.join(missing)}, which this run restores (the checkpoint holds "
                f"{', '.join(sorted(manifest['components']))})"
            )
        recorded: dict[Path, tuple[int, int]] = {}
        for component in manifest["components"].values():
            directory = checkpoint / component["path"]
            checksums_file = directory / CHECKSUMS
            try:
                checksums = json.loads(checksums_file.read_text())
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{checksums_file}: unreadable ({err})") from None
            present = {
                entry.relative_to(directory).as_posix()
                for entry in directory.rglob("*")
                if entry.name != CHECKSUMS and (entry.is_file() or entry.is_symlink())
            }
            for relative in sorted(present - set(checksums)):
                raise CheckpointError(f"{directory / relative}: not written with this checkpoint (no checksum for it)")
            for relative in sorted(set(checksums) - present):
                raise CheckpointError(f"{directory / relative}: missing")
            recorded.update({directory / relative: tuple(entry) for relative, entry in checksums.items()})
        for file in sorted(recorded):
            _check_kind(file)
        for file, (size, _) in recorded.items():
            if file.stat().st_size != size:
                raise CheckpointError(
                    f"{file}: {file.stat().st_size} bytes, {size} when written (truncated or damaged)"
                )
        for file, (_, crc) in recorded.items():
            found_crc = _crc32(file)
            if found_crc != crc:
                raise CheckpointError(f"{file}: damaged (CRC-32 {found_crc:08x}, {crc:08x} when written)")
        return checkpoint

    def _remove_unfinished_writes(self) -> None:
        """Remove what a killed save or prune left (hidden ``.checkpoint-*.stage-*`` / ``.delete-*`` entries)."""
        if not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            name = entry.name
            if name.startswith(f".{CHECKPOINT_PREFIX}-") and (".stage-" in name or ".delete-" in name):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _check_kind(file: Path) -> None:
    """Refuse a file whose loading could run code: only JSON, raw tensor data and tensors-only torch files pass."""
    if file.is_symlink():
        raise CheckpointError(f"{file}: a link; a checkpoint holds plain files only")
    if file.suffix == ".memmap":  # raw tensor bytes, shaped by the JSON next to them
        return
    if file.suffix == ".json":
        try:
            content = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{file}: not readable JSON (truncated or damaged): {err}") from None
        # tensordict.load builds the class a meta.json names; all but TensorDict may unpickle their fields.
        if file.name == "meta.json" and content.get("_type") != _TENSORDICT_TYPE:
            raise CheckpointError(
                f"{file}: describes a {content.get('_type')!r}, not a TensorDict; refusing to load it "
                "(tensordict may unpickle its fields, which can run code)"
            )
        return
    if file.suffix == ".pt":
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception as err:  # noqa: BLE001 - any failure to read the archive is a damaged file
            raise CheckpointError(f"{file}: not a readable torch file (truncated or damaged): {err}") from None
        if unsafe:
            raise CheckpointError(
                f"{file}: holds pickled objects other than tensors ({', '.join(sorted(unsafe))}); refusing to load "
                "it (unpickling them can run code)"
            )
        return
    raise CheckpointError(f"{file}: a {file.suffix or 'suffix-less'} file, which no checkpoint of this format holds "
                          "(only JSON, .memmap and tensors-only .pt files); refusing to load it")
