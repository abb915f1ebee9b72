"""dynconv: dynamic convolutions for PyTorch, exact, fast and drop-in for ``nn.Conv2d``."""

from . import functional
from .checkpoint import LoadResult, load_checkpoint
from .functional import mixture_conv2d, per_sample_conv2d, region_conv2d
from .layers import DRConv2d, DynamicConv2d, DynamicConvBase, KernelBankConv, ODConv2d
from .temperature import dynamic_layers, get_temperature, set_temperature, temperatures

__version__ = "0.1.0"

__all__ = [
    "DRConv2d",
    "DynamicConv2d",
    "DynamicConvBase",
    "KernelBankConv",
    "LoadResult",
    "ODConv2d",
    "dynamic_layers",
    "functional",
    "get_temperature",
    "load_checkpoint",
    "mixture_conv2d",
    "per_sample_conv2d",
    "region_conv2d",
    "set_temperature",
    "temperatures",
]
