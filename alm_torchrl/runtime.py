"""Runtime set-up for ALM's update: torch's threads, glibc's malloc, whether torch.compile works, and a marked
workaround for tensordict."""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
import torch._dynamo
from tensordict import is_tensor_collection, TensorDictBase

__all__ = ["configure_cpu_runtime", "skip_pandas_lookup_in_tensordict_from_any", "torch_compile_failure"]


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
