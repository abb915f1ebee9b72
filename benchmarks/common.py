"""What every table of the benchmark suite shares: interleaved timing, peak memory, the seeds'
layers, and printing.

Times are medians of rounds in which every variant of a table cell runs once, in turn, so that
a load from other processes hits them alike; ratios are taken within the cell. Peak memory is
:func:`dynconv.tools.cost.peak_bytes_of` of one call.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dynconv.models import create_model
from dynconv.tools.cost import peak_bytes_of

# The seeds' formulations live with the tests (tests/seed_layouts.py, and the official
# KernelWarehouse code's in tests/kw_reference.py); one copy is enough.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kw_reference import RefManager

from seed_layouts import OfficialODConv2d, SeedDRConv2d, SeedDynamicConv2d

__all__ = [
    "OfficialKWConv2d",
    "OfficialODConv2d",
    "SeedDRConv2d",
    "SeedDynamicConv2d",
    "Step",
    "build_resnet",
    "markdown_table",
    "median_times",
    "peak_megabytes",
    "step",
    "sync",
]

Step = Callable[[], None]


class OfficialKWConv2d(nn.Module):
    """The official KernelWarehouse formulation (tests/kw_reference.py: the kernels assembled by
    one matrix product, one convolution with the batch folded into the groups) for one layer
    with a warehouse of its own; its manager is a child, so that ``.to()`` moves the cells."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 groups: int = 1, cell_num_ratio: float = 1) -> None:
        super().__init__()
        self.manager = RefManager(cell_num_ratio=cell_num_ratio)
        self.layer = self.manager.reserve("w", in_channels, out_channels, kernel_size,
                                          padding=padding, groups=groups)
        self.manager.store()
        self.manager.allocate(nn.Sequential(self.layer))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def build_resnet(resnet: Callable[..., nn.Module], conv_type: str, **kwargs: object
                 ) -> nn.Module:
    """``resnet(conv_type, **kwargs)`` (a ResNet of :mod:`dynconv.models`), seeded; ``'kw'``:
    the official KernelWarehouse model of that depth at 1x (``kw_resnet18``, ``kw_resnet50``:
    one warehouse per stage, the official layers static)."""
    torch.manual_seed(0)
    if conv_type != "kw":
        return resnet(conv_type, **kwargs)
    return create_model(f"kw_{resnet.__name__}", width="1x", **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(module: nn.Module | Callable[[Tensor], Tensor], x: Tensor, backward: bool) -> Step:
    """One forward (without gradients) or forward+backward of ``module`` on ``x``, as a
    callable; parameter gradients are dropped before each call, as ``zero_grad`` does."""
    params = list(module.parameters()) if isinstance(module, nn.Module) else []

    def drop_grads() -> None:
        for p in params:
            p.grad = None
        x.grad = None

    def run() -> None:
        if not backward:
            with torch.no_grad():
                module(x)
            return
        drop_grads()
        out = module(x)
        out.backward(torch.ones_like(out))

    run.drop_grads = drop_grads  # see peak_megabytes
    return run


def median_times(
    steps: dict[str, Step],
    device: torch.device,
    budget_s: float,
    rounds: tuple[int, int],
    warm_up: bool = True,
) -> dict[str, float]:
    """Median seconds per call of every step, interleaved: one warm-up call each (unless the
    caller made one), then ``rounds[0]`` to ``rounds[1]`` rounds, as many as fit in about
    ``budget_s``."""
    def timed(fn: Step) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    if warm_up:
        for fn in steps.values():
            fn()
    times = {name: [timed(fn)] for name, fn in steps.items()}
    first = sum(t[0] for t in times.values())
    count = max(rounds[0], min(rounds[1], int(budget_s / max(first, 1e-9))))
    for _ in range(count - 1):
        for name, fn in steps.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_megabytes(fn: Step, device: torch.device) -> float:
    """Peak MB allocated during one call of ``fn`` (inputs and parameters excluded, parameter
    gradients included). The gradients an earlier call left are dropped first (``fn.drop_grads``
    where the step has one): a step that drops them itself would otherwise count their memory
    as freed and report its peak that much too low."""
    drop_grads = getattr(fn, "drop_grads", None)
    if drop_grads is not None:
        drop_grads()
    return peak_bytes_of(fn, device) / 2**20


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (floats with 2 decimals)."""
    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    """The machine in words: CPU model and threads, or the GPU; and torch's version."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        import platform

        where = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"
