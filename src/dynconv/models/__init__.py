"""Models with any convolution type, and a registry to build them by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .kernel_warehouse import (
    KW_WIDTHS,
    kw_mobilenetv2_050,
    kw_mobilenetv2_100,
    kw_resnet18,
    kw_resnet50,
)
from .mobilenetv2 import (
    MobileNetV2,
    mobilenet_v2,
    od_mobilenetv2_050,
    od_mobilenetv2_075,
    od_mobilenetv2_100,
)
from .resnet import (
    ResNet,
    od_resnet18,
    od_resnet34,
    od_resnet50,
    od_resnet101,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)
from .small import SmallCNN, small_cnn

_MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (
        resnet18, resnet34, resnet50, resnet101, mobilenet_v2, od_resnet18, od_resnet34,
        od_resnet50, od_resnet101, od_mobilenetv2_050, od_mobilenetv2_075, od_mobilenetv2_100,
        small_cnn, kw_resnet18, kw_resnet50, kw_mobilenetv2_050, kw_mobilenetv2_100,
    )
}

#: The zoo built with one convolution type only: name prefix -> type.
_FIXED_TYPES = {"od_": "odconv", "kw_": "kw"}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def check_model(name: object) -> str:
    """Return ``name`` if it is a model of :func:`list_models`; raise a ``ValueError`` otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    return name  # type: ignore[return-value]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name, e.g. ``create_model('resnet18', conv_type='odconv')``."""
    return _MODELS[check_model(name)](**kwargs)


def fixed_conv_type(name: str) -> str | None:
    """The convolution type a model is built with whatever is asked (``'odconv'`` for the
    official ODConv zoo, ``od_*``; ``'kw'`` for KernelWarehouse's, ``kw_*``), or ``None`` if it
    takes ``conv_type``."""
    check_model(name)
    return next((t for prefix, t in _FIXED_TYPES.items() if name.startswith(prefix)), None)


def check_model_conv_type(name: str, conv_type: str | None) -> str | None:
    """Raise a ``ValueError`` if model ``name`` cannot be built with ``conv_type`` (the ``od_*``
    zoo is ODConv only, ``kw_*`` KernelWarehouse only); return :func:`fixed_conv_type`."""
    fixed = fixed_conv_type(name)
    if fixed is not None and conv_type not in (None, fixed):
        plain = name.split("_", 1)[1]
        raise ValueError(f"model {name!r} is built with conv type {fixed!r} only, got "
                         f"{conv_type!r}; use {plain!r} for other types")
    return fixed


def create_model_for_data(
    name: str,
    conv_type: str | None,
    num_classes: int | None,
    in_channels: int,
    image_size: int,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` for images of ``in_channels`` x ``image_size`` and ``num_classes`` classes.

    ResNets get the CIFAR stem (3x3 convolution, no max-pool) for images up to 64 pixels unless
    ``stem`` is given; ``small_cnn`` halves the maps at its stem (``stem_stride=2``) for images of
    16 pixels or more (MNIST, CIFAR), and keeps them for smaller ones (the 8x8 digits).
    ``conv_type=None`` takes the model's own type (static, or ODConv for the ``od_*`` zoo); a zoo
    model asked for another type raises a ``ValueError``.
    ``num_classes=None`` keeps the model's default.
    """
    if check_model_conv_type(name, conv_type) is None:
        kwargs["conv_type"] = "static" if conv_type is None else conv_type
    if "resnet" in name:
        kwargs.setdefault("stem", "cifar" if image_size <= 64 else "imagenet")
    if name == "small_cnn":
        kwargs.setdefault("stem_stride", 2 if image_size >= 16 else 1)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return create_model(name, in_channels=in_channels, **kwargs)


__all__ = [
    "KW_WIDTHS",
    "MobileNetV2",
    "ResNet",
    "SmallCNN",
    "check_model",
    "check_model_conv_type",
    "create_model",
    "create_model_for_data",
    "fixed_conv_type",
    "kw_mobilenetv2_050",
    "kw_mobilenetv2_100",
    "kw_resnet18",
    "kw_resnet50",
    "list_models",
    "mobilenet_v2",
    "od_mobilenetv2_050",
    "od_mobilenetv2_075",
    "od_mobilenetv2_100",
    "od_resnet18",
    "od_resnet34",
    "od_resnet50",
    "od_resnet101",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "small_cnn",
]
