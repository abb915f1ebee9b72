"""The reference code's checkpoints, both ways.

* :func:`to_official_state_dict`: a model's state_dict in the layout of the reference code
  (official ODConv, both DY-Conv layouts, seed 003's DRConv, timm's CondConv), which its modules
  load with ``strict=True``;
* :func:`load_official`: :func:`~dynconv.load_checkpoint`, after each dynamic layer has fitted
  itself to the checkpoint's shapes where the reference code's shapes vary (DY-Conv's hidden
  width and ``fc2`` bias);
* :func:`convert_timm_condconv`: timm's ``CondConv2d`` layers replaced by
  :class:`~dynconv.layers.RoutedConv2d`, in place, with the same weights.

Each layer says which layout it fits and what it cannot hold there
(:meth:`~dynconv.DynamicConvBase.official_layout`); this module only walks the model.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..layers import DRConv2d, DynamicConv2d, KWConv2d, ODConv2d, RoutedConv2d
from ..layers.base import DynamicConvBase
from ..layers.warehouse import OFFICIAL_WAREHOUSE_KEY, check_official_order, model_warehouses
from .checkpoint import LoadResult, load_checkpoint
from .convert import dynamic_layer_names, replace_module

__all__ = [
    "LAYOUTS",
    "OfficialLoadResult",
    "convert_timm_condconv",
    "load_official",
    "to_official_state_dict",
]

#: The reference layouts, name -> where it comes from (each layer type's ``official_layouts``).
LAYOUTS: dict[str, str] = {
    **ODConv2d.official_layouts,
    **DynamicConv2d.official_layouts,
    **DRConv2d.official_layouts,
    **RoutedConv2d.official_layouts,
    **KWConv2d.official_layouts,
}


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def to_official_state_dict(model: nn.Module, layout: str | None = None) -> OrderedDict[str, Tensor]:
    """``model.state_dict()`` with every dynamic layer's tensors in its reference layout.

    The keys and shapes are those of the reference module the layer stands for (the layer's
    :meth:`~dynconv.DynamicConvBase.official_state_dict`): the temperature, a plain attribute
    there, is left out, and timm's CondConv weights are flattened. The rest of the model is
    kept as it is, so the reference model with the same architecture loads the result with
    ``load_state_dict(..., strict=True)``; build it with the same arguments (its temperature
    at 1 for inference).

    Args:
        model: any ``nn.Module`` holding dynconv layers (or one layer).
        layout: one of :data:`LAYOUTS`, or ``None`` for each layer's own. When given, every
            dynamic layer must fit it.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``layout``, or a layer that the reference code cannot build
            (e.g. ODConv with ``attention_norm='layer'``, a sigmoid-routed DynamicConv2d): the
            message names the layer and what it holds.
    """
    _check_model(model)
    names = dynamic_layer_names(model)
    layers = {name: model.get_submodule(name) for name in names}
    known = dict(LAYOUTS)
    for layer in layers.values():
        known.update(type(layer).official_layouts)
    if layout is not None and layout not in known:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(known)}")
    converted: dict[str, dict[str, Tensor]] = {}
    for name, layer in layers.items():
        try:
            converted[name] = layer.official_state_dict(layout)
        except ValueError as error:
            raise ValueError(f"layer {name or '(the model)'!r}: {error}") from None
    state = model.state_dict()
    result: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        owner = next((n for n in names if not n or key.startswith(n + ".")), None)
        if owner is None:
            result[key] = value
        elif owner in converted:  # the layer's tensors, once, where its first key was
            prefix = owner + "." if owner else ""
            result.update((prefix + k, v) for k, v in converted.pop(owner).items())
    result = _with_official_warehouses(model, result)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # module versions (BatchNorm's), as load_state_dict reads them
        result._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return result


def _with_official_warehouses(model: nn.Module, state: OrderedDict[str, Tensor]
                              ) -> OrderedDict[str, Tensor]:
    """``state`` with KernelWarehouse's cells where the official code keeps them:
    ``warehouse_manager.weights.<i>``, i in module order, before every other key."""
    warehouses = model_warehouses(model)
    if not warehouses:
        return state
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, KWConv2d)]
    cells: OrderedDict[str, Tensor] = OrderedDict()
    for i, (warehouse, paths) in enumerate(warehouses):
        members = [layer for _, layer in layers if layer.warehouse is warehouse]
        problem = check_official_order(warehouse, members)
        if problem is not None:
            raise ValueError(f"the warehouse of layer {paths[0].rpartition('.')[0]!r} cannot be "
                             f"written in the 'kernelwarehouse' layout: {problem}")
        value = warehouse.cells.detach()
        if members and all(layer.official_cell_dims == 1 for layer in members):
            value = value.squeeze(-1)  # the official KWLinear's cells [n, c_out, c_in, 1]
        cells[OFFICIAL_WAREHOUSE_KEY.format(i)] = value
    return OrderedDict([*cells.items(), *state.items()])


def _official_warehouse_hook(model: nn.Module):
    """A load_state_dict pre-hook for ``model`` that puts the official checkpoint's
    ``warehouse_manager.weights.<i>`` under the paths of the model's i-th warehouse (module
    order), after checking that they are of the model's width."""
    pattern = re.compile(r"warehouse_manager\.weights\.(\d+)")

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        keys = [k for k in state_dict if pattern.fullmatch(k[len(prefix):])]
        if not keys:
            return
        warehouses = model_warehouses(model)
        width = getattr(model, "kw_width", None)
        model_is = f" (the model is {width})" if width else ""
        if len(keys) != len(warehouses):
            raise ValueError(
                f"the checkpoint holds {len(keys)} KernelWarehouse warehouses "
                f"(warehouse_manager.weights.*), the model {len(warehouses)}: is it the right "
                "model?"
            )
        for i, (warehouse, paths) in enumerate(warehouses):
            key = prefix + OFFICIAL_WAREHOUSE_KEY.format(i)
            value = state_dict.pop(key, None)
            if not isinstance(value, Tensor):
                raise ValueError(f"the checkpoint has no tensor {key!r}")
            if value.dim() == 4 and warehouse.cells.shape[-2:] == (1, 1):
                value = value.unsqueeze(-1)  # the official KWLinear's 1-D cells
            if value.shape != warehouse.cells.shape:
                raise ValueError(
                    f"the checkpoint's {key} holds cells {list(value.shape)}, the model's "
                    f"warehouse of {paths[0].rpartition('.')[0]!r} "
                    f"{list(warehouse.cells.shape)}: the checkpoint is of another width"
                    f"{model_is} or another model"
                )
            for path in paths:
                state_dict[prefix + path + ".cells"] = value

    return hook


@dataclass(frozen=True)
class OfficialLoadResult:
    """What :func:`load_official` did: ``load``, the :class:`~dynconv.LoadResult` of the load,
    and ``refitted``, layer name -> what the layer rebuilt to fit the checkpoint's shapes."""

    load: LoadResult
    refitted: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{name}: {change}" for name, change in self.refitted.items()]
        return "\n".join([*lines, str(self.load)])


def load_official(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> OfficialLoadResult:
    """:func:`~dynconv.load_checkpoint` for a reference checkpoint whose layers' shapes the model
    was not built with: each dynamic layer first rebuilds what it can from the checkpoint's
    shapes (:meth:`~dynconv.DynamicConvBase.fit_to_state_dict`; a DynamicConv2d takes the hidden
    width of ``attention.fc1`` and the ``attention.fc2`` bias of either DY-Conv layout, so a
    model built with the defaults loads both, RGB stem included), and the result says so.

    Load before building the optimizer: a rebuilt attention has new parameters. The arguments
    and errors are those of :func:`~dynconv.load_checkpoint`; shapes that no layer rebuilds (the
    number of kernels, the channels) are reported as size mismatches.
    """
    _check_model(model)
    refitted: dict[str, str] = {}

    def fit(layer: DynamicConvBase, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
        change = layer.fit_to_state_dict(state_dict, prefix)
        if change is not None:
            refitted[prefix[:-1]] = change

    handles = [model.get_submodule(name).register_load_state_dict_pre_hook(fit)
               for name in dynamic_layer_names(model)]
    handles.append(model.register_load_state_dict_pre_hook(_official_warehouse_hook(model)))
    try:
        result = load_checkpoint(model, checkpoint, strict=strict, map_location=map_location,
                                 weights_only=weights_only)
    finally:
        for handle in handles:
            handle.remove()
    return OfficialLoadResult(result, refitted)


def convert_timm_condconv(model: nn.Module) -> list[str]:
    """Replace every ``timm.layers.CondConv2d`` of ``model`` (in place) by a
    :class:`~dynconv.layers.RoutedConv2d` with the same geometry, experts, weights and mode.

    timm's ``CondConvResidual`` blocks (``efficientnet_cc_*``, ``tf_efficientnet_cc_*``) keep
    their routing (``routing_fn``, a Linear on the pooled block input, then a sigmoid) and call
    the new layers with it, so the model computes what it did, through dynconv's per-sample
    convolution. The state_dict keys are unchanged; timm's checkpoints load into the converted
    model (the layers take timm's flattened weights) and :func:`to_official_state_dict` writes
    them back in timm's layout.

    Returns:
        the names of the replaced layers, in module order.

    Raises:
        ImportError: timm is not installed.
        ValueError: the model holds no timm ``CondConv2d``.
    """
    _check_model(model)
    try:
        from timm.layers import CondConv2d
    except ImportError as error:
        raise ImportError("convert_timm_condconv needs timm (pip install timm)") from error
    names = [name for name, m in model.named_modules() if isinstance(m, CondConv2d)]
    if not names:
        raise ValueError(f"{type(model).__name__} holds no timm CondConv2d to convert")
    if "" in names:
        raise ValueError("convert_timm_condconv cannot replace the model itself; wrap it in a "
                         "container")
    for name in names:
        old = model.get_submodule(name)
        new = RoutedConv2d(
            old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
            padding=old.padding, dilation=old.dilation, groups=old.groups,
            bias=old.bias is not None, num_kernels=old.num_experts,
            dynamic_padding=old.dynamic_padding, device=old.weight.device,
            dtype=old.weight.dtype,
        )
        new.load_state_dict(old.state_dict(), strict=True)
        new.requires_grad_(old.weight.requires_grad)
        replace_module(model, name, new.train(old.training))
    return names
