"""Keeping freed memory in the process: glibc malloc settings for CPU training.

A training step allocates and frees the same large activation and gradient buffers every step. With glibc's
defaults, blocks above the (at most 32 MiB) mmap threshold get a fresh `mmap` each time and a free heap top is
trimmed, so every step faults the same hundreds of MiB of pages in again: on deit_small at batch 32 the DIDB
step took 190,000 page faults and a second of system time. PyTorch's CPU tuning guide suggests swapping in
jemalloc or tcmalloc for the same reason; `retain_freed_memory` gets the effect with the malloc already loaded.
Memory is held at the step's peak rather than returned between steps; the peak itself does not change.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def retain_freed_memory() -> bool:
    """Serve every allocation from the one main heap and never trim it, so freed blocks are reused without page
    faults. One arena: a thread's own arena cannot grow past 64 MiB and falls back to mmap for larger blocks (at
    2 threads the DeiT-S DIDB step still took 66,000 page faults with several arenas, 3 with one).

    Returns whether the settings took effect: False where the C library is not glibc (macOS, musl), which is
    left unchanged. Call it early: arenas that threads have already created stay.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(option, value) == 1 for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_ARENA_MAX, 1)))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc malloc_trim), e.g. after a packed model was built
    from a float one, so the process's resident memory shows what the model holds rather than what building it
    took. Returns False where the C library is not glibc."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(malloc_trim(0))


def _glibc(function: str) -> ctypes._CFuncPtr | None:
    """A glibc function, or None where the C library is not glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        return None
