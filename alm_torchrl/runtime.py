"""CPU runtime tuning for ALM's update: torch's threads and glibc's malloc."""

from __future__ import annotations

import ctypes
import sys

import torch

__all__ = ["configure_cpu_runtime"]


def configure_cpu_runtime(num_threads: int | None = None, *, keep_freed_memory: bool = True) -> None:
    """Set torch's intra-op threads and keep freed heap memory in the process (glibc only).

    One ALM update allocates and frees a few hundred MB of activations. glibc's default
    malloc hands large blocks back to the kernel (mmap'd chunks, heap trimming), so every update
    page-faults them in again: about 12,000 minor faults and 13 ms per update on a 2-core CPU
    (benchmarks/README.md). Raising the mmap and trim thresholds keeps that memory in the
    process; PyTorch's CPU tuning guide gets the same effect by swapping in jemalloc or tcmalloc.
    ``num_threads=None`` keeps torch's default (one thread per physical core).
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer or None (one per core), got {num_threads!r}")
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
