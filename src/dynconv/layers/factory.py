"""One switch for the convolution type: ``create_conv2d('odconv', 64, 128, 3, padding=1)``.

Every model, block and :func:`dynconv.convert` builds its convolutions here, so a new layer type
is one :func:`register_conv` call away from all of them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .._conv_args import PaddingArg, check_bool
from .base import DynamicConvBase
from .drconv import DRConv2d
from .dynamic import DynamicConv2d
from .kwconv import KWConv2d
from .odconv import ODConv2d
from .warehouse import WAREHOUSE_SETTINGS, Warehouses

ConvBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ConvBuilder] = {}

ANY_BATCH_DEFAULTS: dict[str, dict[str, Any]] = {"odconv": {"attention_norm": "layer"},
                                                 "kw": {"attention_norm": "layer"}}
"""Per-type keywords for networks that must train at any batch size (the small CNN, the YOLO
blocks): ODConv's official attention BatchNorm normalises pooled features over the batch, which
fails at batch 1 and diverged at small batches in our runs; LayerNorm over the attention's
hidden units
(a per-sample GroupNorm) does not depend on the batch."""


def register_conv(name: str, builder: ConvBuilder, *, overwrite: bool = False) -> None:
    """Register ``builder`` (called with ``nn.Conv2d``'s arguments plus its own keywords)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a conv type name must be a non-empty str, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder for {name!r} must be callable, got {builder!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"conv type {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = builder


def conv_types() -> tuple[str, ...]:
    """The registered convolution types, e.g. ``('static', 'dynamic', 'condconv', ...)``."""
    return tuple(_REGISTRY)


def check_conv_type(conv_type: object) -> str:
    """Return ``conv_type`` if it is registered; raise a ``ValueError`` listing them otherwise."""
    if conv_type not in _REGISTRY:
        raise ValueError(f"unknown conv type {conv_type!r}; expected one of {conv_types()}")
    return conv_type  # type: ignore[return-value]


def create_conv2d(
    conv_type: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: PaddingArg = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    bias: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a 2-D convolution of the given type with ``nn.Conv2d``'s arguments.

    ``kwargs`` go to the layer (``num_kernels``, ``reduction``, ``temperature``, ``padding_mode``,
    ``device``, ``dtype``, ...); a keyword the type does not take raises a ``TypeError`` naming
    the type.
    """
    builder = _REGISTRY[check_conv_type(conv_type)]
    check_bool(bias, "bias")  # nn.Conv2d ('static', and foreign builders) takes any truthy value
    try:
        return builder(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, **kwargs,
        )
    except TypeError as error:
        if "unexpected keyword argument" in str(error) or "multiple values" in str(error):
            raise TypeError(
                f"conv type {conv_type!r} does not accept one of {sorted(kwargs)}: {error}"
            ) from None
        raise


def conv_builder(conv_type: str, **kwargs: Any) -> ConvBuilder:
    """A callable with ``nn.Conv2d``'s signature that builds ``conv_type`` with ``kwargs``."""
    check_conv_type(conv_type)
    return functools.partial(create_conv2d, conv_type, **kwargs)


def shares_warehouses(conv_type: str) -> bool:
    """Whether ``conv_type``'s builder takes a ``warehouse`` keyword (``'kw'``): its layers mix
    the kernel cells of a :class:`~dynconv.layers.warehouse.Warehouse` that several layers
    share, so a model decides which layers share one."""
    builder = _REGISTRY[check_conv_type(conv_type)]
    try:
        return "warehouse" in inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builder without a signature takes no warehouse
        return False


def split_warehouse_settings(conv_type: str, kwargs: dict[str, Any]
                             ) -> tuple[Warehouses | None, dict[str, Any]]:
    """For a type that :func:`shares_warehouses` and ``kwargs`` without a ``warehouse``: a
    :class:`~dynconv.layers.warehouse.Warehouses` of the warehouse settings in ``kwargs``
    (``cell_num_ratio``, ``cell_in_ratio``, ``cell_out_ratio``, ``spatial_partition``, and
    ``device`` and ``dtype``), and the rest of ``kwargs`` for the layers. Otherwise ``(None,
    kwargs)``: a setting then reaches the layer, whose type refuses it by name."""
    if not shares_warehouses(conv_type) or "warehouse" in kwargs:
        return None, dict(kwargs)
    settings = {k: v for k, v in kwargs.items()
                if k in WAREHOUSE_SETTINGS or k in ("device", "dtype")}
    rest = {k: v for k, v in kwargs.items() if k not in WAREHOUSE_SETTINGS}
    return Warehouses(**settings), rest


def is_dynamic(module: nn.Module) -> bool:
    """Whether ``module`` is one of the package's dynamic layers."""
    return isinstance(module, DynamicConvBase)


def _static(in_channels, out_channels, kernel_size, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs)


register_conv("static", _static)
register_conv("dynamic", functools.partial(DynamicConv2d, routing="softmax"))
register_conv("condconv", functools.partial(DynamicConv2d, routing="sigmoid"))
register_conv("odconv", ODConv2d)
register_conv("drconv", DRConv2d)
register_conv("kw", KWConv2d)
