"""dynconv: dynamic convolutions for PyTorch, exact, fast and drop-in for ``nn.Conv2d``."""

from . import functional
from .allocator import keep_freed_memory
from .checkpoint import LoadResult, allow_weights_only_load, load_checkpoint
from .counters import register_thop
from .export import export_onnx
from .fold import fold
from .functional import mixture_conv2d, per_sample_conv2d, region_conv2d
from .inspection import AttentionCapture, inspect_attention
from .layers import DRConv2d, DynamicConv2d, DynamicConvBase, KernelBankConv, ODConv2d
from .temperature import dynamic_layers, get_temperature, set_temperature, temperatures

__version__ = "0.1.0"

# thop (Ultralytics' FLOP counter), if installed, counts the dynamic layers from now on
register_thop()
# a weights_only torch.load (Ultralytics' safe-load mode) may build the package's modules
allow_weights_only_load()

__all__ = [
    "AttentionCapture",
    "DRConv2d",
    "DynamicConv2d",
    "DynamicConvBase",
    "KernelBankConv",
    "LoadResult",
    "ODConv2d",
    "dynamic_layers",
    "export_onnx",
    "fold",
    "functional",
    "get_temperature",
    "inspect_attention",
    "keep_freed_memory",
    "load_checkpoint",
    "mixture_conv2d",
    "per_sample_conv2d",
    "region_conv2d",
    "register_thop",
    "set_temperature",
    "temperatures",
]
