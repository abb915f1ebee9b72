"""The dynamic convolution layers."""

from .base import DynamicConvBase, KernelBankConv
from .drconv import DRConv2d
from .dynamic import DynamicConv2d
from .kwconv import KWAttention, KWConv2d
from .odconv import ODConv2d
from .routed import RoutedConv2d
from .warehouse import Warehouse, Warehouses

__all__ = ["DRConv2d", "DynamicConv2d", "DynamicConvBase", "KWAttention", "KWConv2d",
           "KernelBankConv", "ODConv2d", "RoutedConv2d", "Warehouse", "Warehouses"]
