"""``convert()``: turn the ``nn.Conv2d`` layers of any model into dynamic layers."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.base import DynamicConvBase
from ..layers.factory import (
    check_conv_type,
    conv_types,
    create_conv2d,
    shares_warehouses,
    split_warehouse_settings,
)
from ..layers.warehouse import Warehouse

#: The ways :func:`convert` shares warehouses among the layers of a type that has them
#: (``'kw'``), besides a callable from a module name to a warehouse name.
SHARE_RULES = ("stage", "layer", "model")
#: The height and width of the zero image that ``share='stage'`` runs the model on when no
#: ``example_input`` is given (ImageNet's; any size the model takes finds the same stages).
STAGE_INPUT_SIZE = 224

ShareRule = str | Callable[[str], str]


@dataclass
class ConversionRecord:
    """One ``nn.Conv2d`` that was converted or skipped. ``params_after``: the new layer's
    parameters, the cells of a shared warehouse counted by those the layer brought to it, so
    that the layers of a warehouse add up to it once; ``warehouse``: the name of the warehouse
    it joined (types that share them, ``'kw'``)."""

    name: str
    shape: str
    params_before: int
    params_after: int | None = None
    reason: str | None = None  # why it was skipped; None if converted
    warehouse: str | None = None


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` and ``skipped`` records, printable as a table;
    ``warehouses``, the warehouses it built by name (types that share them), and ``notes``."""

    conv_type: str
    converted: list[ConversionRecord] = field(default_factory=list)
    skipped: list[ConversionRecord] = field(default_factory=list)
    warehouses: dict[str, Warehouse] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        shared = bool(self.warehouses)
        rows = [("layer", "shape", *(("warehouse",) if shared else ()), "params before",
                 "params after")]
        rows += [(r.name, r.shape, *((r.warehouse or "",) if shared else ()),
                  f"{r.params_before:,}", f"{r.params_after:,}") for r in self.converted]
        before = sum(r.params_before for r in self.converted)
        after = sum(r.params_after or 0 for r in self.converted)
        rows.append(("total", f"{len(self.converted)} converted",
                     *((f"{len(self.warehouses)} shared",) if shared else ()),
                     f"{before:,}", f"{after:,}"))
        columns = len(rows[0])
        widths = [max(len(row[i]) for row in rows) for i in range(columns)]
        lines = [f"convert to {self.conv_type!r}"]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < columns - 2 else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        for name, warehouse in self.warehouses.items():
            n, *shape = warehouse.cells.shape
            lines.append(f"warehouse {name}: {len(warehouse.members)} layers share {n} cells of "
                         f"{'x'.join(map(str, shape))} ({warehouse.cells.numel():,} parameters)")
        for r in self.skipped:
            lines.append(f"skipped {r.name} ({r.shape}): {r.reason}")
        lines += [f"note: {note}" for note in self.notes]
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
    share: ShareRule | None = None,
    example_input: Tensor | tuple[Any, ...] | None = None,
    **layer_kwargs: Any,
) -> ConversionReport:
    """Replace the ``nn.Conv2d`` layers of ``model`` (in place) with dynamic layers of type ``to``.

    Each new layer starts from its static convolution (``init_from_conv``): for ``'dynamic'``
    (softmax routing) the converted model computes exactly what the original did, before any
    training; docs/models.md says what holds for the other types.

    Args:
        model: any ``nn.Module`` (yours, torchvision's, timm's, ...).
        to: the conv type (``'dynamic'``, ``'condconv'``, ``'odconv'``, ``'drconv'``, ``'kw'``...).
        include: module-name patterns (``fnmatch``, e.g. ``'layer4.*'``); if given, only matching
            convolutions are converted.
        exclude: module-name patterns never converted.
        min_channels: skip convolutions with fewer input channels.
        keep_stem_and_head: keep the first and the last convolution of the model static.
        verbose: print the report.
        share: for a type whose layers share a warehouse of kernel cells (``'kw'``), which
            converted layers share one: ``'stage'`` (the default) those whose input has the same
            height and width, found by hooks in one forward pass of ``model`` in eval mode
            without gradients on ``example_input`` (its training flags are restored after);
            ``'layer'`` each its own; ``'model'`` all one; or a callable from a module name to a
            warehouse name. Another type raises a ``ValueError``.
        example_input: what ``share='stage'`` runs the model on (a tensor, or a tuple of
            arguments): by default zeros [1, C, 224, 224] (:data:`STAGE_INPUT_SIZE`), C the
            input channels of the model's first convolution, on its device and dtype.
        layer_kwargs: passed to the new layers (``num_kernels``, ``temperature``, ...); for a
            type that shares warehouses, the warehouse settings (``cell_num_ratio``,
            ``cell_in_ratio``, ``cell_out_ratio``, ``spatial_partition``) go to every
            warehouse.

    Returns:
        A :class:`ConversionReport` (print it for a table of what was converted and skipped).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_conv_type(to)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    warehouses = shares_warehouses(to)
    rule = _check_share(share, example_input, to, warehouses, layer_kwargs)
    report = ConversionReport(to)
    candidates = _candidates(model)
    ends = {candidates[0][0], candidates[-1][0]} if keep_stem_and_head and candidates else set()
    records, chosen = [], []
    for name, conv in candidates:
        record = ConversionRecord(name, _describe(conv), sum(p.numel() for p in conv.parameters()))
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
        else:
            chosen.append((name, conv, record))
        records.append(record)
    # the warehouses' settings (checked here), on the device and dtype of the convolutions
    weight = chosen[0][1].weight if chosen else None
    where = {} if weight is None else {"device": weight.device, "dtype": weight.dtype}
    shop, kwargs = split_warehouse_settings(to, {**where, **layer_kwargs})
    layer_kwargs = {k: v for k, v in kwargs.items() if k in layer_kwargs}
    keys: dict[str, str] = {}
    if shop is not None and chosen:
        keys = _warehouse_keys(model, candidates[0][1], {n: c for n, c, _ in chosen}, rule,
                               example_input, report.notes)
    # every layer joins its warehouse (which re-initialises it) before any starts from its conv
    built = []
    for name, conv, record in chosen:
        kwargs = layer_kwargs
        if shop is not None:
            kwargs = {**layer_kwargs, "warehouse": shop[keys[name]]}
        try:
            built.append((name, conv, record, _build_like(conv, to, kwargs)))
        except (TypeError, ValueError) as error:
            record.reason = f"cannot build {to!r}: {error}"
    for name, conv, record, new in built:
        if isinstance(new, DynamicConvBase):
            try:
                new.init_from_conv(conv)
            except NotImplementedError as error:
                if not warehouses:
                    record.reason = f"cannot build {to!r}: {error}"
                    continue
                # it joined a warehouse already: it stays, freshly initialised
                note = f"the {to!r} layers keep their fresh initialisation: {error}"
                if note not in report.notes:
                    report.notes.append(note)
        new.train(conv.training)
        replace_module(model, name, new)
        record.params_after = _parameters_after(new)
        record.warehouse = keys.get(name)
    if shop is not None:
        report.warehouses = {name: w for name, w in shop.items() if w.members}
    for record in records:
        (report.skipped if record.reason else report.converted).append(record)
    if verbose:
        print(report)
    return report


def _check_share(share: object, example_input: object, to: str, warehouses: bool,
                 layer_kwargs: dict[str, Any]) -> ShareRule | None:
    """The sharing rule for conv type ``to`` (``'stage'`` by default for a type with
    warehouses, None for another), its arguments checked."""
    if not warehouses:
        if share is not None:
            with_warehouses = [t for t in conv_types() if shares_warehouses(t)]
            raise ValueError(f"share={share!r} is for the conv types whose layers share a "
                             f"warehouse ({', '.join(map(repr, with_warehouses))}), not {to!r}")
        if example_input is not None:
            raise ValueError(f"example_input is for share='stage' (conv types with warehouses), "
                             f"not {to!r}")
        return None
    if "warehouse" in layer_kwargs:
        raise ValueError("convert() builds the warehouses itself: pass share= (which layers "
                         "share one) and the warehouse settings (cell_num_ratio, ...), not "
                         "warehouse=")
    rule = "stage" if share is None else share
    if isinstance(rule, str):
        if rule not in SHARE_RULES:
            raise ValueError(f"share must be one of {SHARE_RULES} or a callable(name) -> "
                             f"warehouse name, got {rule!r}")
    elif not callable(rule):
        raise TypeError(f"share must be one of {SHARE_RULES} or a callable(name) -> warehouse "
                        f"name, got {type(rule).__name__}")
    if example_input is not None:
        if rule != "stage":
            raise ValueError(f"example_input is for share='stage', not share={rule!r}")
        if not isinstance(example_input, (Tensor, tuple)):
            raise TypeError("example_input must be a tensor or a tuple of the model's "
                            f"arguments, got {type(example_input).__name__}")
    return rule


def _warehouse_keys(model: nn.Module, first: nn.Conv2d, convs: dict[str, nn.Conv2d],
                    rule: ShareRule, example_input: Tensor | tuple[Any, ...] | None,
                    notes: list[str]) -> dict[str, str]:
    """The warehouse name of each of ``convs`` under ``rule`` (``first``: the model's first
    convolution, whose input channels size the default example input)."""
    if rule == "layer":
        return {name: name for name in convs}
    if rule == "model":
        return dict.fromkeys(convs, "model")
    if callable(rule):
        keys = {}
        for name in convs:
            key = rule(name)
            if not isinstance(key, str):
                raise TypeError(f"share's callable must return a warehouse name (a str), got "
                                f"{key!r} for {name!r}")
            keys[name] = key
        return keys
    sizes = input_sizes(model, first, convs, example_input)
    missing = [name for name in convs if name not in sizes]
    if missing:
        notes.append(f"{len(missing)} convolution(s) did not run in share='stage''s forward "
                     f"pass, each has its own warehouse: {', '.join(missing)}")
    return {name: f"{sizes[name][0]}x{sizes[name][1]}" if name in sizes else name
            for name in convs}


class _AllSeen(Exception):
    """Raised by the last hook of :func:`input_sizes`: the rest of the forward is not needed."""


def input_sizes(model: nn.Module, first: nn.Conv2d, convs: dict[str, nn.Module],
                example_input: Tensor | tuple[Any, ...] | None = None
                ) -> dict[str, tuple[int, int]]:
    """The (height, width) of the input each of ``convs`` (modules of ``model``, by name) sees
    at its first call in one forward pass of ``model`` on ``example_input`` (default: zeros
    [1, ``first.in_channels``, 224, 224] on ``first``'s device and dtype), in eval mode without
    gradients, stopped once all have run; the model's training flags are restored after. A
    module that does not run is missing from the result. Raises a ``ValueError`` if the model
    fails on the input before all have run."""
    if example_input is None:
        example_input = torch.zeros(1, first.in_channels, STAGE_INPUT_SIZE, STAGE_INPUT_SIZE,
                                    device=first.weight.device, dtype=first.weight.dtype)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    sizes: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if name not in sizes:
                sizes[name] = tuple(inputs[0].shape[-2:])
                if len(sizes) == len(convs):
                    raise _AllSeen
        return record

    training = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in convs.items()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except _AllSeen:
        pass
    except Exception as error:  # the model's own error, on an input it does not take
        shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
        raise ValueError(
            f"share='stage' runs the model once to find each convolution's input size, and "
            f"{type(model).__name__} failed on {shapes} after {len(sizes)} of {len(convs)}: "
            f"{type(error).__name__}: {error}; pass example_input= (what the model takes), or "
            "share='layer', 'model' or a callable(name) -> warehouse name"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
    return sizes


def _build_like(conv: nn.Conv2d, conv_type: str, layer_kwargs: dict[str, Any]) -> nn.Module:
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    return create_conv2d(
        conv_type, conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
        stride=tuple(conv.stride), padding=padding, dilation=tuple(conv.dilation),
        groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype, **layer_kwargs,
    )


def _parameters_after(layer: nn.Module) -> int:
    """``layer``'s parameters, a shared warehouse's cells counted by those the layer brought
    (``layout.own_cells``): over the layers of a warehouse they add up to its cells once."""
    warehouse = getattr(layer, "warehouse", None)
    if not isinstance(warehouse, Warehouse):
        return sum(p.numel() for p in layer.parameters())
    shared = {id(p) for p in warehouse.parameters()}
    own = sum(p.numel() for p in layer.parameters() if id(p) not in shared)
    return own + layer.layout.own_cells * warehouse.cells[0].numel()


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
