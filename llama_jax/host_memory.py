"""Host memory: let glibc's malloc keep freed memory for reuse, so that CPU steps stop page-faulting.

XLA:CPU allocates a step's temporary buffers when the step starts and frees them when it ends: one block of about
1 GB for stories15M's training step. glibc serves blocks that large with a fresh mmap and hands them back with
munmap, so every step faults the whole block in again, page by page, in kernel time that was a large share of a
small model's step (measured in docs/benchmarks-log.md). PyTorch's CPU allocator goes through the same malloc and
pays the same way.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def glibc():
    """The C library if it is glibc (whose mallopt settings this module uses), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl, for one, has no such function


def keep_freed_memory() -> bool:
    """Make malloc serve every allocation from the main heap and keep freed memory there, so that buffers freed by
    one step are reused by the next without page faults. Process-wide and not undone; call it once, early,
    before the first JAX computation (a thread picks its malloc arena at its first allocation, and only the main
    arena grows in place). The cost: the process keeps the heap at its peak size until it exits. Returns False,
    changing nothing, where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # One arena: other arenas cannot grow past 64 MB and fall back to mmap for large blocks. No mmap at all, and
    # a trim threshold of -1 (read as SIZE_MAX): freed memory is never handed back, so it stays mapped for reuse.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def release_freed_memory() -> None:
    """Hands the free memory inside malloc's heap back to the system (glibc's malloc_trim). With
    keep_freed_memory the heap otherwise stays at the largest it has ever been, and buffers of another shape (a
    checkpoint being read, a validation pass between training steps) leave holes that later steps do not fill:
    a LoRA run of SmolLM2-135M grew to 17.7 GB by its twelfth step. Called between phases, never per step: the
    next step faults in what it needs again, once."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised host array whose data starts on a 64-byte boundary. `jax.device_put` of such an array on
    the CPU aliases it instead of copying (XLA:CPU's alignment for host buffers; numpy's own allocations are
    16-byte aligned), so a checkpoint loader can fill a parameter in place and hand it to JAX without holding it
    twice."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)
