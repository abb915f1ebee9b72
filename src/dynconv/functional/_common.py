"""What the three ops share: the input checks, export detection and memory formats."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._conv_args import ConvGeometry, Pair, parse_geometry


def shape_list(t: Tensor) -> list[int]:
    """The shape as a list, as error messages show it."""
    return list(t.shape)


def is_exporting() -> bool:
    """True while the caller is traced for export (ONNX, ``torch.export`` or TorchScript
    tracing): ``'auto'`` then dispatches to batch-agnostic formulations only."""
    return bool(
        torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    )


def check_shape(t: object, name: str, layout: str, expected: list[int], optional: bool = False
                ) -> None:
    """Raise unless ``t`` is a tensor of shape ``expected`` (``layout`` names its dimensions,
    e.g. ``'[N, C_out]'``), or ``None`` where ``optional``."""
    if (optional and t is None) or (isinstance(t, Tensor) and shape_list(t) == expected):
        return
    got = shape_list(t) if isinstance(t, Tensor) else type(t).__name__
    alternative = " or be None" if optional else ""
    raise ValueError(f"{name} must have shape {layout} = {expected}{alternative}, got {got}")


def check_input(x: Tensor) -> None:
    """Raise unless ``x`` is a 4-D tensor [N, C_in, H, W]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [N, C_in, H, W] (4-D), got shape {shape_list(x)}")


def pad_for_conv(x: Tensor, geometry: ConvGeometry) -> tuple[Tensor, Pair]:
    """Apply asymmetric ('same' with an even kernel) padding explicitly; return the conv padding."""
    padding = geometry.symmetric_padding
    if padding is None:
        return F.pad(x, geometry.pads), (0, 0)
    return x, padding


def check_conv(
    x: Tensor, c_out: int, c_in_g: int, kernel_size: Pair, stride, padding, dilation, groups
) -> tuple[ConvGeometry, Pair]:
    """Check the convolution arguments against the input; return the parsed geometry and the
    output size (H_out, W_out)."""
    geometry = parse_geometry(kernel_size, stride, padding, dilation, groups)
    c_in = x.shape[1]
    if c_in_g * geometry.groups != c_in:
        raise ValueError(
            f"input has {c_in} channels but the kernels expect C_in = {c_in_g} x groups "
            f"({geometry.groups}) = {c_in_g * geometry.groups}"
        )
    if c_out % geometry.groups:
        raise ValueError(f"C_out ({c_out}) must be divisible by groups ({geometry.groups})")
    return geometry, geometry.checked_output_size(x.shape[-2], x.shape[-1])


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` [N, C, H, W] is laid out channels_last (and not also contiguous)."""
    return (
        x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def match_memory_format(out: Tensor, x: Tensor) -> Tensor:
    """Return ``out`` in channels_last when ``x`` is, as ``nn.Conv2d`` does."""
    if is_channels_last(x):
        return out.contiguous(memory_format=torch.channels_last)
    return out
