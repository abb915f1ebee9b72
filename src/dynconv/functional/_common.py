"""What the three ops share: the input checks, export detection, autocast and memory formats."""

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


def values_are_readable(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values on the host: not on the meta device (no values),
    nor while compiled, traced or exported (a data-dependent branch would break the graph, or
    be baked into it)."""
    return not (t.is_meta or torch.compiler.is_compiling() or is_exporting())


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs convolutions in on ``device_type`` ('cpu', 'cuda', ...), or
    ``None`` when autocast is off there or the device has none (the meta device)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_like_conv(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` cast as autocast casts a convolution's inputs (floating-point ones other than
    float64 to the autocast dtype of their device), for formulations that autocast does not
    reach (custom autograd functions, ``out=`` products); unchanged when autocast is off."""
    first = next(t for t in tensors if t is not None)
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )


def check_input_dtype(x: Tensor, dtype: torch.dtype | None, caller: str,
                      what: str = "the layer") -> None:
    """Raise a ``TypeError`` naming ``caller`` and both dtypes unless ``x`` can go where ``what``
    (the layer's parameters, an op's weight) is of ``dtype``: a floating-point input of that
    dtype, or under autocast on ``x``'s device of another floating dtype, which autocast casts
    as it does for ``nn.Conv2d`` (float64 excepted: autocast leaves it alone). ``dtype`` None:
    any floating dtype. torch refuses the rest deep inside a kernel."""
    if x.dtype == dtype:
        return
    if not x.is_floating_point():
        raise TypeError(
            f"{caller} expects a floating-point input, got dtype {x.dtype} (convert it, e.g. "
            "x.float() / 255 for images stored as integers)"
        )
    if dtype is None:
        return
    autocast = autocast_dtype(x.device.type) is not None
    if autocast and torch.float64 not in (x.dtype, dtype):
        return
    remedy = ("autocast does not cast float64" if autocast
              else "or run under torch.autocast")
    raise TypeError(
        f"{caller}: the input is {x.dtype} but {what} is {dtype}; convert one to the other "
        f"(x.to({dtype}), or the module's .to({x.dtype})), {remedy}"
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


def check_kernels(t: object, name: str, layout: str, x: Tensor, caller: str) -> None:
    """Raise unless ``t`` is a 5-D tensor (``layout`` names its dimensions, e.g. ``'[K, C_out,
    C_in/groups, kH, kW]'``) whose dtype ``x`` can meet (:func:`check_input_dtype`)."""
    if not isinstance(t, Tensor) or t.dim() != 5:
        got = shape_list(t) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {layout}, got {got}")
    check_input_dtype(x, t.dtype, caller, f"the {name}")


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


def saved_tensor_hooks_active() -> bool:
    """Whether the caller's saved-tensor hooks (``save_on_cpu``, checkpointing) are in effect:
    the recomputed kernels' hooks would take precedence over them, and autotuning would run
    inside them. (torch has no public query; without this private one, assume none.)"""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None
