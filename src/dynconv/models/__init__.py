"""Models with any convolution type, and a registry to build them by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

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

_MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (
        resnet18, resnet34, resnet50, resnet101, mobilenet_v2, od_resnet18, od_resnet34,
        od_resnet50, od_resnet101, od_mobilenetv2_050, od_mobilenetv2_075, od_mobilenetv2_100,
    )
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name, e.g. ``create_model('resnet18', conv_type='odconv')``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    return _MODELS[name](**kwargs)


__all__ = [
    "MobileNetV2",
    "ResNet",
    "create_model",
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
]
