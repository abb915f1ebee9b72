"""DRConv2d and region_conv2d against a per-pixel reference and the seed 003 layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import dynconv
from dynconv import DRConv2d, per_sample_conv2d, region_conv2d
from dynconv._conv_args import parse_geometry
from dynconv.functional import REGION_METHODS
from dynconv.functional.region import _choose_region_method
from dynconv.testing import (
    reference_drconv2d,
    reference_drconv_guide,
    reference_drconv_kernels,
    reference_per_sample_conv2d,
    reference_region_conv2d,
)

from helpers import assert_same_outputs_and_grads
from seed_layouts import SeedDRConv2d
from strategies import EMPTY_BATCH, ConvConfig, conv_configs

F64 = torch.float64
METHODS = [m for m in REGION_METHODS if m != "auto"]


def _region_tensors(cfg: ConvConfig, num_regions: int, gen: torch.Generator, ties: bool):
    geometry = parse_geometry(cfg.kernel_size, cfg.stride, cfg.padding, cfg.dilation, cfg.groups)
    h_out, w_out = geometry.output_size(cfg.height, cfg.width)
    n, r = cfg.batch, num_regions
    x = torch.randn(n, cfg.in_channels, cfg.height, cfg.width, dtype=F64, generator=gen)
    w = torch.randn(n, r, cfg.out_channels, cfg.in_channels // cfg.groups, *cfg.kernel_size,
                    dtype=F64, generator=gen)
    guide = torch.randn(n, r, h_out, w_out, dtype=F64, generator=gen)
    if ties:  # few distinct values: many pixels with two or more maximal logits
        guide = guide.round()
    b = torch.randn(n, r, cfg.out_channels, dtype=F64, generator=gen) if cfg.bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, guide, b)]


@settings(max_examples=150)
@given(
    cfg=conv_configs(max_batch=4, padding_modes=("zeros",)),
    num_regions=st.integers(1, 8),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(cfg=EMPTY_BATCH, num_regions=4, ties=False, seed=0)
def test_region_conv2d_matches_per_pixel_reference(cfg, num_regions, ties, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, w, guide, b = _region_tensors(cfg, num_regions, gen, ties)
    inputs = [t for t in (x, w, guide, b) if t is not None]
    kw = cfg.conv_kwargs()
    for method in REGION_METHODS:
        assert_same_outputs_and_grads(
            lambda m=method: region_conv2d(x, w, guide, b, **kw, method=m),
            lambda: reference_region_conv2d(x, w, guide, b, **kw),
            inputs,
        )


def _layer(cfg: ConvConfig, num_regions: int, temperature: float = 1.0) -> DRConv2d:
    layer = DRConv2d(
        cfg.in_channels, cfg.out_channels, cfg.kernel_size, **cfg.conv_kwargs(), bias=cfg.bias,
        padding_mode=cfg.padding_mode, num_regions=num_regions, temperature=temperature,
        dtype=F64,
    )
    with torch.no_grad():  # a sharper guide, so that regions differ from pixel to pixel
        layer.conv_guide.weight.normal_(0, 1.0)
    return layer


@settings(max_examples=150)
@given(
    cfg=conv_configs(max_batch=4),
    num_regions=st.integers(1, 8),
    temperature=st.sampled_from([1.0, 1.0, 0.5, 3.0]),
    train=st.booleans(),
    method=st.sampled_from(REGION_METHODS),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_matches_per_pixel_reference(cfg, num_regions, temperature, train, method, seed):
    torch.manual_seed(seed)
    layer = _layer(cfg, num_regions, temperature).train(train)
    layer.method = method
    x = torch.randn(cfg.batch, cfg.in_channels, cfg.height, cfg.width, dtype=F64)
    x.requires_grad_()
    inputs = [x, *layer.parameters()]
    assert_same_outputs_and_grads(lambda: layer(x), lambda: reference_drconv2d(layer, x), inputs)
    expected_map = reference_drconv_guide(layer, x).argmax(1)
    assert torch.equal(layer.last_region_map, expected_map)


@pytest.mark.parametrize("method", METHODS)
def test_guide_gradient_is_the_straight_through_softmax(method: str) -> None:
    gen = torch.Generator().manual_seed(3)
    n, r, c_in, c_out = 2, 5, 4, 6
    x = torch.randn(n, c_in, 7, 6, dtype=F64, generator=gen)
    w = torch.randn(n, r, c_out, c_in // 2, 3, 3, dtype=F64, generator=gen)
    b = torch.randn(n, r, c_out, dtype=F64, generator=gen)
    guide = torch.randn(n, r, 7, 6, dtype=F64, generator=gen, requires_grad=True)
    upstream = torch.randn(n, c_out, 7, 6, dtype=F64, generator=gen)
    out = region_conv2d(x, w, guide, b, padding=1, groups=2, method=method)
    (grad_guide,) = torch.autograd.grad((out * upstream).sum(), guide)
    # g[n, r] = sum_o upstream[n, o] * (output of region r's kernel and bias)
    scores = torch.stack(
        [(upstream * reference_per_sample_conv2d(x, w[:, i], b[:, i], 1, 1, 1, 2)).sum(1)
         for i in range(r)], 1,
    )
    s = guide.detach().softmax(1)
    expected = s * (scores - (s * scores).sum(1, keepdim=True))
    torch.testing.assert_close(grad_guide, expected, rtol=1e-10, atol=1e-10)
    assert grad_guide.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_argmax_ties_go_to_the_lowest_region(method: str) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 5, dtype=F64, generator=gen)
    w = torch.randn(2, 4, 2, 3, 3, 3, dtype=F64, generator=gen)
    guide = torch.zeros(2, 4, 5, 5, dtype=F64)
    guide[:, 1:3] = 2.0  # regions 1 and 2 tie everywhere, above 0 and 3
    guide[1, :, 0, 0] = 0.0  # a four-way tie at one pixel of sample 1
    out = region_conv2d(x, w, guide, padding=1, method=method)
    expected = per_sample_conv2d(x, w[:, 1], padding=1)
    expected[1, :, 0, 0] = per_sample_conv2d(x, w[:, 0], padding=1)[1, :, 0, 0]
    torch.testing.assert_close(out, expected)


def test_layer_ties_and_region_map() -> None:
    layer = DRConv2d(3, 4, 3, padding=1, num_regions=4, dtype=F64)
    with torch.no_grad():  # a constant guide: every region ties at every pixel
        layer.conv_guide.weight.zero_()
        layer.conv_guide.bias.fill_(0.5)
    x = torch.randn(2, 3, 6, 5, dtype=F64)
    out = layer(x)
    assert layer.last_region_map.shape == (2, 6, 5)
    assert layer.last_region_map.dtype == torch.int64
    assert not layer.last_region_map.any()  # region 0 everywhere
    kernels = layer.region_kernels(x)
    torch.testing.assert_close(out, per_sample_conv2d(x, kernels[:, 0], padding=1))


@pytest.mark.parametrize("bias", [False, True])
def test_one_region_is_a_per_sample_dynamic_convolution(bias: bool) -> None:
    torch.manual_seed(0)
    layer = DRConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias, num_regions=1,
                     dtype=F64)
    x = torch.randn(3, 4, 9, 8, dtype=F64, requires_grad=True)
    inputs = [x, *layer.parameters()]

    def per_sample():
        kernels = reference_drconv_kernels(layer, x)[:, 0]
        biases = None if layer.bias is None else layer.bias.expand(3, -1)
        return per_sample_conv2d(x, kernels, biases, stride=2, padding=1, groups=2)

    assert_same_outputs_and_grads(lambda: layer(x), per_sample, inputs)
    layer(x).sum().backward()
    assert not layer.conv_guide.weight.grad.any()  # one region: the guide cannot matter


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "kernel_size,conv_kwargs",
    [(3, {"padding": 1}), (3, {"stride": 2, "padding": 2, "dilation": 2}), (1, {})],
)
def test_seed_state_dict_loads_and_matches(train, kernel_size, conv_kwargs) -> None:
    torch.manual_seed(0)
    seed = SeedDRConv2d(6, 5, kernel_size, region_num=4, **conv_kwargs).double().train(train)
    with torch.no_grad():
        seed.conv_guide.weight.normal_()
    layer = DRConv2d(6, 5, kernel_size, **conv_kwargs, num_regions=4, dtype=F64).train(train)
    layer.load_state_dict(seed.state_dict(), strict=True)
    assert set(dict(layer.named_parameters())) == set(dict(seed.named_parameters()))
    x = torch.randn(3, 6, 11, 10, dtype=F64, requires_grad=True)
    upstream = None
    results = []
    for module in (seed, layer):
        out = module(x)
        upstream = torch.randn_like(out) if upstream is None else upstream
        names, params = zip(*sorted(module.named_parameters()), strict=True)
        grads = torch.autograd.grad((out * upstream).sum(), (x, *params))
        results.append((out, dict(zip(("x", *names), grads, strict=True))))
    (out_seed, grads_seed), (out, grads) = results
    torch.testing.assert_close(out, out_seed)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_seed[name], msg=lambda m, n=name: f"{n}: {m}")
    assert grads["conv_guide.weight"].abs().sum() > 0
    # the map the seed used is the one the layer reports
    assert torch.equal(layer.last_region_map, seed.conv_guide(x).argmax(1))


def test_gradcheck_small_cases() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 5, 4, dtype=F64, generator=gen, requires_grad=True)
    w = torch.randn(2, 3, 6, 2, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    b = torch.randn(2, 3, 6, dtype=F64, generator=gen, requires_grad=True)
    guide = torch.randn(2, 3, 3, 3, dtype=F64, generator=gen)  # fixed: argmax has no derivative
    for method in METHODS:
        assert torch.autograd.gradcheck(
            lambda x, w, b, m=method: region_conv2d(
                x, w, guide, b, stride=(1, 2), padding=1, dilation=(2, 1), groups=2, method=m
            ),
            (x, w, b),
        )


@pytest.mark.parametrize("method", REGION_METHODS)
def test_channels_last_and_unbatched_inputs(method: str) -> None:
    torch.manual_seed(1)
    layer = DRConv2d(8, 4, 3, padding=1, num_regions=3, dtype=F64)
    layer.method = method
    x = torch.randn(3, 8, 7, 6, dtype=F64)
    expected = reference_drconv2d(layer, x)
    out = layer(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    single = layer(x[1])
    torch.testing.assert_close(single, expected[1])
    assert layer.last_region_map.shape == (7, 6)


def test_regions_start_equal_at_twice_he_scale() -> None:
    """Every region's kernel starts as the first one's (so the guide's split changes nothing
    yet), with about twice He's standard deviation; training then pulls the regions apart."""
    torch.manual_seed(0)
    for c, regions in ((64, 8), (16, 2)):
        layer = DRConv2d(c, c, 3, padding=1, num_regions=regions)
        kernels = layer.region_kernels(torch.randn(4, c, 12, 12))
        torch.testing.assert_close(kernels, kernels[:, :1].expand_as(kernels), rtol=0, atol=0)
        ratio = kernels.std() / math.sqrt(2 / (c * 9))
        assert 1.5 < ratio < 2.5, (c, regions, ratio)
    layer = DRConv2d(8, 8, 3, padding=1, num_regions=4)
    layer(torch.randn(2, 8, 6, 6)).square().sum().backward()
    grad = layer.conv_kernel[3].weight.grad.reshape(4, -1)
    assert all(not torch.allclose(grad[0], grad[r]) for r in range(1, 4))  # they move apart


def test_dispatch_rule() -> None:
    def choose(c, size, regions, groups=1, k=3):
        weight = torch.empty(2, regions, c, c // groups, k, k)
        return _choose_region_method(weight, parse_geometry(k, 1, 1, 1, groups), size * size)

    assert choose(64, 32, 8) == "restricted"  # ResNet-like
    assert choose(128, 80, 8, k=1) == "restricted"  # YOLO-like 1x1
    assert choose(256, 8, 8) == "restricted"  # wide, small maps
    assert choose(64, 32, 2) == "dense"  # two regions: the dense way wastes only half
    assert choose(64, 32, 8, groups=64) == "dense"  # depthwise: tiny products per region
    assert choose(64, 32, 8, groups=4) == "dense"  # one product per group: 16 x 16 channels
    assert choose(32, 16, 8) == "dense"  # small layer: the loop over regions dominates
    assert choose(64, 32, 1) == "dense"


def test_autocast_runs_and_keeps_regions_exact() -> None:
    torch.manual_seed(0)
    layer = DRConv2d(8, 8, 3, padding=1, num_regions=4)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    for method in METHODS:
        layer.method = method
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_state_dict_round_trip_repr_and_temperature() -> None:
    a = DRConv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=2, bias=True,
                 padding_mode="reflect", num_regions=3, temperature=5.0)
    b = DRConv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=2, bias=True,
                 padding_mode="reflect", num_regions=3)
    b.load_state_dict(a.state_dict())
    assert float(b.temperature) == 5.0
    x = torch.randn(2, 4, 9, 5)
    torch.testing.assert_close(b(x), a(x))
    assert b(x).shape == (2, 6, 5, 5)
    assert a.conv_kernel[3].weight.shape == (3 * 6 * 2, 3, 1, 1)
    text = repr(a)
    for part in ("4, 6, kernel_size=(3, 1)", "groups=2", "num_regions=3", "bias=True",
                 "padding_mode='reflect'"):
        assert part in text
    assert dynconv.set_temperature(nn.Sequential(a, nn.ReLU()), 2.0) == 1


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"num_regions": 0}, ValueError, "num_regions must be positive, got 0"),
        ({"num_regions": 2.0}, TypeError, "num_regions must be an int, got 2.0"),
        ({"num_regions": True}, TypeError, "num_regions must be an int, got True"),
        ({"bias": 1}, TypeError, "bias must be a bool, got 1"),
        ({"groups": 3}, ValueError, r"in_channels \(4\) must be divisible by groups \(3\)"),
        ({"padding": "same", "stride": 2}, ValueError, "padding='same' is only supported"),
        ({"padding_mode": "mirror"}, ValueError, "padding_mode must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        DRConv2d(**{"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs})


def test_bad_inputs_and_method() -> None:
    layer = DRConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r"expects 4 input channels, got input of shape"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"too small for kernel_size=\(3, 3\)"):
        layer(torch.randn(2, 4, 2, 8))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor"):
        layer(None)
    layer.method = "fast"
    with pytest.raises(ValueError, match=r"one of \('auto', 'dense', 'restricted'\), got 'fast'"):
        layer(torch.randn(2, 4, 8, 8))


def test_region_conv2d_errors() -> None:
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(2, 3, 6, 4, 3, 3)
    guide = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"weight must have shape \[N, R, C_out, C_in/groups"):
        region_conv2d(x, w[:, 0], guide)
    with pytest.raises(ValueError, match=r"kernels for 3 samples but the input has batch size 2"):
        region_conv2d(x, torch.randn(3, 3, 6, 4, 3, 3), guide)
    with pytest.raises(ValueError, match=r"guide must have shape \[N, R, H_out, W_out\] = "
                                         r"\[2, 3, 6, 6\], got \[2, 3, 8, 8\]"):
        region_conv2d(x, w, torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="guide must hold floating-point logits, got dtype"):
        region_conv2d(x, w, guide.argmax(1, keepdim=True).expand(2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"bias must have shape \[N, R, C_out\] = \[2, 3, 6\]"):
        region_conv2d(x, w, guide, torch.randn(6))
    with pytest.raises(ValueError, match=r"kernels expect C_in = 4 x groups \(2\)"):
        region_conv2d(x, w, guide, groups=2)
    with pytest.raises(ValueError, match="method must be one of"):
        region_conv2d(x, w, guide, method="sorted")
    with pytest.raises(ValueError, match=r"x must have shape \[N, C_in, H, W\]"):
        region_conv2d(x[0], w, guide)


def test_region_conv2d_is_exact_against_a_dense_selection_in_float32() -> None:
    # A larger case than the property tests, in the dtype of training: both methods agree with
    # choosing each pixel's region from every region's output.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 16, 20, 18, generator=gen)
    w = torch.randn(3, 8, 24, 16, 3, 3, generator=gen) * 0.1
    guide = torch.randn(3, 8, 10, 9, generator=gen)
    everywhere = torch.stack(
        [per_sample_conv2d(x, w[:, r], stride=2, padding=1) for r in range(8)], 1
    )
    expected = everywhere.gather(1, guide.argmax(1)[:, None, None].expand(3, 1, 24, 10, 9))
    for method in METHODS:
        out = region_conv2d(x, w, guide, stride=2, padding=1, method=method)
        torch.testing.assert_close(out, expected[:, 0], rtol=1e-5, atol=1e-5)
    assert F.mse_loss(expected[:, 0], everywhere[:, 0]) > 0  # the regions do differ


def test_torch_compile_takes_the_dense_path() -> None:
    torch.manual_seed(0)
    layer = DRConv2d(4, 6, 3, padding=1, num_regions=4)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert x.grad is not None and layer.conv_guide.weight.grad is not None
