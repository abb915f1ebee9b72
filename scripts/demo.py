"""Build each layer, check it against the plain per-sample reference, and print a table.

This is what `make demo` runs until the main job (`dynconv compare`) exists.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import dynconv
from dynconv.testing import reference_drconv2d, reference_dynamic_conv2d

F64 = torch.float64


def _max_error(layer: nn.Module, reference, x: torch.Tensor) -> tuple[float, float]:
    """Largest |difference| of the output and of every gradient, in float64."""
    x = x.clone().requires_grad_()
    upstream = None
    results = []
    for fn in (layer, lambda t: reference(layer, t)):
        layer.zero_grad()
        x.grad = None
        out = fn(x)
        upstream = torch.randn_like(out) if upstream is None else upstream
        (out * upstream).sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    grad_error = max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b))
    return (out_a - out_b).abs().max().item(), grad_error


def _median_ms(fn, x: torch.Tensor, repeats: int = 20) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    cases = [
        ("DY-Conv", dict(routing="softmax"), dict()),
        ("CondConv", dict(routing="sigmoid"), dict()),
        ("DY-Conv depthwise", dict(routing="softmax"), dict(groups=32)),
        ("DY-Conv 'same', reflect", dict(routing="softmax"),
         dict(padding="same", padding_mode="reflect")),
    ]
    header = (f"{'layer':<26}{'out err':>10}{'grad err':>10}{'params':>10}{'x conv':>8}"
              f"{'fwd ms':>9}{'x conv':>8}")
    print("Each layer against one F.conv2d per sample (float64, batch 4, 32 ch, 16x16, K=4;")
    print("DRConv: per pixel, batch 2, 9x8, R=8);")
    print("timing: float32, batch 32, median of 20 runs, no grad.\n")
    print(header)
    print("-" * len(header))
    for name, layer_kwargs, conv_kwargs in cases:
        conv_kwargs = {"padding": 1, **conv_kwargs}
        layer = dynconv.DynamicConv2d(32, 32, 3, **conv_kwargs, **layer_kwargs, num_kernels=4)
        static = nn.Conv2d(32, 32, 3, **conv_kwargs)
        out_err, grad_err = _max_error(layer.double(), reference_dynamic_conv2d,
                                       torch.randn(4, 32, 16, 16, dtype=F64))
        layer.float()
        x = torch.randn(32, 32, 16, 16)
        ms, ms_static = _median_ms(layer, x), _median_ms(static, x)
        params = sum(p.numel() for p in layer.parameters())
        static_params = sum(p.numel() for p in static.parameters())
        print(f"{name:<26}{out_err:>10.1e}{grad_err:>10.1e}{params:>10,}"
              f"{params / static_params:>8.2f}{ms:>9.2f}{ms / ms_static:>8.2f}")
        assert out_err < 1e-10 and grad_err < 1e-10, f"{name} does not match the reference"
    _drconv_rows()
    print("\nAll layers match the reference.")


def _drconv_rows() -> None:
    """DRConv2d (R = 8 regions) against one F.conv2d per pixel; same columns as above."""
    cases = [
        ("DRConv", {}),
        ("DRConv grouped, stride 2", {"groups": 4, "stride": 2}),
        ("DRConv 'same', reflect", {"padding": "same", "padding_mode": "reflect"}),
    ]
    for name, kwargs in cases:
        conv_kwargs = {"padding": 1, **kwargs}
        layer = dynconv.DRConv2d(32, 32, 3, **conv_kwargs, num_regions=8)
        static = nn.Conv2d(32, 32, 3, **conv_kwargs)
        # the per-pixel reference is slow: check on a smaller map
        out_err, grad_err = _max_error(layer.double(), reference_drconv2d,
                                       torch.randn(2, 32, 9, 8, dtype=F64))
        layer.float()
        x = torch.randn(32, 32, 16, 16)
        ms, ms_static = _median_ms(layer, x), _median_ms(static, x)
        params = sum(p.numel() for p in layer.parameters())
        static_params = sum(p.numel() for p in static.parameters())
        print(f"{name:<26}{out_err:>10.1e}{grad_err:>10.1e}{params:>10,}"
              f"{params / static_params:>8.2f}{ms:>9.2f}{ms / ms_static:>8.2f}")
        assert out_err < 1e-10 and grad_err < 1e-10, f"{name} does not match the reference"


if __name__ == "__main__":
    main()
