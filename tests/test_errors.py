"""Bad arguments and inputs raise a clear TypeError/ValueError, never a cryptic torch error."""

from __future__ import annotations

import pytest
import torch

from dynconv import DynamicConv2d, ODConv2d, mixture_conv2d, per_sample_conv2d


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"in_channels": 6, "out_channels": 4, "groups": 4}, ValueError,
         r"in_channels \(6\) must be divisible by groups \(4\)"),
        ({"out_channels": 6, "groups": 4}, ValueError,
         r"out_channels \(6\) must be divisible by groups \(4\)"),
        ({"in_channels": 0}, ValueError, "in_channels must be positive, got 0"),
        ({"in_channels": 4.0}, TypeError, "in_channels must be an int, got 4.0"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be positive, got 0"),
        ({"kernel_size": (3, 3, 3)}, TypeError, "kernel_size must be an int or a pair"),
        ({"stride": -1}, ValueError, "stride must be positive"),
        ({"dilation": 0}, ValueError, "dilation must be positive"),
        ({"padding": -1}, ValueError, "padding must be >= 0, got -1"),
        ({"padding": "full"}, ValueError, "padding must be an int, a pair of ints, 'same'"),
        ({"padding": "same", "stride": 2}, ValueError,
         r"padding='same' is only supported with stride 1.*stride=\(2, 2\)"),
        ({"padding_mode": "mirror"}, ValueError, "padding_mode must be one of .* got 'mirror'"),
        ({"routing": "argmax"}, ValueError, "routing must be one of .* got 'argmax'"),
        ({"temperature": 0}, ValueError, "temperature must be a finite number > 0, got 0"),
        ({"temperature": -3}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number"),
        ({"num_kernels": 0}, ValueError, "num_kernels must be an int >= 1, got 0"),
        ({"reduction": 0}, ValueError, "reduction must be a finite number > 0"),
        ({"bias": "yes"}, TypeError, "bias must be a bool"),
        ({"hidden_channels": 0}, ValueError, "hidden_channels must be positive"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message) -> None:
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=message):
        DynamicConv2d(**args)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((4, 8), r"expects input of shape \[N, C, H, W\] or \[C, H, W\], got shape \[4, 8\]"),
        ((1, 2, 4, 8, 8), r"got shape \[1, 2, 4, 8, 8\]"),
        ((2, 3, 8, 8), r"expects 4 input channels, got input of shape \[2, 3, 8, 8\]"),
        ((2, 4, 2, 8), r"too small for kernel_size=\(3, 3\).*output would be 0x6"),
    ],
)
def test_bad_inputs_at_first_forward(shape, message) -> None:
    layer = DynamicConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, got list"):
        layer([1.0])


def test_per_sample_conv2d_errors() -> None:
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(2, 6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"holds 3 kernels but the input has batch size 2"):
        per_sample_conv2d(x, torch.randn(3, 6, 4, 3, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \[N, C_out, C_in/groups"):
        per_sample_conv2d(x, torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \[N, C_in, H, W\]"):
        per_sample_conv2d(x[0], w)
    with pytest.raises(ValueError, match=r"input has 4 channels but the kernels expect C_in = 2"):
        per_sample_conv2d(x, torch.randn(2, 6, 2, 3, 3))
    with pytest.raises(ValueError, match=r"C_out \(6\) must be divisible by groups \(4\)"):
        per_sample_conv2d(x, torch.randn(2, 6, 1, 3, 3), groups=4)
    with pytest.raises(ValueError, match=r"bias must have shape \[N, C_out\] = \[2, 6\]"):
        per_sample_conv2d(x, w, torch.randn(6))
    with pytest.raises(ValueError, match="padding='same' is only supported with stride 1"):
        per_sample_conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="method must be one of"):
        per_sample_conv2d(x, w, method="fft")
    with pytest.raises(ValueError, match=r"'direct' needs batch size 1 \(or an empty batch\), got"):
        per_sample_conv2d(x, w, method="direct")
    with pytest.raises(ValueError, match="too small"):
        per_sample_conv2d(x[..., :2, :], w)
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor"):
        per_sample_conv2d(x, None)


def test_mixture_conv2d_errors() -> None:
    x = torch.randn(2, 4, 8, 8)
    bank = torch.randn(3, 6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"coefficients must have shape \[N, K\] = \[2, 3\]"):
        mixture_conv2d(x, torch.randn(2, 4), bank)
    with pytest.raises(ValueError, match=r"bank must have shape \[K, C_out"):
        mixture_conv2d(x, torch.randn(2, 3), bank[0])
    with pytest.raises(ValueError, match=r"bias_bank must have shape \[K, C_out\] = \[3, 6\]"):
        mixture_conv2d(x, torch.randn(2, 3), bank, torch.randn(6))
    with pytest.raises(ValueError, match="method must be one of"):
        mixture_conv2d(x, torch.randn(2, 3), bank, method="loop")


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"in_channels": 6, "groups": 4}, ValueError,
         r"in_channels \(6\) must be divisible by groups \(4\)"),
        ({"kernel_size": (3, 0)}, ValueError, "kernel_size must be positive, got 0"),
        ({"padding": "same", "stride": 2}, ValueError, "padding='same' is only supported"),
        ({"num_kernels": 0}, ValueError, "num_kernels must be an int >= 1, got 0"),
        ({"num_kernels": 2.0}, ValueError, "num_kernels must be an int >= 1, got 2.0"),
        ({"reduction": -0.5}, ValueError, "reduction must be a finite number > 0, got -0.5"),
        ({"reduction": None}, TypeError, "reduction must be a number"),
        ({"min_channels": 0}, ValueError, "min_channels must be positive, got 0"),
        ({"min_channels": 2.5}, TypeError, "min_channels must be an int, got 2.5"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"attention_norm": "group"}, ValueError,
         r"attention_norm must be one of \('batch', 'layer', 'none'\), got 'group'"),
        ({"attention_norm": "layer", "min_channels": 1}, ValueError,
         "attention_norm='layer' normalises over the attention's 1 hidden channel"),
        ({"bias": 1}, TypeError, "bias must be a bool, got 1"),
        ({"padding_mode": "mirror"}, ValueError, "padding_mode must be one of"),
    ],
)
def test_odconv_bad_constructor_arguments(kwargs, error, message) -> None:
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=message):
        ODConv2d(**args)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((4, 8), r"expects input of shape \[N, C, H, W\] or \[C, H, W\], got shape \[4, 8\]"),
        ((2, 3, 8, 8), r"expects 4 input channels, got input of shape \[2, 3, 8, 8\]"),
        ((2, 4, 8, 1), r"too small for kernel_size=\(3, 3\).*output would be 6x-1"),
        ((1, 4, 8, 8), "batch of 1 in training mode.*attention_norm="),
    ],
)
def test_odconv_bad_inputs_at_first_forward(shape, message) -> None:
    layer = ODConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))
    with pytest.raises(TypeError, match=r"ODConv2d expects a torch\.Tensor, got list"):
        layer([1.0])
