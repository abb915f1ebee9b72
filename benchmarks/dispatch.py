"""The measurements behind the dispatch rules: every formulation forced in turn, as a time ratio
to ``nn.Conv2d`` of the same shape, with the one ``'auto'`` picks marked.

* DY-Conv (``mixture_conv2d`` without a spatial weight) and ODConv (with one): ``aggregate``
  (per-sample kernels, then ``per_sample_conv2d`` grouped or unfold) and ``mixout``.
* DRConv (``region_conv2d``): ``dense`` and ``restricted`` at the small shapes behind its rule.
* KernelWarehouse (1x, a warehouse of its own): its kernels are always assembled, then
  ``per_sample_conv2d`` ``grouped`` or ``unfold`` (the layer's ``method``).
"""

from __future__ import annotations

import torch
from common import markdown_table, median_times, step
from layers import SHAPES, Shape, path
from torch import nn

from dynconv import DRConv2d, DynamicConv2d, KWConv2d, ODConv2d

MIXTURE_VARIANTS = {  # name: (mixture method, per-sample method)
    "grouped": ("aggregate", "grouped"),
    "unfold": ("aggregate", "unfold"),
    "mixout": ("mixout", "auto"),
}
PER_SAMPLE_VARIANTS = ("grouped", "unfold")  # KernelWarehouse, by the layer's ``method``
BATCHES = [8, 32, 64]
QUICK_BATCHES = [32]
REGION_SHAPES = [  # shape, batch, regions
    (Shape("C=256 8x8", 256, 256, 3, 8), 32, 8),
    (Shape("C=32 16x16", 32, 32, 3, 16), 16, 8),
    (Shape("C=64 32x32 R=2", 64, 64, 3, 32), 16, 2),
    (Shape("C=64 32x32 R=4", 64, 64, 3, 32), 16, 4),
    (Shape("C=64 32x32 groups=4", 64, 64, 3, 32, 4), 16, 8),
    (Shape("C=64 32x32 depthwise", 64, 64, 3, 32, 64), 16, 8),
]


class _Forced(nn.Module):
    """A layer with its formulation forced (``method``; for a mixture's aggregate, also the
    per-sample method, ``per_sample``), put back to ``'auto'`` after each call."""

    def __init__(self, layer: nn.Module, method: str, per_sample: str) -> None:
        super().__init__()
        self.layer, self.method, self.per_sample = layer, method, per_sample

    def forward(self, x):
        from dynconv.functional import per_sample

        self.layer.method = self.method
        rule = per_sample._choose_per_sample_method  # what the aggregate's 'auto' asks
        if self.per_sample != "auto":
            per_sample._choose_per_sample_method = lambda *args: self.per_sample
        try:
            return self.layer(x)
        finally:
            per_sample._choose_per_sample_method = rule
            self.layer.method = "auto"


def _conv(shape, device) -> tuple[nn.Conv2d, dict]:
    """``nn.Conv2d`` of ``shape`` (seeded) and the keywords that give a layer its geometry."""
    torch.manual_seed(0)
    kw = {"padding": shape.kernel // 2, "groups": shape.groups, "bias": False, "device": device}
    return nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, **kw).eval(), kw


def mixture_rows(kind: str, shapes, batches, device, budget, rounds) -> list[list]:
    rows = []
    for shape in shapes:
        conv, kw = _conv(shape, device)
        layer_type = ODConv2d if kind == "ODConv" else DynamicConv2d
        layer = layer_type(shape.c_in, shape.c_out, shape.kernel, **kw, num_kernels=4).eval()
        variants = {"conv": conv}
        variants.update({name: _Forced(layer, *how) for name, how in MIXTURE_VARIANTS.items()})
        for batch in batches:
            for backward in (False, True):
                x = torch.randn(batch, shape.c_in, shape.size, shape.size, device=device)
                x.requires_grad_(backward)
                steps = {name: step(m, x, backward) for name, m in variants.items()}
                t = median_times(steps, device, budget, rounds)
                auto = path(kind, layer, x, backward).split()[0]
                rows.append([shape.name, batch, "f+b" if backward else "fwd",
                             f"{t['conv'] * 1e3:.2f}"]
                            + [f"{t[v] / t['conv']:.2f}" + (" *" if v == auto else "")
                               for v in MIXTURE_VARIANTS])
        print(f"  {kind} {shape.name} done", flush=True)
    return rows


def kw_rows(shapes, batches, device, budget, rounds) -> list[list]:
    rows = []
    for shape in shapes:
        conv, kw = _conv(shape, device)
        layer = KWConv2d(shape.c_in, shape.c_out, shape.kernel, **kw).eval()
        for batch in batches:
            for backward in (False, True):
                x = torch.randn(batch, shape.c_in, shape.size, shape.size, device=device)
                x.requires_grad_(backward)
                steps = {"conv": step(conv, x, backward)}
                steps.update({v: step(_Forced(layer, v, "auto"), x, backward)
                              for v in PER_SAMPLE_VARIANTS})
                t = median_times(steps, device, budget, rounds)
                auto = path("KW", layer, x, backward)
                rows.append([shape.name, batch, "f+b" if backward else "fwd",
                             f"{t['conv'] * 1e3:.2f}"]
                            + [f"{t[v] / t['conv']:.2f}" + (" *" if v == auto else "")
                               for v in PER_SAMPLE_VARIANTS])
        print(f"  KW {shape.name} done", flush=True)
    return rows


def region_rows(device, budget, rounds) -> list[list]:
    rows = []
    for shape, batch, regions in REGION_SHAPES:
        torch.manual_seed(0)
        layer = DRConv2d(shape.c_in, shape.c_out, 3, padding=1, groups=shape.groups,
                         num_regions=regions, device=device).eval()
        conv = nn.Conv2d(shape.c_in, shape.c_out, 3, padding=1, groups=shape.groups,
                         bias=False, device=device).eval()
        for backward in (False, True):
            x = torch.randn(batch, shape.c_in, shape.size, shape.size, device=device)
            x.requires_grad_(backward)
            steps = {"conv": step(conv, x, backward),
                     "dense": step(_Forced(layer, "dense", "auto"), x, backward),
                     "restricted": step(_Forced(layer, "restricted", "auto"), x, backward)}
            t = median_times(steps, device, budget, rounds)
            auto = path("DRConv", layer, x, backward)
            rows.append([shape.name, batch, regions, "f+b" if backward else "fwd",
                         f"{t['conv'] * 1e3:.2f}"]
                        + [f"{t[v] / t['conv']:.2f}" + (" *" if v == auto else "")
                           for v in ("dense", "restricted")])
    return rows


def run(device: torch.device, quick: bool, budget: float, rounds) -> str:
    shapes = [s for s in SHAPES if s.groups == 1]
    if quick:
        shapes = [SHAPES[1], SHAPES[2], SHAPES[3]]
    batches = QUICK_BATCHES if quick else BATCHES
    header = ["shape", "N", "pass", "conv ms", *MIXTURE_VARIANTS]
    out = []
    for kind in ("DY-Conv", "ODConv"):
        rows = mixture_rows(kind, shapes, batches, device, budget, rounds)
        out.append(f"### {kind}: x conv per formulation (* = auto)\n\n"
                   + markdown_table(header, rows))
    header = ["shape", "N", "pass", "conv ms", *PER_SAMPLE_VARIANTS]
    out.append("### KW: x conv per formulation (* = auto)\n\n"
               + markdown_table(header, kw_rows(shapes, batches, device, budget, rounds)))
    if not quick:
        header = ["shape", "N", "R", "pass", "conv ms", "dense", "restricted"]
        out.append("### DRConv: x conv per formulation (* = auto)\n\n"
                   + markdown_table(header, region_rows(device, budget, rounds)))
    return "\n\n".join(out)
