"""ODConv2d against a per-sample reference built from its definition and the official layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import dynconv
from dynconv import ODConv2d
from dynconv.functional import MIXTURE_METHODS
from dynconv.testing import reference_odconv2d

from helpers import assert_same_outputs_and_grads, recomputing, saved_storages
from seed_layouts import OfficialODConv2d
from strategies import ConvConfig, conv_configs

F64 = torch.float64


def _layer(cfg: ConvConfig, **kwargs) -> ODConv2d:
    return ODConv2d(
        cfg.in_channels, cfg.out_channels, cfg.kernel_size, **cfg.conv_kwargs(), bias=cfg.bias,
        padding_mode=cfg.padding_mode, dtype=F64, **kwargs,
    )


def _randomize(layer: nn.Module, scale: float = 1.0) -> None:
    """Attention weights far from the initialisation, and non-trivial BatchNorm statistics, so
    that every attention is far from uniform and evaluation differs from training."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("attention."):
                p.normal_(0, scale)
        for m in layer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


@settings(max_examples=220)
@given(
    cfg=conv_configs(),
    pointwise=st.sampled_from([False, False, True]),
    num_kernels=st.integers(1, 4),
    min_channels=st.integers(2, 6),
    norm=st.sampled_from(["batch", "batch", "layer", "none"]),
    temperature=st.sampled_from([1.0, 0.5, 30.0]),
    train=st.booleans(),
    method=st.sampled_from(MIXTURE_METHODS),
    chunked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_matches_per_sample_reference(
    cfg, pointwise, num_kernels, min_channels, norm, temperature, train, method, chunked, seed
):
    if pointwise:  # 1x1 kernels, and with K = 1 the plain-convolution fast path
        cfg = dataclasses.replace(cfg, kernel_size=(1, 1))
    torch.manual_seed(seed)
    layer = _layer(cfg, num_kernels=num_kernels, min_channels=min_channels,
                   attention_norm=norm, temperature=temperature).train(train)
    layer.method = method  # every formulation of the mixture in turn
    _randomize(layer)
    x = torch.randn(cfg.batch, cfg.in_channels, cfg.height, cfg.width, dtype=F64)
    x.requires_grad_()
    if norm == "batch" and train and cfg.batch == 1:
        with pytest.raises(ValueError, match="attention_norm='layer'"):
            layer(x)
        return
    inputs = [x, *layer.parameters()]
    if chunked:  # the aggregate one sample a chunk, the attentions on its kernels or input
        with recomputing():
            assert_same_outputs_and_grads(lambda: layer(x), lambda: reference_odconv2d(layer, x),
                                          inputs)
        return
    assert_same_outputs_and_grads(lambda: layer(x), lambda: reference_odconv2d(layer, x), inputs)


@pytest.mark.parametrize("size", [12, 6])
def test_training_keeps_no_activation_weighted_by_an_attention(size: int) -> None:
    """With gradients, the layer keeps its input for backward, not the input weighted by the
    channel attention (recomputed) nor, at 12x12, the output before the filter attention (the
    attentions weight the per-sample kernels there). At 6x6, where a sample's kernels are
    larger than its output, the filter attention weights the output, which keeps that one
    activation-sized tensor: cheaper than a pass over the kernels."""
    torch.manual_seed(0)
    layer = ODConv2d(16, 16, 3, padding=1)
    layer.method = "aggregate"
    x = torch.randn(8, 16, size, size, requires_grad=True)
    with recomputing(chunk_bytes=2**30):
        saved = saved_storages(lambda: layer(x))
    activation = x.numel() * x.element_size()
    large = {ptr for ptr, nbytes in saved.items() if nbytes >= activation}
    extra = large - {t.untyped_storage().data_ptr() for t in (x, *layer.parameters())}
    assert len(extra) == (0 if size == 12 else 1), saved


# Every special case of the official layout, deterministically (the property test above draws
# them at random): (kwargs, heads present among filter/spatial/kernel).
SPECIAL_CASES = [
    (dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
     {"spatial_fc", "kernel_fc"}),  # depthwise: no filter head
    (dict(in_channels=6, out_channels=12, kernel_size=3, groups=6),
     {"filter_fc", "spatial_fc", "kernel_fc"}),  # depthwise multiplier 2: C_out != C_in
    (dict(in_channels=6, out_channels=4, kernel_size=1), {"filter_fc", "kernel_fc"}),  # 1x1
    (dict(in_channels=6, out_channels=4, kernel_size=1, num_kernels=1, stride=2),
     {"filter_fc"}),  # 1x1, K = 1: the fast path
    (dict(in_channels=6, out_channels=6, kernel_size=1, num_kernels=1, groups=6),
     set()),  # depthwise 1x1 with K = 1: channel attention only
    (dict(in_channels=6, out_channels=4, kernel_size=3, num_kernels=1, padding="same"),
     {"filter_fc", "spatial_fc"}),  # K = 1
    (dict(in_channels=6, out_channels=4, kernel_size=(3, 2), padding="same", dilation=(1, 2)),
     {"filter_fc", "spatial_fc", "kernel_fc"}),  # non-square, even kernel, 'same'
    (dict(in_channels=6, out_channels=9, kernel_size=3, stride=(2, 1), groups=3, bias=True,
          padding_mode="circular", padding=1), {"filter_fc", "spatial_fc", "kernel_fc"}),
]


@pytest.mark.parametrize("kwargs,heads", SPECIAL_CASES)
def test_special_cases_heads_and_outputs(kwargs, heads) -> None:
    torch.manual_seed(0)
    layer = ODConv2d(**kwargs, dtype=F64, min_channels=4)
    all_heads = {"filter_fc", "spatial_fc", "kernel_fc"}
    present = {h for h in all_heads if getattr(layer.attention, h) is not None}
    assert present == heads
    keys = {k.split(".")[1] for k in layer.state_dict() if k.startswith("attention.")}
    assert keys == {"fc", "bn", "channel_fc"} | heads
    assert layer.state_dict()["weight"].dim() == 5
    _randomize(layer)
    x = torch.randn(3, kwargs["in_channels"], 7, 8, dtype=F64, requires_grad=True)
    for train in (True, False):
        layer.train(train)
        assert_same_outputs_and_grads(
            lambda: layer(x), lambda: reference_odconv2d(layer, x), [x, *layer.parameters()]
        )


def test_hidden_width_follows_the_official_rule() -> None:
    assert ODConv2d(64, 64, 3).attention.fc.out_channels == 16  # max(int(64/16), 16)
    assert ODConv2d(512, 512, 3).attention.fc.out_channels == 32
    assert ODConv2d(512, 512, 3, reduction=0.25, min_channels=4).attention.fc.out_channels == 128
    assert ODConv2d(8, 8, 3, min_channels=3).attention.fc.out_channels == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2, num_kernels=3),
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, num_kernels=2,
             attention_norm="layer"),
        dict(in_channels=4, out_channels=6, kernel_size=1, num_kernels=1, bias=True),
        dict(in_channels=4, out_channels=4, kernel_size=(2, 3), num_kernels=1,
             attention_norm="none", padding="same"),
    ],
)
def test_gradcheck_input_and_every_parameter(kwargs) -> None:
    torch.manual_seed(0)
    layer = ODConv2d(**kwargs, min_channels=2, dtype=F64)
    _randomize(layer)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, 4, 4, 5, dtype=F64, requires_grad=True)

    def fn(x, *params):
        return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    for train in (True, False):
        layer.train(train)
        assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)
    layer.eval()  # the full (slow-mode) check, on the input only
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_planes=8, out_planes=12, kernel_size=3, padding=1, kernel_num=4),
        dict(in_planes=8, out_planes=8, kernel_size=3, stride=2, padding=1, groups=8,
             kernel_num=4),  # depthwise
        dict(in_planes=8, out_planes=12, kernel_size=3, padding=2, dilation=2, groups=2,
             kernel_num=1),
        dict(in_planes=8, out_planes=12, kernel_size=1, kernel_num=4),
        dict(in_planes=8, out_planes=12, kernel_size=1, kernel_num=1),  # fast path
        dict(in_planes=64, out_planes=32, kernel_size=3, padding=1, kernel_num=2),  # A = 16
    ],
)
def test_official_layout_state_dict_loads_and_matches(kwargs) -> None:
    torch.manual_seed(0)
    official = OfficialODConv2d(**kwargs).double()
    _randomize(official)
    ours = ODConv2d(
        kwargs["in_planes"], kwargs["out_planes"], kwargs["kernel_size"],
        stride=kwargs.get("stride", 1), padding=kwargs.get("padding", 0),
        dilation=kwargs.get("dilation", 1), groups=kwargs.get("groups", 1),
        num_kernels=kwargs["kernel_num"], temperature=5.0, dtype=F64,
    )
    assert set(ours.state_dict()) - {"temperature"} == set(official.state_dict())
    ours.load_state_dict(official.state_dict(), strict=True)
    assert float(ours.temperature) == 5.0  # absent from the official state_dict: kept
    ours.set_temperature(1.0)
    upstream = None
    for train, temperature in ((True, 1.0), (False, 1.0), (True, 3.0), (False, 3.0)):
        official.train(train)
        ours.train(train)
        official.update_temperature(temperature)
        ours.set_temperature(temperature)
        x = torch.randn(4, kwargs["in_planes"], 9, 8, dtype=F64, requires_grad=True)
        results = []
        for module in (official, ours):
            module.zero_grad()
            out = module(x)
            upstream = torch.randn_like(out) if upstream is None or upstream.shape != out.shape \
                else upstream
            (gx,) = torch.autograd.grad((out * upstream).sum(), x, retain_graph=True)
            (out * upstream).sum().backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            results.append((out.detach(), gx, grads))
        (out_o, gx_o, grads_o), (out_d, gx_d, grads_d) = results
        torch.testing.assert_close(out_d, out_o)
        torch.testing.assert_close(gx_d, gx_o)
        assert grads_d.keys() == grads_o.keys()
        for name in grads_o:
            torch.testing.assert_close(grads_d[name].reshape(grads_o[name].shape), grads_o[name],
                                       msg=lambda m, name=name: f"{name}: {m}")
    # both updated their BatchNorm statistics the same way in training
    for key, value in official.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_batch_one_in_training() -> None:
    layer = ODConv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match=r"batch of 1 in training mode.*attention_norm='layer'"):
        layer(x)
    with pytest.raises(ValueError, match="attention_norm"):
        layer(x[0])  # unbatched is a batch of 1
    layer.eval()
    assert layer(x).shape == (1, 4, 6, 6)
    for norm in ("layer", "none"):  # random heads: attentions that differ between samples
        layer = ODConv2d(4, 4, 3, padding=1, attention_norm=norm, head_init="official",
                         dtype=F64).train()
        x = torch.randn(4, 6, 6, dtype=F64)
        out = layer(x)
        assert out.shape == (4, 6, 6)
        torch.testing.assert_close(out, reference_odconv2d(layer, x[None])[0])
        torch.testing.assert_close(layer.eval()(x), out)  # no batch statistics anywhere
    assert "attention.norm.weight" in ODConv2d(4, 4, 3, attention_norm="layer").state_dict()
    assert "attention.fc.bias" in ODConv2d(4, 4, 3, attention_norm="none").state_dict()


@pytest.mark.parametrize("num_kernels", [1, 4])
def test_channels_last_model(num_kernels: int) -> None:
    torch.manual_seed(0)
    od = {"head_init": "official"}  # attentions that differ between samples
    model = nn.Sequential(
        ODConv2d(3, 8, 3, padding=1, num_kernels=num_kernels, **od), nn.BatchNorm2d(8),
        nn.ReLU(), ODConv2d(8, 8, 3, padding=1, groups=8, **od),
        ODConv2d(8, 4, 1, num_kernels=1, **od),
    ).double()
    x = torch.randn(4, 3, 10, 10, dtype=F64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model.state_dict()["0.weight"].shape == (num_kernels, 8, 3, 3, 3)
    assert model.state_dict()["4.weight"].shape == (1, 4, 8, 1, 1)


def test_temperature_per_layer_and_per_model_saved_and_optional() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ODConv2d(4, 4, 3), nn.ReLU(), dynconv.DynamicConv2d(4, 4, 3))
    assert dynconv.set_temperature(model, 30) == 2
    assert dynconv.get_temperature(model) == 30.0
    model[0].set_temperature(2)
    assert dynconv.temperatures(model) == {"0": 2.0, "2": 30.0}
    other = ODConv2d(4, 4, 3)
    other.load_state_dict(model[0].state_dict())
    assert float(other.temperature) == 2.0
    # the temperature divides every logit: a huge one flattens all four attentions
    _randomize(other, scale=2.0)
    other.eval().set_temperature(1e6)
    att = other.attentions(torch.randn(3, 4, 6, 6))
    for a, flat in ((att.channel, 0.5), (att.filter, 0.5), (att.spatial, 0.5), (att.kernel, 0.25)):
        torch.testing.assert_close(a, torch.full_like(a, flat), atol=1e-4, rtol=0)


def test_attention_runs_in_float32_under_autocast() -> None:
    layer = ODConv2d(8, 8, 3, padding=1, temperature=0.01, head_init="official").eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        att = layer.attentions(x)
        out = layer(x)
    assert all(a.dtype == torch.float32 for a in att)
    torch.testing.assert_close(att.kernel.sum(-1), torch.ones(2))
    assert torch.isfinite(out).all()


def test_drop_in_for_nn_conv2d_arguments_device_dtype_repr() -> None:
    layer = ODConv2d(4, 8, (3, 1), (2, 1), (1, 0), 1, 2, True, "reflect", "cpu", F64,
                     num_kernels=3, attention_norm="layer")
    assert layer.weight.dtype == F64 and layer.attention.fc.weight.dtype == F64
    assert layer.kernels.shape == (3, 8, 2, 3, 1) and layer.bias.shape == (3, 8)
    assert layer.attention.spatial_fc.out_channels == 3  # kH * kW
    text = repr(layer)
    for part in ("4, 8, kernel_size=(3, 1)", "stride=(2, 1)", "groups=2", "num_kernels=3",
                 "padding_mode='reflect'", "attention_norm='layer'", "min_channels=16"):
        assert part in text
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)
    assert layer(torch.randn(2, 4, 9, 9, dtype=F64)).shape == (2, 8, 5, 9)
    # official initialisation of the bank: Kaiming normal with fan_out = C_out * kH * kW
    big = ODConv2d(64, 128, 3, num_kernels=2)
    assert abs(big.weight.std().item() - (2 / (128 * 9)) ** 0.5) < 2e-3


def test_torch_compile_layer() -> None:
    torch.manual_seed(0)
    layer = ODConv2d(4, 6, 3, padding=1, head_init="official").eval()
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(layer, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel_size", "groups", "num_kernels", "bias"),
    [(4, 6, 3, 1, 4, True), (6, 6, 3, 6, 2, False), (4, 6, 1, 1, 1, True), (4, 4, 1, 2, 3, False)],
    ids=["full", "depthwise", "pointwise_k1", "grouped_1x1"],
)
def test_init_from_conv_matches_the_conv_at_the_attention_centre(
    c_in: int, c_out: int, kernel_size: int, groups: int, num_kernels: int, bias: bool
) -> None:
    """With every sigmoid attention at 0.5 (a huge temperature), the converted layer computes
    the static convolution; folding an affine map afterwards stays exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, groups=groups,
                     bias=bias, dtype=F64)
    layer = ODConv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, groups=groups,
                     bias=bias, num_kernels=num_kernels, temperature=1e12, head_init="official",
                     dtype=F64).eval()
    layer.init_from_conv(conv)
    x = torch.randn(3, c_in, 7, 7, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)
    layer.set_temperature(1.0)
    scale, shift = torch.rand(c_out, dtype=F64) + 0.5, torch.randn(c_out, dtype=F64)
    expected = layer(x) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    layer.fold_output_affine(scale, shift)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_heads_start_at_zero_so_every_attention_starts_at_its_centre(norm: str) -> None:
    """head_init='zero' (default): for any input, in training and evaluation and at any
    temperature, every sigmoid attention is 0.5 and the softmax 1/K; the heads learn from the
    first step. Everything else is the official initialisation, drawn from the same numbers."""
    torch.manual_seed(0)
    layer = ODConv2d(6, 8, 3, padding=1, attention_norm=norm, dtype=F64)
    torch.manual_seed(0)
    official = ODConv2d(6, 8, 3, padding=1, attention_norm=norm, head_init="official",
                        dtype=F64)
    heads = layer.attention.heads()
    assert [h.out_channels for h in heads] == [6, 8, 9, 4]
    for (name, p), q in zip(layer.named_parameters(), official.parameters(), strict=True):
        if name.endswith("_fc.weight"):
            assert not p.any() and q.abs().min() > 0, name
        else:
            assert torch.equal(p, q), name  # the bank, fc, the norm, the heads' zero biases
    x = torch.randn(5, 6, 7, 7, dtype=F64) * 3
    for train in (True, False):
        for temperature in (1.0, 30.0):
            layer.train(train).set_temperature(temperature)
            att = layer.attentions(x)
            for a, centre in ((att.channel, 0.5), (att.filter, 0.5), (att.spatial, 0.5),
                              (att.kernel, 0.25)):
                assert torch.equal(a, torch.full_like(a, centre))
    official.train().set_temperature(1.0)
    assert official.attentions(x).channel.std(0).min() > 0.01  # random per sample
    layer.train().set_temperature(1.0)
    layer(x).square().sum().backward()
    for head in heads:
        assert head.weight.grad.abs().min() > 0


def test_head_init_option_reset_repr_and_errors() -> None:
    torch.manual_seed(0)
    official = ODConv2d(64, 256, 3, head_init="official")
    fan_out = 256  # the filter head: Kaiming normal with fan_out = its outputs
    assert abs(official.attention.filter_fc.weight.std().item() - (2 / fan_out) ** 0.5) < 5e-3
    assert "head_init='official'" in repr(official)
    assert "head_init" not in repr(ODConv2d(4, 4, 3))
    official.reset_parameters()  # keeps the choice
    assert all(h.weight.abs().min() > 0 for h in official.attention.heads())
    layer = ODConv2d(4, 4, 3)
    _randomize(layer)
    layer.reset_parameters()
    assert all(not h.weight.any() and not h.bias.any() for h in layer.attention.heads())
    # a layer pickled before the option existed was initialised officially, and says so
    del layer.attention.head_init
    assert "head_init='official'" in repr(layer)
    for bad in ("kaiming", None):
        with pytest.raises(ValueError, match=r"head_init must be one of \('zero', 'official'\)"):
            ODConv2d(4, 4, 3, head_init=bad)
    with pytest.raises(ValueError, match="head_init"):
        dynconv.create_conv2d("odconv", 4, 4, 3, head_init="Zero")


def test_a_fresh_layer_from_init_from_conv_is_the_conv_exactly() -> None:
    """Its heads at zero, every attention sits at the centre init_from_conv scales for: the
    layer computes the static convolution, in training (BatchNorm attention) and evaluation."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, dtype=F64)
    layer = ODConv2d(6, 8, 3, padding=1, bias=True, dtype=F64)
    layer.init_from_conv(conv)
    x = torch.randn(4, 6, 7, 7, dtype=F64)
    for train in (True, False):
        torch.testing.assert_close(layer.train(train)(x), conv(x), rtol=1e-12, atol=1e-12)
