"""Fold a trained dynamic model into static convolutions for deployment.

Each dynamic layer becomes the ``nn.Conv2d`` whose kernel (and bias) is the mean of the layer's
per-sample effective kernel over calibration data: the attention is computed from the real
activations that reach the layer (forward pre-hooks on passes over the calibration batches, in
eval mode), never from noise. The effective kernels are averaged, not the attentions: the
output is linear in the kernel, so the mean kernel is the one static kernel closest (least
squares) to what the layer applied to the calibration samples, while a kernel built from
averaged attentions (ODConv multiplies four of them) is one that no sample used.

The fold is exact where the attention does not vary over the inputs; the report gives, per
layer, how much the effective kernel varies over the calibration samples and flags the layers
where a static kernel is a poor approximation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .convert import dynamic_layer_names, replace_module, static_conv_like
from .cost import inference_latency_ms
from .rules import RuleTable

__all__ = ["FoldReport", "FoldedLayer", "effective_kernels", "fold", "register_fold_rule"]

KernelRule = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor | None]]
_RULES = RuleTable("effective_kernels")


def register_fold_rule(layer_type: type, rule: KernelRule) -> None:
    """Fold layers of ``layer_type`` with ``rule(layer, x)`` -> (weight [N, C_out, C_in/groups,
    kH, kW], bias [N, C_out] or None), the per-sample effective kernels for input ``x``: for a
    foreign layer type; a dynamic layer type gives its own
    (:meth:`~dynconv.DynamicConvBase.effective_kernels`)."""
    _RULES.register(layer_type, rule)


def effective_kernels(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The kernel [N, C_out, C_in/groups, kH, kW] and bias [N, C_out] (or None) that ``layer``
    applies to each sample of ``x`` [N, C_in, H, W]: ``layer(x)[n]`` equals
    ``F.conv2d(x[n], weight[n], bias[n], ...)`` with the layer's geometry."""
    rule = _RULES.lookup(layer)
    if rule is None:
        raise TypeError(f"no fold rule for {type(layer).__name__} (see register_fold_rule)")
    return rule(layer, x)


@dataclass
class FoldedLayer:
    """One dynamic layer: its folded kernel's fit to the calibration samples.

    ``spread``: ``sqrt(mean_n ||W_n - W_mean||^2) / ||W_mean||``, the relative root-mean-square
    distance of the per-sample effective kernels from their mean (0: constant attention, the
    fold is exact). ``flagged``: spread above the fold's tolerance. ``skipped``: why the layer
    was left dynamic (None if folded).
    """

    name: str
    type: str
    samples: int = 0
    spread: float = float("nan")
    flagged: bool = False
    skipped: str | None = None


@dataclass
class FoldReport:
    """What :func:`fold` did; ``str(report)`` is a table. ``model`` is the folded model."""

    model: nn.Module
    layers: list[FoldedLayer]
    tolerance: float
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    latency_ms: tuple[float, float] | None = None  # (dynamic, folded) at the calibration batch
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        return None if self.latency_ms is None else self.latency_ms[0] / self.latency_ms[1]

    def __str__(self) -> str:
        width = max([len("layer"), *(len(r.name) for r in self.layers)])
        lines = [f"{'layer'.ljust(width)}  {'type':<14}  samples  spread  ",
                 f"{'-' * width}  {'-' * 14}  -------  ------"]
        for r in self.layers:
            if r.skipped:
                lines.append(f"{r.name.ljust(width)}  {r.type:<14}  skipped: {r.skipped}")
                continue
            flag = "  poor approximation" if r.flagged else ""
            lines.append(f"{r.name.ljust(width)}  {r.type:<14}  {r.samples:>7}  {r.spread:6.3f}"
                         f"{flag}")
        flagged = sum(r.flagged for r in self.layers)
        folded = sum(r.skipped is None for r in self.layers)
        lines.append(f"folded {folded} of {len(self.layers)} dynamic layers; {flagged} with a "
                     f"spread above {self.tolerance:g}")
        if self.accuracy_before is not None:
            lines.append(f"accuracy: dynamic {100 * self.accuracy_before:.2f}%, folded "
                         f"{100 * self.accuracy_after:.2f}%")
        if self.latency_ms is not None:
            lines.append(f"latency: dynamic {self.latency_ms[0]:.3f} ms, folded "
                         f"{self.latency_ms[1]:.3f} ms (speed-up x{self.speedup:.2f})")
        lines += self.notes
        return "\n".join(lines)


class _Accumulator:
    """Running float64 sums of the effective kernels of one layer."""

    def __init__(self) -> None:
        self.count = 0
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.squares = 0.0

    def add(self, weight: Tensor, bias: Tensor | None) -> None:
        w = weight.detach().double()
        self.count += w.shape[0]
        self.squares += w.square().sum().item()
        total = w.sum(0)
        self.weight = total if self.weight is None else self.weight + total
        if bias is not None:
            b = bias.detach().double().sum(0)
            self.bias = b if self.bias is None else self.bias + b

    def spread(self) -> float:
        mean = self.weight / self.count
        norm2 = mean.square().sum().item()
        variance = max(0.0, self.squares / self.count - norm2)
        return (variance / norm2) ** 0.5 if norm2 > 0 else float("inf")


def _batches(data: Tensor | Iterable) -> Iterable[Tensor]:
    """The images of ``data``: a tensor [N, C, H, W], or an iterable of tensors or of
    (images, labels) pairs."""
    if isinstance(data, Tensor):
        yield data
        return
    for item in data:
        images = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(images, Tensor):
            raise TypeError(
                f"calibration data must hold tensors [N, C, H, W] or (images, labels) pairs, "
                f"got {type(images).__name__}"
            )
        yield images


def _labelled(data: tuple[Tensor, Tensor] | Iterable) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, Tensor) for t in data
    ):
        yield data[0], data[1]
        return
    for item in data:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"evaluation data must be (images, labels) pairs, got {item!r:.60}")
        yield item[0], item[1]


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor] | Iterable) -> float:
    """Top-1 accuracy of ``model`` in eval mode on (images, labels) pairs (or one pair)."""
    was_training = model.training
    model.eval()
    correct = count = 0
    try:
        for images, labels in _labelled(data):
            correct += (model(images).argmax(1) == labels).sum().item()
            count += len(labels)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation data holds no samples")
    return correct / count


def fold(
    model: nn.Module,
    calibration_data: Tensor | Iterable,
    evaluation_data: tuple[Tensor, Tensor] | Iterable | None = None,
    tolerance: float = 0.1,
    measure_speed: bool = True,
    min_run_time: float = 0.3,
) -> FoldReport:
    """Replace every dynamic layer of a copy of ``model`` by its calibrated static convolution.

    Args:
        model: a model holding dynamic layers (left unchanged).
        calibration_data: images [N, C, H, W] as the model takes them (normalised), or an
            iterable of such tensors or of (images, labels) pairs: run through ``model`` in eval
            mode to compute each layer's attention from its real inputs.
        evaluation_data: optional (images, labels) pairs (or one pair): accuracy before/after.
        tolerance: layers whose relative kernel spread exceeds it are flagged.
        measure_speed: time the model and the folded model on the first calibration batch.
        min_run_time: seconds of timed runs for each.

    Returns:
        A :class:`FoldReport`; ``report.model`` is the folded model (eval mode).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    names = dynamic_layer_names(model)
    records = {n: FoldedLayer(n, type(model.get_submodule(n)).__name__) for n in names}
    sums = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)
        if _RULES.lookup(layer) is None:
            records[name].skipped = "no fold rule for this layer type"
            continue
        sums[name] = _Accumulator()

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0] if args[0].dim() == 4 else args[0].unsqueeze(0)
            sums[name].add(*effective_kernels(module, x))

        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    first = None
    try:
        with torch.no_grad():
            for images in _batches(calibration_data):
                first = images if first is None else first
                model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if first is None:
        raise ValueError("the calibration data holds no batch")

    folded = copy.deepcopy(model).eval()
    for name, acc in sums.items():
        record = records[name]
        if acc.count == 0:
            record.skipped = "did not run on the calibration data"
            continue
        layer = folded.get_submodule(name)
        conv = static_conv_like(layer)
        with torch.no_grad():
            conv.weight.copy_(acc.weight / acc.count)
            if conv.bias is not None:
                conv.bias.copy_(acc.bias / acc.count)
        replace_module(folded, name, conv.eval())
        record.samples, record.spread = acc.count, acc.spread()
        record.flagged = record.spread > tolerance
    report = FoldReport(folded, list(records.values()), float(tolerance))
    if evaluation_data is not None:
        pairs = list(_labelled(evaluation_data))  # read once, used twice
        report.accuracy_before = accuracy(model, pairs)
        report.accuracy_after = accuracy(folded, pairs)
    if measure_speed:
        report.latency_ms = (inference_latency_ms(model, first, min_run_time),
                             inference_latency_ms(folded, first, min_run_time))
    return report
