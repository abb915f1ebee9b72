"""The dynamic convolution layers."""

from .base import DynamicConvBase, KernelBankConv
from .drconv import DRConv2d
from .dynamic import DynamicConv2d
from .odconv import ODConv2d
from .routed import RoutedConv2d

__all__ = ["DRConv2d", "DynamicConv2d", "DynamicConvBase", "KernelBankConv", "ODConv2d",
           "RoutedConv2d"]
