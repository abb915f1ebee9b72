"""``convert()``: turn the ``nn.Conv2d`` layers of any model into dynamic layers."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..layers.base import DynamicConvBase
from ..layers.factory import check_conv_type, create_conv2d


@dataclass
class ConversionRecord:
    """One ``nn.Conv2d`` that was converted or skipped."""

    name: str
    shape: str
    params_before: int
    params_after: int | None = None
    reason: str | None = None  # why it was skipped; None if converted


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` and ``skipped`` records, printable as a table."""

    conv_type: str
    converted: list[ConversionRecord] = field(default_factory=list)
    skipped: list[ConversionRecord] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [("layer", "shape", "params before", "params after")]
        rows += [(r.name, r.shape, f"{r.params_before:,}", f"{r.params_after:,}")
                 for r in self.converted]
        before = sum(r.params_before for r in self.converted)
        after = sum(r.params_after or 0 for r in self.converted)
        rows.append(("total", f"{len(self.converted)} converted", f"{before:,}", f"{after:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"convert to {self.conv_type!r}"]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        for r in self.skipped:
            lines.append(f"skipped {r.name} ({r.shape}): {r.reason}")
        return "\n".join(lines)


def _describe(conv: nn.Conv2d) -> str:
    kh, kw = conv.kernel_size
    s = f"{conv.in_channels}->{conv.out_channels} {kh}x{kw}"
    if conv.stride != (1, 1):
        s += f" s{conv.stride[0]}" if conv.stride[0] == conv.stride[1] else f" s{conv.stride}"
    if conv.groups != 1:
        s += f" g{conv.groups}"
    return s


def _matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Conv2d`` (or subclass) not inside one of the package's dynamic layers."""
    found = []
    inside_dynamic: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_dynamic):
            continue
        if isinstance(module, DynamicConvBase):
            inside_dynamic.add(name)
        elif isinstance(module, nn.Conv2d):
            found.append((name, module))
    return found


def convert(
    model: nn.Module,
    to: str,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_channels: int = 1,
    keep_stem_and_head: bool = False,
    verbose: bool = False,
    **layer_kwargs: Any,
) -> ConversionReport:
    """Replace the ``nn.Conv2d`` layers of ``model`` (in place) with dynamic layers of type ``to``.

    Each new layer starts from its static convolution (``init_from_conv``): for ``'dynamic'``
    (softmax routing) the converted model computes exactly what the original did, before any
    training; docs/models.md says what holds for the other types.

    Args:
        model: any ``nn.Module`` (yours, torchvision's, timm's, ...).
        to: the conv type (``'dynamic'``, ``'condconv'``, ``'odconv'``, ``'drconv'``, ...).
        include: module-name patterns (``fnmatch``, e.g. ``'layer4.*'``); if given, only matching
            convolutions are converted.
        exclude: module-name patterns never converted.
        min_channels: skip convolutions with fewer input channels.
        keep_stem_and_head: keep the first and the last convolution of the model static.
        verbose: print the report.
        layer_kwargs: passed to the new layers (``num_kernels``, ``temperature``, ...).

    Returns:
        A :class:`ConversionReport` (print it for a table of what was converted and skipped).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_conv_type(to)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    report = ConversionReport(to)
    candidates = _candidates(model)
    ends = {candidates[0][0], candidates[-1][0]} if keep_stem_and_head and candidates else set()
    for name, conv in candidates:
        shape = _describe(conv)
        before = sum(p.numel() for p in conv.parameters())
        record = ConversionRecord(name, shape, before)
        if type(conv) is not nn.Conv2d:
            record.reason = f"a subclass of nn.Conv2d ({type(conv).__name__})"
        elif name in ends:
            record.reason = "stem or head kept static (keep_stem_and_head=True)"
        elif include is not None and not _matches(name, include):
            record.reason = "not matched by include"
        elif _matches(name, exclude):
            record.reason = "matched by exclude"
        elif conv.in_channels < min_channels:
            record.reason = f"{conv.in_channels} input channels < min_channels={min_channels}"
        if record.reason is None:
            try:
                new = _build_like(conv, to, layer_kwargs)
            except (TypeError, ValueError, NotImplementedError) as error:
                record.reason = f"cannot build {to!r}: {error}"
            else:
                replace_module(model, name, new)
                record.params_after = sum(p.numel() for p in new.parameters())
        (report.skipped if record.reason else report.converted).append(record)
    if verbose:
        print(report)
    return report


def _build_like(conv: nn.Conv2d, conv_type: str, layer_kwargs: dict[str, Any]) -> nn.Module:
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    new = create_conv2d(
        conv_type, conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
        stride=tuple(conv.stride), padding=padding, dilation=tuple(conv.dilation),
        groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype, **layer_kwargs,
    )
    if isinstance(new, DynamicConvBase):
        new.init_from_conv(conv)
    new.train(conv.training)
    return new


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in the place of ``model``'s submodule ``name`` (a dotted path)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not name:
        raise ValueError("convert() cannot replace the model itself; wrap it in a container")
    setattr(parent, child, new)


# -- the other direction: dynamic layers back to static convolutions ------------------------------


def static_conv_like(layer: DynamicConvBase) -> nn.Conv2d:
    """A fresh ``nn.Conv2d`` with the geometry of the dynamic ``layer`` (channels, kernel size,
    stride, padding, dilation, groups, padding mode, bias or not), on its device and dtype."""
    if not isinstance(layer, DynamicConvBase):
        raise TypeError(f"expected one of dynconv's dynamic layers, got {type(layer).__name__}")
    weight = next(layer.parameters())
    return nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
        padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
        bias=getattr(layer, "bias", None) is not None, padding_mode=layer.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )


def dynamic_layer_names(model: nn.Module) -> list[str]:
    """Names of the dynamic layers of ``model`` (outermost only), in module order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, DynamicConvBase) and not any(
            name.startswith(prefix + ".") for prefix in names
        ):
            names.append(name)
    return names


def static_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every dynamic layer replaced by :func:`static_conv_like` (freshly
    initialised weights): the same network built with static convolutions, to compare costs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, DynamicConvBase):
        return static_conv_like(model)
    twin = copy.deepcopy(model)
    for name in dynamic_layer_names(twin):
        conv = static_conv_like(twin.get_submodule(name))
        conv.train(twin.training)
        replace_module(twin, name, conv)
    return twin
