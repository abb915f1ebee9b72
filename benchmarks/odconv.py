"""ODConv2d against nn.Conv2d and the seeds' formulation: time ratios at a few ResNet shapes.

Run: ``PYTHONPATH=src python benchmarks/odconv.py [--device cuda]`` (under a minute on
2 idle CPU cores).

Every cell is a median time divided by ``nn.Conv2d`` of the same shape, measured in the same
process with the runs interleaved. "seed-style" is the formulation of the seeds and the official
code: the [N, K, C_out, C_in/g, k, k] tensor of attention-weighted kernels is built, summed over
K, then run as one convolution with groups = N. It shares ODConv2d's attention, so the two
differ only in how the per-sample convolution is computed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from dynconv import ODConv2d
from dynconv._conv_args import parse_geometry
from dynconv.functional import _choose_mixture_method

SHAPES = [(64, 32), (256, 8), (512, 4)]  # (channels, height = width), 3x3 convs, padding 1
BATCHES = [8, 32]


def seed_style_forward(layer: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    """The seeds' ODConv forward (zero padding, no bias), on ``layer``'s parameters."""
    att = layer.attentions(x)
    n, _, h, w = x.shape
    k = layer.num_kernels
    x = x * att.channel.reshape(n, -1, 1, 1)
    spatial = att.spatial.reshape(n, 1, 1, 1, *layer.kernel_size)
    kernel = att.kernel.reshape(n, k, 1, 1, 1, 1)
    weight = (spatial * kernel * layer.kernels.unsqueeze(0)).sum(dim=1)
    out = F.conv2d(x.reshape(1, -1, h, w), weight.reshape(-1, *weight.shape[2:]), None,
                   layer.stride, layer.padding, layer.dilation, layer.groups * n)
    return out.reshape(n, layer.out_channels, *out.shape[-2:]) * att.filter.reshape(n, -1, 1, 1)


def _time(fn, backward: bool) -> float:
    _sync()
    start = time.perf_counter()
    if backward:
        fn().sum().backward()
    else:
        with torch.no_grad():
            fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fns: dict, backward: bool, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each function, interleaved, within about ``budget_s``."""
    for fn in fns.values():  # warm-up
        _time(fn, backward)
    times = {name: [_time(fn, backward)] for name, fn in fns.items()}
    first = sum(t[0] for t in times.values())
    repeats = max(3, min(15, int(budget_s / max(first, 1e-6))))
    for _ in range(repeats - 1):
        for name, fn in fns.items():
            times[name].append(_time(fn, backward))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.3,
                        help="seconds of measurement per table cell (default 0.3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    print(f"ODConv2d, K = 4, 3x3, float32, {where}; ratio to nn.Conv2d of the same shape "
          "(lower is better)\n")
    header = (f"{'shape':<14}{'N':>4}  {'mode':<9}{'conv ms':>9}{'ODConv2d':>10}{'seed-style':>12}"
              f"{'seed/ours':>11}  path")
    print(header)
    print("-" * len(header))
    for channels, size in SHAPES:
        layer = ODConv2d(channels, channels, 3, padding=1, num_kernels=4, device=device)
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=device)
        for batch in BATCHES:
            x = torch.randn(batch, channels, size, size, device=device)
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                x.requires_grad_(backward)
                path = _choose_mixture_method(x, layer.kernels, parse_geometry(3, 1, 1, 1, 1))
                fns = {
                    "conv": lambda x=x, conv=conv: conv(x),
                    "ours": lambda x=x, layer=layer: layer(x),
                    "seed": lambda x=x, layer=layer: seed_style_forward(layer, x),
                }
                t = measure(fns, backward, args.budget)
                print(f"C={channels} {size}x{size}".ljust(14) + f"{batch:>4}  {mode:<9}"
                      f"{t['conv'] * 1e3:>9.2f}{t['ours'] / t['conv']:>10.2f}"
                      f"{t['seed'] / t['conv']:>12.2f}{t['seed'] / t['ours']:>11.2f}  {path}")


if __name__ == "__main__":
    main()
