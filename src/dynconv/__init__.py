"""dynconv: dynamic convolutions for PyTorch, exact, fast and drop-in for ``nn.Conv2d``."""

from . import functional
from .checkpoint import LoadResult, load_checkpoint
from .export import export_onnx
from .functional import mixture_conv2d, per_sample_conv2d
from .inspection import AttentionCapture, inspect_attention
from .layers import DynamicConv2d, DynamicConvBase, KernelBankConv, ODConv2d
from .temperature import dynamic_layers, get_temperature, set_temperature, temperatures

__version__ = "0.1.0"

__all__ = [
    "AttentionCapture",
    "DynamicConv2d",
    "DynamicConvBase",
    "KernelBankConv",
    "LoadResult",
    "ODConv2d",
    "dynamic_layers",
    "export_onnx",
    "functional",
    "get_temperature",
    "inspect_attention",
    "load_checkpoint",
    "mixture_conv2d",
    "per_sample_conv2d",
    "set_temperature",
    "temperatures",
]
