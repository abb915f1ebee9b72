"""DRConv2d: time and peak memory of each formulation, against the seed's and nn.Conv2d.

Every variant is a whole layer of the same shape (C_in = C_out = C, 3x3, padding 1, R regions),
float32, measured in one process:

* ``nn.Conv2d``: a static convolution of the same shape;
* ``seed``: seed 003's formulation, written here on the DRConv2d's own parameters: its kernel
  generator run as modules, every region's output at full resolution by one grouped convolution,
  a one-hot mask multiplied in and summed over R, and the seed's backward (which keeps that
  R-fold output for the guide);
* ``dense`` / ``restricted``: ``DRConv2d`` with ``region_conv2d(method=...)`` (see
  docs/performance.md); ``auto`` is whichever the dispatch rule picks.

Times are medians of interleaved rounds (the machine is shared: read them to about +-15%). Peak
memory is the largest total of CPU allocations made during one call (torch profiler memory
events), the inputs and parameters excluded.

    PYTHONPATH=src python benchmarks/drconv.py               # the ResNet- and YOLO-like shapes
    PYTHONPATH=src python benchmarks/drconv.py --dispatch    # small shapes behind the auto rule
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from dynconv import DRConv2d
from dynconv.functional import _choose_region_method

# name, batch, channels, size, regions, groups
SHAPES = [
    ("ResNet-like", 32, 64, 32, 8, 1),
    ("YOLO-like", 8, 128, 80, 8, 1),
]
DISPATCH_SHAPES = [
    ("C=256, 8x8", 32, 256, 8, 8, 1),
    ("C=32, 16x16", 16, 32, 16, 8, 1),
    ("R=2", 16, 64, 32, 2, 1),
    ("R=4", 16, 64, 32, 4, 1),
    ("groups=4", 16, 64, 32, 8, 4),
    ("depthwise", 16, 64, 32, 8, 64),
]


class SeedAssign(torch.autograd.Function):
    """Seed 003's region assignment: a one-hot mask multiplied in and summed over R; backward
    masks the gradient and passes the guide a softmax gradient from the kept R-fold output."""

    @staticmethod
    def forward(ctx, outputs: Tensor, guide: Tensor) -> Tensor:
        ctx.save_for_backward(outputs, guide)
        mask = torch.zeros_like(guide).scatter_(1, guide.argmax(1, keepdim=True), 1.0)
        return (outputs * mask.unsqueeze(2)).sum(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        outputs, guide = ctx.saved_tensors
        mask = torch.zeros_like(guide).scatter_(1, guide.argmax(1, keepdim=True), 1.0)
        grad_outputs = grad.unsqueeze(1) * mask.unsqueeze(2)
        scores = (grad.unsqueeze(1) * outputs).sum(2)
        s = guide.softmax(1)
        return grad_outputs, s * (scores - (s * scores).sum(1, keepdim=True))


def seed_forward(layer: DRConv2d, x: Tensor) -> Tensor:
    """The seed's convolution and assignment, on the layer's own kernels and guide."""
    n, c, h, w = x.shape
    kernels = layer.conv_kernel(x)  # [N, R * C_out * C_in, k, k]
    stacked = kernels.reshape(-1, c, *layer.kernel_size)
    out = F.conv2d(x.reshape(1, n * c, h, w), stacked, None, layer.stride, layer.padding,
                   layer.dilation, n)
    out = out.reshape(n, layer.num_regions, layer.out_channels, out.shape[-2], out.shape[-1])
    guide = F.conv2d(x, layer.conv_guide.weight, layer.conv_guide.bias, layer.stride,
                     layer.padding, layer.dilation)
    return SeedAssign.apply(out, guide)


def _variants(channels: int, regions: int, groups: int):
    """The layer, the static convolution, and every variant as a function of the input."""
    torch.manual_seed(0)
    layer = DRConv2d(channels, channels, 3, padding=1, groups=groups, num_regions=regions)
    with torch.no_grad():
        layer.conv_guide.weight.normal_(0, 0.1)  # a guide that splits the map into regions
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)

    def with_method(method: str) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            layer.method = method
            return layer(x)

        return run

    variants: dict[str, Callable[[Tensor], Tensor]] = {"nn.Conv2d": conv}
    if groups == 1:  # the seed has no groups
        variants["seed"] = lambda x: seed_forward(layer, x)
    variants["dense"] = with_method("dense")
    variants["restricted"] = with_method("restricted")
    return layer, conv, variants


def _step(fn: Callable[[Tensor], Tensor], x: Tensor, backward: bool) -> None:
    if not backward:
        with torch.no_grad():
            fn(x)
        return
    out = fn(x)
    out.backward(torch.ones_like(out))


def _peak_megabytes(fn: Callable[[], None]) -> float:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak / 2**20


def measure(shape, rounds: int) -> list[tuple]:
    """Median ms and peak MB of every variant, forward and forward+backward."""
    name, batch, channels, size, regions, groups = shape
    layer, conv, variants = _variants(channels, regions, groups)
    x = torch.randn(batch, channels, size, size, requires_grad=True)

    def clear_grads() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        conv.zero_grad(set_to_none=True)

    with torch.no_grad():
        auto = _choose_region_method(layer.region_kernels(x), layer._geometry, size * size)
    rows = []
    for backward in (False, True):
        for fn in variants.values():  # warm up
            _step(fn, x, backward)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for key, fn in variants.items():
                clear_grads()
                start = time.perf_counter()
                _step(fn, x, backward)
                times[key].append(time.perf_counter() - start)
        memory = {}
        for key, fn in variants.items():
            clear_grads()
            memory[key] = _peak_megabytes(lambda fn=fn, b=backward: _step(fn, x, b))
        medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append((name, batch, channels, size, regions, groups, backward, medians, memory,
                     auto))
    return rows


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:>8.2f}" if b else f"{'-':>8}"


def _print_table(rows: list[tuple]) -> None:
    header = (f"{'shape':<14}{'N':>4}{'C':>5}{'HxW':>7}{'R':>3}{'g':>4} {'pass':<9}{'variant':<12}"
              f"{'ms':>9}{'x seed':>8}{'x conv':>8}{'peak MB':>9}{'x seed':>8}{'x conv':>8}")
    print(header)
    print("-" * len(header))
    for name, n, c, size, r, g, backward, medians, memory, auto in rows:
        seed_ms, seed_mb = medians.get("seed"), memory.get("seed")
        conv_ms, conv_mb = medians["nn.Conv2d"], memory["nn.Conv2d"]
        for key in medians:
            mark = " <- auto" if key == auto else ""
            print(f"{name:<14}{n:>4}{c:>5}{f'{size}x{size}':>7}{r:>3}{g:>4} "
                  f"{'fwd+bwd' if backward else 'fwd':<9}{key:<12}{medians[key]:>9.1f}"
                  f"{_ratio(medians[key], seed_ms)}{_ratio(medians[key], conv_ms)}"
                  f"{memory[key]:>9.1f}{_ratio(memory[key], seed_mb)}"
                  f"{_ratio(memory[key], conv_mb)}{mark}")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--dispatch", action="store_true", help="the small shapes instead")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(min(args.threads, torch.get_num_threads()))
    print(f"DRConv2d, float32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"median of {args.rounds} interleaved rounds\n")
    rows = []
    for shape in DISPATCH_SHAPES if args.dispatch else SHAPES:
        rows += measure(shape, args.rounds)
    _print_table(rows)


if __name__ == "__main__":
    main()
