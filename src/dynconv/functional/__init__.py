"""The one per-sample convolution of the package, and its exact formulations.

Every layer of dynconv ends in one of these calls:

* :func:`per_sample_conv2d` convolves each sample with its own kernel
  (``x`` [N, C_in, H, W], ``weight`` [N, C_out, C_in/groups, kH, kW]).
* :func:`mixture_conv2d` convolves each sample with a per-sample mixture of a shared kernel
  bank, ``sum_k coefficients[n, k] * bank[k]``, optionally weighted per kernel position
  (ODConv's spatial attention). It either assembles the per-sample kernels and calls
  :func:`per_sample_conv2d`, or runs one dense product with all K kernels and mixes the outputs,
  whichever the dispatch rule expects to be faster.
* :func:`region_conv2d` (DRConv) convolves each output pixel with one of R per-sample kernels,
  chosen by a guide: either every region's output through :func:`per_sample_conv2d` and a
  gather, or each pixel with its own region's kernel only (gathered receptive fields and one
  matrix product per region).

* :func:`warehouse_conv2d` (KernelWarehouse) convolves each sample with a kernel cut into cells,
  each a per-sample mixture of a warehouse's shared cells (:func:`mix_cells`); with gradients,
  the kernels are assembled a chunk of samples at a time, as :func:`mixture_conv2d`'s are.

:func:`mix_kernels` and :func:`mix_cells` are the mixing itself (per-sample kernels or biases
from a bank, kernels from cells), for the tools that need the kernels a layer convolved with.

``'auto'`` picks a formulation by a rule whose thresholds depend on the device type
(:mod:`dynconv.functional.dispatch`), or, under :class:`autotune`, by timing every formulation
once per shape (:mod:`dynconv.functional.tuning`).

All formulations compute the same result (up to floating-point rounding); ``method`` forces one,
which the tests do in turn.

While a model is traced for export (:func:`is_exporting`: ``torch.onnx.export``, ``torch.export``,
``torch.jit.trace``), ``'auto'`` picks the formulations whose graph holds for any batch size:
the per-sample kernels assembled with one matrix product, then ``'unfold'`` (im2col and a
batched matrix product). The grouped formulation folds the batch into the convolution's
``groups``, a constant of the exported graph, and would freeze the batch size.
"""

from ._common import is_exporting
from .mixture import (
    MIXTURE_METHODS,
    CellGrid,
    MixtureMethod,
    mix_cells,
    mix_kernels,
    mixout_through_im2col,
    mixture_conv2d,
    warehouse_conv2d,
)
from .per_sample import PER_SAMPLE_METHODS, PerSampleMethod, per_sample_conv2d
from .region import (
    REGION_METHODS,
    RegionMethod,
    adaptive_avg_pool2d_matmul,
    assign_regions,
    region_conv2d,
)
from .tuning import AutotuneError, autotune, autotune_enabled, autotune_summary, reset_autotune

__all__ = [
    "MIXTURE_METHODS",
    "PER_SAMPLE_METHODS",
    "REGION_METHODS",
    "AutotuneError",
    "CellGrid",
    "MixtureMethod",
    "PerSampleMethod",
    "RegionMethod",
    "adaptive_avg_pool2d_matmul",
    "assign_regions",
    "autotune",
    "autotune_enabled",
    "autotune_summary",
    "is_exporting",
    "mix_cells",
    "mix_kernels",
    "mixout_through_im2col",
    "mixture_conv2d",
    "per_sample_conv2d",
    "region_conv2d",
    "reset_autotune",
    "warehouse_conv2d",
]
