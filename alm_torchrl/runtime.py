"""Runtime set-up for ALM's update: torch's threads, glibc's malloc, whether torch.compile works, and a marked
workaround for tensordict.

Threads. torch's default is one intra-op thread per physical core, which collapses when other processes are busy on
the same cores: every parallel region waits for its slowest thread, and a thread the scheduler has put aside holds the
others up for a whole time slice. With one other process busy on a 2-core VM, two threads made the update 5 to 29
times slower than one thread, from tiny networks (batch 16, hidden 32) to hidden 256 at batch 256
(``benchmarks/README.md``). :class:`AdaptiveThreads` therefore gives the update the cores that the other processes
leave free (measured from ``/proc/stat``), never more than this process may use (its CPU affinity, a cgroup CPU quota,
``OMP_NUM_THREADS``), one thread for updates too small to gain from a second one, and looks again every half minute.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from tensordict import is_tensor_collection, TensorDictBase

__all__ = [
    "SMALL_UPDATE_GFLOP",
    "AdaptiveThreads",
    "configure_cpu_runtime",
    "estimate_update_gflop",
    "skip_pandas_lookup_in_tensordict_from_any",
    "torch_compile_failure",
    "usable_cores",
]

SMALL_UPDATE_GFLOP = 1.0
"""An update under this many GFLOP runs on one thread: its matrix multiplies are too small for a second thread to
repay the synchronisation (a choice; the paper-size update is about 28 GFLOP)."""

# torch's default before anything here changes it: one per physical core, or OMP_NUM_THREADS when that is set.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def configure_cpu_runtime(num_threads: int | None = None, *, keep_freed_memory: bool = True) -> None:
    """Set torch's intra-op threads and keep freed heap memory in the process (glibc only).

    One ALM update allocates and frees a few hundred MB of activations. glibc's default
    malloc hands large blocks back to the kernel (mmap'd chunks, heap trimming), so every update
    page-faults them in again: about 12,000 minor faults and 13 ms per update on a 2-core CPU
    (benchmarks/README.md). Raising the mmap and trim thresholds keeps that memory in the
    process; PyTorch's CPU tuning guide gets the same effect by swapping in jemalloc or tcmalloc.
    ``num_threads=None`` leaves the threads alone (see :class:`AdaptiveThreads` for choosing them).
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(
                f"num_threads must be a positive integer or None (chosen per machine), got {num_threads!r}"
            )
        torch.set_num_threads(num_threads)
    if not keep_freed_memory or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value on 64-bit
    mallopt(m_trim_threshold, 2**30)


def usable_cores() -> int:
    """The most threads this process should run at once: torch's default (physical cores, or ``OMP_NUM_THREADS``),
    capped by its CPU affinity (``taskset``, a SLURM allocation) and a cgroup CPU quota (a container's ``--cpus``)."""
    cores = _TORCH_DEFAULT_THREADS
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(cores, 1)


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time per second this process's cgroup may use, or None without a quota (v2, then v1)."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


class _CpuLoad:
    """How many of this process's CPUs other processes kept busy since the previous reading (Linux ``/proc/stat``)."""

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        """(wall time, busy CPU-seconds of our CPUs, CPU-seconds of this process), or None where unreadable."""
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        busy = 0
        for line in lines:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
                continue
            if self.cpus is not None and int(name[3:]) not in self.cpus:
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = (int(value) for value in fields[:8])
            # steal: time the hypervisor gave this vCPU to another machine, as unavailable to us as a busy core
            busy += user + nice + system + irq + softirq + steal
        own = os.times()
        return time.monotonic(), busy / self.ticks_per_s, own.user + own.system

    def others_busy(self) -> float | None:
        """CPUs' worth of work that other processes did on our CPUs since the last call (None if unknown)."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        wall = now[0] - last[0]
        return max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / wall


class AdaptiveThreads:
    """Chooses torch's intra-op threads from the machine, at start and again every ``period_s`` seconds.

    The update gets ``min(usable cores, cores that other processes leave free)`` threads, at least one, and exactly
    one when it is under :data:`SMALL_UPDATE_GFLOP`. Call :meth:`update` between updates (the recipe does once per
    collected batch); it rereads the load at most every ``period_s`` seconds (two small ``/proc`` reads). Results are
    bitwise reproducible only at a fixed thread count: pin it (the recipe's ``compile.num_threads``) to compare runs.

    Args:
        gflop_per_update: the update's size, e.g. :func:`estimate_update_gflop`.

    Keyword Args:
        period_s: seconds between two looks at the load. Defaults to ``30``.
        first_look_s: how long the first look measures the load, at construction. Defaults to ``0.25``.
    """

    def __init__(self, gflop_per_update: float, *, period_s: float = 30.0, first_look_s: float = 0.25) -> None:
        self.max_threads = 1 if gflop_per_update < SMALL_UPDATE_GFLOP else usable_cores()
        self.period_s = period_s
        self.load = _CpuLoad() if self.max_threads > 1 else None
        self._next_look = 0.0
        if self.load is not None:
            time.sleep(first_look_s)
        self.update()

    @property
    def num_threads(self) -> int:
        return torch.get_num_threads()

    def update(self) -> int:
        """Set the thread count for the current load if ``period_s`` has passed since the last look; returns it."""
        if self.load is None:
            if torch.get_num_threads() != 1:
                torch.set_num_threads(1)
            return 1
        now = time.monotonic()
        if now < self._next_look:
            return torch.get_num_threads()
        self._next_look = now + self.period_s
        others = self.load.others_busy()
        threads = self.max_threads if others is None else self._threads_for(others)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def _threads_for(self, others_busy: float) -> int:
        cpus = len(self.load.cpus) if self.load.cpus is not None else self.max_threads
        free = cpus - others_busy
        # A core counts as free when other processes use under a quarter of it.
        return max(1, min(self.max_threads, math.floor(free + 0.25)))


def estimate_update_gflop(num_parameters: int, transitions_per_update: int) -> float:
    """Rough GFLOP of one update: forward and backward (6 FLOP per parameter and transition) over the batch. At the
    paper's sizes (3.0M parameters, 512 slices of 3 steps) this gives 28, the measured figure."""
    return 6 * num_parameters * transitions_per_update / 1e9


def skip_pandas_lookup_in_tensordict_from_any() -> None:
    """Workaround for tensordict <= 0.14.3: a ``TensorDictModule`` output no longer scans ``sys.path`` for pandas.

    Every tensor a ``TensorDictModule`` writes goes through ``TensorDict.from_any``, which, for a plain tensor, calls
    ``importlib.util.find_spec("pandas")`` (a scan of ``sys.path``) before returning the tensor unchanged: about 30
    times per ALM update and 3 times per collected frame (``benchmarks/README.md``). This makes ``from_any`` return
    plain tensors at once, as it eventually does anyway. The fix for tensordict itself, and the issue text, are in
    ``upstream/tensordict/``; drop this when a tensordict release has it. Idempotent.
    """
    from_any = TensorDictBase.__dict__["from_any"].__func__
    if getattr(from_any, "_returns_tensors_early", False):
        return

    @functools.wraps(from_any)
    def from_any_tensors_first(cls, obj, **kwargs):
        if isinstance(obj, torch.Tensor) and not is_tensor_collection(obj):
            return obj
        return from_any(cls, obj, **kwargs)

    from_any_tensors_first._returns_tensors_early = True
    TensorDictBase.from_any = classmethod(from_any_tensors_first)


@functools.cache
def torch_compile_failure(device_type: str = "cpu") -> str | None:
    """Why ``torch.compile`` cannot run on ``device_type`` here, or ``None`` when it can (checked once per process).

    Compiles and runs a two-op function: on the CPU that needs a working C++ compiler and Python's headers, on CUDA
    Triton and the CUDA toolchain. Takes a few seconds the first time on a machine, less once inductor's cache holds
    it. The cause is the first line of torch's error (e.g. ``InvalidCxxCompiler: No working C++ compiler found``).
    """
    try:
        probe = torch.compile(lambda x: torch.sin(x) * 2.0)
        probe(torch.ones(4, device=device_type))
    except Exception as err:  # any failure means: do not compile here
        lines = [line for line in str(err).splitlines() if line.strip()]
        return lines[0].strip() if lines else type(err).__name__
    finally:
        torch._dynamo.reset()
    return None
