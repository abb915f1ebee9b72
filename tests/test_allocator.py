"""keep_freed_memory: large blocks come from glibc's heap and stay there for the next step.

The tests read glibc's own bookkeeping (``mallinfo2``), which is exact. The effect that matters,
page faults and time per training step, depends on the kernel and the sandbox a process runs in,
so it is measured by the benchmark suite (``benchmarks/freed_memory.py``), not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dynconv.allocator import _glibc

_PLACEMENT = """
import ctypes, json, sys, torch
from dynconv import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def stats():
    info = libc.mallinfo2()
    return {"mapped": info.hblkhd, "heap": info.arena, "heap_free": info.fordblks}
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
out = {"applied": applied}
for name, size in (("bank_grad", 38 * 2**20), ("huge", 300 * 2**20)):
    before = stats()
    block = torch.empty(size, dtype=torch.uint8)
    during = stats()
    del block
    after = stats()
    out[name] = {"mapped_while_used": during["mapped"] - before["mapped"],
                 "heap_free_after": after["heap_free"],
                 "mapped_after": after["mapped"] - before["mapped"]}
# a training step's activations: 600 MB in blocks under the threshold, all freed at its end
blocks = [torch.ones(100 * 2**20, dtype=torch.uint8) for _ in range(6)]
del blocks  # freed last to first, as autograd frees them: each merges into the heap's top
out["activations"] = {"heap_free_after": stats()["heap_free"]}
print(json.dumps(out))
"""

MB = 2**20


def _placement(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PLACEMENT, mode], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_needs_mallinfo2 = pytest.mark.skipif(
    _glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="needs glibc 2.33+ (mallinfo2)")


@_needs_mallinfo2
def test_large_blocks_come_from_the_heap_and_are_kept_after_free() -> None:
    default = _placement("default")
    if default["bank_grad"]["mapped_while_used"] < 38 * MB:
        pytest.skip(f"this malloc does not map a 38 MB block for itself: nothing to show "
                    f"({default})")
    # glibc as is: the block is mapped for itself and unmapped on free (faulted in on every step)
    assert default["bank_grad"]["mapped_after"] == 0, default
    kept = _placement("keep")
    assert kept["applied"] is True, kept
    # kept: the same block comes from the heap and its memory stays there, free for the next step
    assert kept["bank_grad"]["mapped_while_used"] == 0, kept
    assert kept["bank_grad"]["heap_free_after"] >= 38 * MB, kept
    # a step's 600 MB of freed activations stay in the heap for the next step (not trimmed)
    assert kept["activations"]["heap_free_after"] >= 600 * MB, kept
    # above the 256 MB threshold blocks are still mapped and handed back
    assert kept["huge"]["mapped_while_used"] >= 300 * MB, kept
    assert kept["huge"]["mapped_after"] == 0, kept


def test_is_idempotent_and_says_whether_it_applies() -> None:
    code = ("from dynconv import keep_freed_memory as k; a = k(); b = k(); "
            "print(a, b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    expected = "True" if _glibc() is not None else "False"
    assert out == [expected, expected]


def test_freed_memory_is_kept_reads_the_environment(monkeypatch) -> None:
    from dynconv import allocator

    def kept(**env) -> bool:
        for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        allocator._started_with_reuse.cache_clear()  # read once per process otherwise
        return allocator.freed_memory_is_kept()

    monkeypatch.setattr(allocator, "_applied", False)
    try:
        assert not kept()
        assert kept(LD_PRELOAD="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
        assert kept(MALLOC_MMAP_MAX_="0")
        assert not kept(MALLOC_MMAP_THRESHOLD_=str(2**20))  # 1 MB: large blocks still mapped
        assert kept(MALLOC_MMAP_THRESHOLD_=str(2**28))
        monkeypatch.setattr(allocator, "_applied", True)
        assert kept()
    finally:
        allocator._started_with_reuse.cache_clear()
