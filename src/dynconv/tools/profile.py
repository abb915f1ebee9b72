"""``dynconv profile``: what a model costs, per layer and in total, beside its static twin.

For every convolution layer: parameters and analytic MACs (the per-sample convolution, the
attention branch and the kernel aggregation, :func:`dynconv.tools.cost.layer_macs`), against
the same
layer as an ``nn.Conv2d`` of the same geometry; for the whole model: parameters, MACs, the median
inference latency and the peak memory of one forward pass at each batch size, against the
static twin (:func:`dynconv.tools.convert.static_twin`). A module whose parameters several
layers hold (a KernelWarehouse ``Warehouse``) is one row of its own, counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers.factory import is_dynamic
from ..models import create_model_for_data
from .convert import static_twin
from .cost import (
    LayerMacs,
    conv_layer_macs,
    count_macs,
    count_parameters,
    inference_latency_ms,
    peak_memory_bytes,
)

__all__ = ["LayerProfile", "ProfileReport", "SharedProfile", "build_model", "profile_model"]


@dataclass
class LayerProfile:
    """One convolution layer: its parameters and MACs per image, and those of its static twin."""

    name: str
    type: str
    shape: str
    params: int
    macs: LayerMacs
    static_params: int
    static_macs: int


@dataclass
class SharedProfile:
    """A module whose parameters several convolution layers hold (a KernelWarehouse
    ``Warehouse``): counted here once, and in none of its layers' rows."""

    name: str
    type: str
    layers: list[str]
    params: int


@dataclass
class ProfileReport:
    """What :func:`profile_model` measured; ``str(report)`` is the table.

    ``latency_ms`` and ``peak_memory`` map a batch size to (model, static twin); MACs are per
    image; peak memory is in bytes (activations and temporaries of one forward pass).
    ``shared``: the modules several layers hold; each layer's ``params`` leaves them out.
    """

    input_size: tuple[int, int, int]
    device: str
    layers: list[LayerProfile]
    params: int
    static_params: int
    macs: float
    static_macs: float
    latency_ms: dict[int, tuple[float, float]] = field(default_factory=dict)
    peak_memory: dict[int, tuple[int, int]] = field(default_factory=dict)
    shared: list[SharedProfile] = field(default_factory=list)

    def __str__(self) -> str:
        header = ("layer", "type", "shape", "params", "static", "MACs", "attn+aggr", "static MACs")
        rows = [header]
        for r in self.layers:
            rows.append((r.name, r.type, r.shape, f"{r.params:,}", f"{r.static_params:,}",
                         f"{r.macs.total:,}", f"{r.macs.attention + r.macs.aggregation:,}",
                         f"{r.static_macs:,}"))
        for r in self.shared:
            rows.append((r.name, r.type, f"shared by {len(r.layers)}", f"{r.params:,}", "", "",
                         "", ""))
        layer_macs = sum(r.macs.total for r in self.layers)
        static_layer_macs = sum(r.static_macs for r in self.layers)
        counted = sum(r.params for r in self.layers) + sum(r.params for r in self.shared)
        rows.append(("other (linear, ...)", "", "", f"{self.params - counted:,}",
                     f"{self.static_params - sum(r.static_params for r in self.layers):,}",
                     f"{round(self.macs - layer_macs):,}", "",
                     f"{round(self.static_macs - static_layer_macs):,}"))
        rows.append(("total", "", "", f"{self.params:,}", f"{self.static_params:,}",
                     f"{round(self.macs):,}", "", f"{round(self.static_macs):,}"))
        lines = [f"input {'x'.join(map(str, self.input_size))} on {self.device}; MACs per image"]
        lines += _table(rows, left=3, rule_after=(0, len(rows) - 3))
        ratio = self.macs / self.static_macs if self.static_macs else float("nan")
        lines.append(f"MACs: {self.macs / 1e6:.3f} M, static twin {self.static_macs / 1e6:.3f} M "
                     f"(x{ratio:.2f}); parameters x{self.params / self.static_params:.2f}")
        if self.latency_ms or self.peak_memory:
            rows = [("batch", "latency ms", "static ms", "ratio", "peak MiB", "static MiB")]
            for b in sorted(set(self.latency_ms) | set(self.peak_memory)):
                t, ts = self.latency_ms.get(b, (float("nan"),) * 2)
                m, ms = self.peak_memory.get(b, (float("nan"),) * 2)
                rows.append((str(b), f"{t:.3f}", f"{ts:.3f}", f"x{t / ts:.2f}",
                             f"{m / 2**20:.2f}", f"{ms / 2**20:.2f}"))
            lines.append("")
            lines += _table(rows, left=0, rule_after=(0,))
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]], left: int, rule_after: Sequence[int]) -> list[str]:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < left else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))))
        if i in rule_after:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _shape(layer: nn.Module) -> str:
    kh, kw = layer.kernel_size
    s = f"{layer.in_channels}->{layer.out_channels} {kh}x{kw}"
    if tuple(layer.stride) != (1, 1):
        s += f" s{layer.stride[0]}"
    if layer.groups != 1:
        s += f" g{layer.groups}"
    if getattr(layer, "num_kernels", 1) != 1:
        s += f" K{layer.num_kernels}"
    return s


def _check_sizes(input_size: Sequence[int], batch_sizes: Sequence[int]) -> None:
    if len(input_size) != 3 or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_size
    ):
        raise ValueError(f"input_size must be (C, H, W), three ints >= 1, got {input_size!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be ints >= 1, got {list(batch_sizes)!r}")


def profile_model(
    model: nn.Module,
    input_size: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    device: str | torch.device = "cpu",
    min_run_time: float = 0.5,
    timing: bool = True,
) -> ProfileReport:
    """Profile ``model`` on random inputs of ``input_size`` (C, H, W) beside its static twin.

    Args:
        model: any model; its dynamic layers are counted analytically, the rest by
            ``FlopCounterMode`` (see :func:`dynconv.tools.cost.count_macs`).
        input_size: (C, H, W) of one image.
        batch_sizes: the batch sizes at which latency and peak memory are measured.
        device: where to run.
        min_run_time: seconds of timed runs per model and batch size (after a warm-up).
        timing: measure latency and peak memory (False: parameters and MACs only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    input_size = tuple(input_size)
    batch_sizes = list(batch_sizes)
    _check_sizes(input_size, batch_sizes)
    device = torch.device(device)
    model = model.to(device)
    twin = static_twin(model)
    one = torch.randn(1, *input_size, device=device)
    layers = conv_layer_macs(model, one)
    static_layers = conv_layer_macs(twin, one)
    shared = _shared_parameters(model, {name: layer for name, (layer, _) in layers.items()})
    rows = []
    for name, (layer, macs) in layers.items():
        static_layer, static_macs = static_layers[name]
        rows.append(LayerProfile(
            name, type(layer).__name__ + (f"({layer.routing})" if hasattr(layer, "routing")
                                          and is_dynamic(layer) else ""),
            _shape(layer), _count_unshared(layer, shared), macs,
            count_parameters(static_layer), static_macs.total))
    report = ProfileReport(input_size, str(device), rows, count_parameters(model),
                           count_parameters(twin), count_macs(model, one), count_macs(twin, one),
                           shared=list({id(s): s for s in shared.values()}.values()))
    if timing:
        for b in batch_sizes:
            x = torch.randn(b, *input_size, device=device)
            report.latency_ms[b] = (inference_latency_ms(model, x, min_run_time),
                                    inference_latency_ms(twin, x, min_run_time))
            report.peak_memory[b] = (peak_memory_bytes(model, x), peak_memory_bytes(twin, x))
    return report


def _shared_parameters(model: nn.Module, layers: dict[str, nn.Module]
                       ) -> dict[int, SharedProfile]:
    """The modules of ``model`` whose own parameters more than one of ``layers`` holds, by the
    ``id`` of each such parameter (a module under its first name, as ``named_modules`` gives)."""
    holders: dict[int, list[str]] = {}
    for name, layer in layers.items():
        for p in layer.parameters():
            holders.setdefault(id(p), []).append(name)
    found: dict[int, SharedProfile] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if len(holders.get(id(p), ())) > 1]
        if own:
            profile = SharedProfile(name, type(module).__name__, holders[id(own[0])],
                                    sum(p.numel() for p in own))
            found.update(dict.fromkeys((id(p) for p in own), profile))
    return found


def _count_unshared(layer: nn.Module, shared: dict[int, SharedProfile]) -> int:
    """``layer``'s parameters, those of the shared modules left out."""
    return sum(p.numel() for p in layer.parameters() if id(p) not in shared)


def build_model(name: str, conv_type: str | None = None, model_args: dict[str, Any] | None = None,
                input_size: Sequence[int] = (3, 32, 32)) -> nn.Module:
    """Build a model of :func:`dynconv.models.list_models` for images of ``input_size``
    (C, H, W): ``in_channels`` from C, the CIFAR stem for ResNets up to 64 pixels (unless
    ``stem`` is in ``model_args``), the model's own number of classes unless given."""
    args = dict(model_args or {})
    num_classes = args.pop("num_classes", None)
    return create_model_for_data(name, conv_type, num_classes, input_size[0],
                                 min(input_size[1:]), **args)
