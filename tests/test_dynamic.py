"""DynamicConv2d (DY-Conv and CondConv) against a per-sample reference and the seed layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynconv
from dynconv import DynamicConv2d
from dynconv.functional import MIXTURE_METHODS
from dynconv.testing import reference_dynamic_conv2d

from helpers import assert_same_outputs_and_grads
from seed_layouts import SeedDynamicConv2d
from strategies import ConvConfig, conv_configs

F64 = torch.float64


def _layer(cfg: ConvConfig, num_kernels: int, routing: str, temperature: float = 1.0):
    return DynamicConv2d(
        cfg.in_channels, cfg.out_channels, cfg.kernel_size, **cfg.conv_kwargs(), bias=cfg.bias,
        padding_mode=cfg.padding_mode, num_kernels=num_kernels, routing=routing,
        temperature=temperature, dtype=F64,
    )


@settings(max_examples=200)
@given(
    cfg=conv_configs(),
    num_kernels=st.integers(1, 4),
    routing=st.sampled_from(["softmax", "sigmoid"]),
    temperature=st.sampled_from([1.0, 0.5, 30.0]),
    train=st.booleans(),
    method=st.sampled_from(MIXTURE_METHODS),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_matches_per_sample_reference(
    cfg, num_kernels, routing, temperature, train, method, seed
):
    torch.manual_seed(seed)
    layer = _layer(cfg, num_kernels, routing, temperature).train(train)
    layer.method = method  # every formulation of the mixture in turn
    with torch.no_grad():  # larger attention weights, so that the attention is far from uniform
        for p in layer.attention.parameters():
            p.normal_(0, 1.0)
    x = torch.randn(cfg.batch, cfg.in_channels, cfg.height, cfg.width, dtype=F64)
    x.requires_grad_()
    inputs = [x, *layer.parameters()]
    assert_same_outputs_and_grads(
        lambda: layer(x), lambda: reference_dynamic_conv2d(layer, x), inputs
    )


def test_gradcheck_small_layer() -> None:
    torch.manual_seed(0)
    for routing in ("softmax", "sigmoid"):
        layer = DynamicConv2d(4, 4, 3, padding=1, groups=2, num_kernels=3, routing=routing,
                              dtype=F64)
        x = torch.randn(2, 4, 5, 5, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,))


def test_one_kernel_with_softmax_is_a_static_convolution() -> None:
    layer = DynamicConv2d(4, 6, 3, padding=1, num_kernels=1, dtype=F64)
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(layer.kernels[0])
        conv.bias.copy_(layer.bias[0])
    x = torch.randn(3, 4, 7, 7, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.is_static
    assert not DynamicConv2d(4, 6, 3, num_kernels=1, routing="sigmoid").is_static


def test_unbatched_input_and_batch_one_train_and_eval() -> None:
    layer = DynamicConv2d(3, 5, 3, padding=1, dtype=F64)
    x = torch.randn(3, 8, 8, dtype=F64)
    for mode in (True, False):
        layer.train(mode)
        out = layer(x)
        assert out.shape == (5, 8, 8)
        torch.testing.assert_close(out, reference_dynamic_conv2d(layer, x[None])[0])


@pytest.mark.parametrize("num_kernels", [1, 4])
def test_channels_last_model(num_kernels: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        DynamicConv2d(3, 8, 3, padding=1, num_kernels=num_kernels), nn.BatchNorm2d(8),
        nn.ReLU(), DynamicConv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1),
    ).double()
    x = torch.randn(4, 3, 10, 10, dtype=F64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    # the state_dict keeps the 5-D reference layout after the conversion
    assert model.state_dict()["0.weight"].shape == (num_kernels, 8, 3, 3, 3)


def test_torch_compile_layer() -> None:
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,ratio,fc2_bias,extra", [(1, 0.25, False, 0), (2, 0.25, False, 0),
                                                           (4, 0.25, True, 1)])
def test_seed_state_dict_loads_and_matches(groups, ratio, fc2_bias, extra) -> None:
    torch.manual_seed(0)
    seed = SeedDynamicConv2d(8, 12, 3, ratio=ratio, padding=1, groups=groups, K=4,
                             temperature=31, fc2_bias=fc2_bias, extra=extra).double()
    hidden = int(8 * ratio) + extra
    layer = DynamicConv2d(8, 12, 3, padding=1, groups=groups, num_kernels=4, temperature=31,
                          hidden_channels=hidden if extra else None, attention_bias=fc2_bias,
                          dtype=F64)
    layer.load_state_dict(seed.state_dict(), strict=True)
    assert float(layer.temperature) == 31  # absent from the checkpoint: the layer's own kept
    x = torch.randn(3, 8, 9, 9, dtype=F64, requires_grad=True)
    upstream = torch.randn(3, 12, 9, 9, dtype=F64)
    out_seed, out = seed(x), layer(x)
    torch.testing.assert_close(out, out_seed)
    (gx_seed,) = torch.autograd.grad((out_seed * upstream).sum(), x)
    (gx,) = torch.autograd.grad((out * upstream).sum(), x)
    torch.testing.assert_close(gx, gx_seed)


def test_seed_rgb_stem_layout_loads() -> None:
    seed = SeedDynamicConv2d(3, 8, 3, K=4)
    layer = DynamicConv2d(3, 8, 3, num_kernels=4)
    layer.load_state_dict(seed.state_dict(), strict=True)
    assert layer.attention.fc1.out_channels == 4  # hidden = K for RGB inputs, as in the seed


def test_state_dict_round_trip_keeps_temperature() -> None:
    a = DynamicConv2d(4, 4, 3, temperature=12.0)
    b = DynamicConv2d(4, 4, 3)
    b.load_state_dict(a.state_dict())
    assert float(b.temperature) == 12.0
    torch.testing.assert_close(b.weight, a.weight)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(b(x), a(x))


def test_wrong_bank_shape_is_reported_clearly() -> None:
    layer = DynamicConv2d(4, 4, 3, num_kernels=4)
    other = DynamicConv2d(4, 4, 3, num_kernels=2)
    with pytest.raises(RuntimeError, match=r"expects \[K, C_out, C_in/groups, kH, kW\]"):
        layer.load_state_dict(other.state_dict())
    state = DynamicConv2d(4, 4, 3, num_kernels=4, bias=False).state_dict()
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"]


def test_attention_runs_in_float32_under_autocast() -> None:
    layer = DynamicConv2d(8, 8, 3, padding=1, temperature=0.01)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coefficients = layer.kernel_attention(x)
        out = layer(x)
    assert coefficients.dtype == torch.float32
    torch.testing.assert_close(coefficients.sum(-1), torch.ones(2))
    assert torch.isfinite(out).all()


def test_set_and_get_temperature_across_a_model() -> None:
    model = nn.Sequential(DynamicConv2d(3, 4, 3), nn.ReLU(), DynamicConv2d(4, 4, 3),
                          nn.Conv2d(4, 4, 1))
    assert dynconv.set_temperature(model, 30) == 2
    assert dynconv.get_temperature(model) == 30.0
    model[2].set_temperature(5)
    assert dynconv.temperatures(model) == {"0": 30.0, "2": 5.0}
    with pytest.raises(ValueError, match="different temperatures"):
        dynconv.get_temperature(model)
    with pytest.raises(ValueError, match="no dynamic layer"):
        dynconv.get_temperature(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="temperature"):
        dynconv.set_temperature(model, 0)


def test_temperature_changes_the_attention() -> None:
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 8, 3)
    with torch.no_grad():
        for p in layer.attention.parameters():
            p.normal_(0, 2)
    x = torch.randn(4, 8, 6, 6)
    sharp = layer.kernel_attention(x)
    layer.set_temperature(1000)
    flat = layer.kernel_attention(x)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.25), atol=1e-2, rtol=0)
    assert sharp.max() > 0.3


def test_drop_in_for_nn_conv2d_arguments_device_dtype_repr() -> None:
    layer = DynamicConv2d(4, 8, (3, 1), (2, 1), (1, 0), 1, 2, False, "reflect", "cpu",
                          torch.float64, num_kernels=3, routing="sigmoid")
    assert layer.weight.dtype == F64 and layer.attention.fc1.weight.dtype == F64
    assert layer.kernels.shape == (3, 8, 2, 3, 1)
    text = repr(layer)
    for part in ("4, 8, kernel_size=(3, 1)", "stride=(2, 1)", "groups=2", "padding_mode='reflect'",
                 "num_kernels=3", "bias=False", "routing='sigmoid'"):
        assert part in text
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)
    assert layer(torch.randn(2, 4, 9, 9, dtype=F64)).shape == (2, 8, 5, 9)


def test_forced_method_is_checked() -> None:
    layer = DynamicConv2d(4, 4, 3, padding=1)
    layer.method = "fast"
    with pytest.raises(ValueError, match="method must be one of"):
        layer(torch.randn(2, 4, 6, 6))
