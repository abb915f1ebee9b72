"""keep_freed_memory: a training step stops page-faulting its large gradients in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dynconv.allocator import _glibc

_STEP_FAULTS = """
import json, resource, sys, torch
from dynconv import DynamicConv2d, keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
layer = DynamicConv2d(512, 512, 3, padding=1, num_kernels=4)  # a 38 MB kernel bank
x = torch.randn(2, 512, 4, 4)
def step():
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()
for _ in range(3):
    step()
per_step = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median: now and then the heap's layout makes one step fault a block in again
faults = sorted(per_step)[2]
print(json.dumps({"applied": applied, "faults": faults, "pages": layer.kernels.numel() // 1024}))
"""


def _faults_per_step(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's malloc")
def test_steps_stop_faulting_in_the_bank_gradient() -> None:
    default = _faults_per_step("default")
    if default["faults"] < default["pages"] / 2:
        pytest.skip("this allocator already reuses the gradient's memory: nothing to show")
    kept = _faults_per_step("keep")
    assert kept["applied"] is True
    # default: the 38 MB bank gradient is mapped afresh every step (about one fault per page)
    assert kept["faults"] < 0.05 * kept["pages"], (default, kept)


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
