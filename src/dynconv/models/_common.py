"""Initialisation shared by the models."""

from __future__ import annotations

from torch import nn

from ..layers.base import DynamicConvBase, init_conv_fan_out_


def init_weights(model: nn.Module) -> None:
    """torchvision's ResNet/MobileNetV2 initialisation for static layers; dynamic layers keep
    their own (``reset_parameters``), including the small convolutions of their attention."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            init_conv_fan_out_(m)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:  # KernelWarehouse's attention fc1 has none
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, DynamicConvBase) and hasattr(m, "reset_parameters"):
            m.reset_parameters()
