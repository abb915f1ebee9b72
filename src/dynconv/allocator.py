"""Keep freed CPU memory for reuse instead of handing it back to the OS after every step.

glibc's ``malloc`` serves every block above 32 MB with a fresh ``mmap`` and unmaps it on
``free``, so a training loop that allocates the same large tensors every step (a kernel bank's
gradient is K times a static kernel's: 38 MB for K = 4, 512 -> 512, 3x3) page-faults them in
again each time: a 38 MB gradient costs about 12 ms of page faults on the 2-core machine of
docs/performance.md, more than the convolution it belongs to. PyTorch's tuning guide suggests
preloading jemalloc or tcmalloc; :func:`keep_freed_memory` gets the same reuse from glibc itself
(``mallopt``): blocks of up to 256 MB come from the heap and are reused, larger ones are still
mapped per block and returned, and the heap keeps up to 2 GB of free memory at its top (a
training step frees its activations at the end and needs them again at once: a ResNet-18 step
with DY-Conv at batch 64 grows the heap by 576 MB, which a 512 MB threshold trimmed and
page-faulted in again every step).

It changes the whole process (every library's allocations), so it is never called on import:
dynconv's own commands (``python -m dynconv train|compare``, the benchmark suite) call it.
The dispatch rules of :mod:`dynconv.functional` ask :func:`freed_memory_is_kept`: whether a
tensor of the batch's per-sample kernels costs its page faults on every call decides between
formulations on small maps.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused; larger ones are still mapped per
# block and returned when freed, so that a few huge tensors (DRConv's kernels at a large batch:
# GBs) cannot leave the heap fragmented and the process holding their memory.
_MMAP_THRESHOLD_BYTES = 256 * 2**20
# Free memory above this at the heap's top is returned: the largest value mallopt takes (an int)
_TRIM_THRESHOLD_BYTES = 2**31 - 2**20

_applied = False
_REUSING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # another C library (musl): its mallopt does nothing
    return libc


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks of up to 256 MB (served from the heap, not mapped
    per block; the heap trimmed only above 2 GB free). Idempotent; returns whether it is in
    effect (``False`` off glibc, or where glibc refuses a threshold that high)."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
    ok = ok and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    _applied = ok
    return ok


def freed_memory_is_kept() -> bool:
    """Whether large freed blocks are reused: :func:`keep_freed_memory` was applied, glibc's
    ``MALLOC_MMAP_MAX_=0`` or ``MALLOC_MMAP_THRESHOLD_`` is set, or jemalloc, tcmalloc or
    mimalloc is preloaded. Asked by the dispatch rules on every call."""
    return _applied or _started_with_reuse()


@functools.cache
def _started_with_reuse() -> bool:
    """The environment's part, read once: glibc and the loader read it at process start."""
    if os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return True
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    if threshold.isdigit() and int(threshold) >= _MMAP_THRESHOLD_BYTES:
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return any(name in preload for name in _REUSING_ALLOCATORS)
