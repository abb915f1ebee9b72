"""dynconv: dynamic convolutions for PyTorch, exact, fast and drop-in for ``nn.Conv2d``."""

from . import functional
from ._version import __version__ as __version__
from .allocator import keep_freed_memory
from .functional import (
    AutotuneError,
    autotune,
    mixture_conv2d,
    per_sample_conv2d,
    region_conv2d,
    warehouse_conv2d,
)
from .integrations.safe_load import allow_weights_only_load, safe_load_globals
from .layers import (
    DRConv2d,
    DynamicConv2d,
    DynamicConvBase,
    KernelBankConv,
    KWConv2d,
    ODConv2d,
    Warehouse,
    Warehouses,
)
from .layers.factory import create_conv2d
from .layers.temperature import dynamic_layers, get_temperature, set_temperature, temperatures
from .tools.checkpoint import CheckpointError, LoadResult, load_checkpoint
from .tools.convert import convert
from .tools.cost import count_macs
from .tools.counters import register_thop
from .tools.export import export_onnx
from .tools.fold import fold
from .tools.inspection import AttentionCapture, inspect_attention

# thop (Ultralytics' FLOP counter), if installed, counts the dynamic layers from now on
register_thop()
# nothing is added to torch's weights_only allow-list: see safe_load_globals()

__all__ = [
    "AttentionCapture",
    "AutotuneError",
    "CheckpointError",
    "DRConv2d",
    "DynamicConv2d",
    "DynamicConvBase",
    "KWConv2d",
    "KernelBankConv",
    "LoadResult",
    "ODConv2d",
    "Warehouse",
    "Warehouses",
    "allow_weights_only_load",
    "autotune",
    "convert",
    "count_macs",
    "create_conv2d",
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
    "safe_load_globals",
    "set_temperature",
    "temperatures",
    "warehouse_conv2d",
]
