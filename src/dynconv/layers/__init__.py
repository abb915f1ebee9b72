"""The dynamic convolution layers."""

from .base import DynamicConvBase, KernelBankConv
from .dynamic import DynamicConv2d
from .odconv import ODConv2d

__all__ = ["DynamicConv2d", "DynamicConvBase", "KernelBankConv", "ODConv2d"]
