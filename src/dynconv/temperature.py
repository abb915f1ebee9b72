"""Read and set the attention temperature of every dynamic layer in a model with one call."""

from __future__ import annotations

from torch import nn

from .layers.base import DynamicConvBase


def dynamic_layers(model: nn.Module) -> dict[str, DynamicConvBase]:
    """The package's dynamic layers in ``model`` (the model itself included), by module name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicConvBase)}


def set_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature of every dynamic layer in ``model``; return how many were set."""
    layers = dynamic_layers(model)
    for layer in layers.values():
        layer.set_temperature(value)
    return len(layers)


def temperatures(model: nn.Module) -> dict[str, float]:
    """The temperature of each dynamic layer in ``model``, by module name."""
    return {name: float(layer.temperature) for name, layer in dynamic_layers(model).items()}


def get_temperature(model: nn.Module) -> float:
    """The temperature shared by every dynamic layer in ``model``.

    Raises ``ValueError`` if the model has no dynamic layer or the layers disagree (then
    :func:`temperatures` lists them).
    """
    values = temperatures(model)
    if not values:
        raise ValueError(f"{type(model).__name__} holds no dynamic layer of dynconv")
    distinct = set(values.values())
    if len(distinct) > 1:
        raise ValueError(
            f"the dynamic layers have different temperatures {sorted(distinct)}; "
            "dynconv.temperatures(model) lists them by layer"
        )
    return distinct.pop()
