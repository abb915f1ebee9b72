"""Inputs that nn.Conv2d takes, every layer and op takes (an empty batch, the meta device, mixed
dtypes under autocast); what torch refuses, they refuse clearly (non-bool flags, a dtype other
than the layer's, a non-finite sample in the batch statistics of ODConv's attention)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynconv
import dynconv.layers
import dynconv.models
from dynconv import (
    DRConv2d,
    DynamicConv2d,
    KWConv2d,
    ODConv2d,
    Warehouse,
    create_conv2d,
    mixture_conv2d,
    per_sample_conv2d,
    region_conv2d,
)
from dynconv.functional import MIXTURE_METHODS, PER_SAMPLE_METHODS, REGION_METHODS
from dynconv.functional import per_sample as per_sample_module
from dynconv.layers.attention import ODConvAttention
from dynconv.layers.factory import conv_types
from dynconv.models.resnet import BasicBlock

GEOMETRY = {"stride": (1, 2), "padding": 1, "groups": 2}  # 4 -> 6 channels, 3x3 kernel
OD = {"head_init": "official"}  # random heads: attentions that differ between samples

# Every layer type and every path through it (a static fast path, each attention norm).
LAYERS = {
    "dynamic": lambda **kw: DynamicConv2d(4, 6, 3, **GEOMETRY, **kw),
    "dynamic-K1": lambda **kw: DynamicConv2d(4, 6, 3, **GEOMETRY, num_kernels=1, **kw),
    "condconv": lambda **kw: DynamicConv2d(4, 6, 3, **GEOMETRY, routing="sigmoid", **kw),
    "odconv-batch": lambda **kw: ODConv2d(4, 6, 3, **GEOMETRY, **OD, **kw),
    "odconv-layer": lambda **kw: ODConv2d(4, 6, 3, **GEOMETRY, attention_norm="layer", **OD,
                                          **kw),
    "odconv-none": lambda **kw: ODConv2d(4, 6, 3, **GEOMETRY, attention_norm="none", **OD,
                                         **kw),
    "odconv-1x1-K1": lambda **kw: ODConv2d(4, 6, 1, stride=2, groups=2, num_kernels=1, **OD,
                                           **kw),
    "drconv": lambda **kw: DRConv2d(4, 6, 3, **GEOMETRY, num_regions=4, **kw),
    "kw": lambda **kw: KWConv2d(4, 6, 3, **GEOMETRY, **kw),
    "kw-halves-layer": lambda **kw: KWConv2d(  # a warehouse of its own, on the layer's device
        4, 6, 3, **GEOMETRY, attention_norm="layer",
        warehouse=Warehouse(0.5, device=kw.get("device")), **kw),
}


def _methods(layer: nn.Module) -> tuple[str, ...]:
    if isinstance(layer, KWConv2d):  # its kernels are always assembled: the per-sample methods
        return tuple(m for m in PER_SAMPLE_METHODS if m != "direct")
    return REGION_METHODS if isinstance(layer, DRConv2d) else MIXTURE_METHODS


def _layer_cases():
    for name, build in LAYERS.items():
        for method in _methods(build()):
            yield pytest.param(build, method, id=f"{name}-{method}")


def _static_twin(layer: nn.Module, **kw) -> nn.Conv2d:
    """The nn.Conv2d of the same geometry."""
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation, layer.groups, padding_mode=layer.padding_mode,
                     **kw)


# -- an empty batch -----------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("build", "method"), _layer_cases())
def test_empty_batch_as_nn_conv2d_with_zero_gradients(build, method, train) -> None:
    """N = 0 gives nn.Conv2d's empty output, and every parameter that a batch of 2 trains gets
    a zero gradient of its shape (as nn.Conv2d's weight does), with every method."""
    torch.manual_seed(0)
    layer = build().train(train)
    layer.method = method
    layer(torch.randn(2, 4, 7, 9)).square().sum().backward()
    trained = {name for name, p in layer.named_parameters() if p.grad is not None}
    assert trained
    layer.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in layer.state_dict().items()}

    x = torch.randn(0, 4, 7, 9, requires_grad=True)
    out = layer(x)
    assert out.shape == _static_twin(layer)(x).shape
    out.square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        if name in trained:
            assert p.grad is not None, name
            assert p.grad.shape == p.shape and not p.grad.any(), name
    # an empty batch changes no state; the attention's BatchNorm counts it, as nn.BatchNorm2d
    bn = nn.BatchNorm2d(3).train(train)
    bn(torch.randn(0, 3, 1, 1))
    for key, value in layer.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value == state[key] + bn.num_batches_tracked
        else:
            assert torch.equal(value, state[key]), key


def test_empty_batch_every_op_and_method() -> None:
    """The ops on N = 0, each method (the property tests draw N = 0 too): F.conv2d's shape."""
    x = torch.randn(0, 4, 7, 9, requires_grad=True)
    expected = (0, 6, 7, 5)
    weight = torch.randn(0, 6, 2, 3, 3, requires_grad=True)
    for method in PER_SAMPLE_METHODS:
        out = per_sample_conv2d(x, weight, torch.randn(0, 6), **GEOMETRY, method=method)
        assert out.shape == expected, method
        out.sum().backward()
    bank = torch.randn(3, 6, 2, 3, 3, requires_grad=True)
    for method in MIXTURE_METHODS:
        for spatial in (None, torch.rand(0, 3, 3)):
            bank.grad = None
            out = mixture_conv2d(x, torch.rand(0, 3), bank, torch.randn(3, 6), **GEOMETRY,
                                 spatial=spatial, method=method)
            assert out.shape == expected, method
            out.sum().backward()
            assert bank.grad is not None and not bank.grad.any()
    kernels = torch.randn(0, 4, 6, 2, 3, 3, requires_grad=True)
    guide = torch.randn(0, 4, 7, 5, requires_grad=True)
    for method in REGION_METHODS:
        out = region_conv2d(x, kernels, guide, torch.randn(0, 4, 6), **GEOMETRY, method=method)
        assert out.shape == expected, method
        out.sum().backward()
        assert guide.grad is not None and guide.grad.shape == guide.shape


# -- the meta device ----------------------------------------------------------------------------


def _on_meta(build, how: str) -> nn.Module:
    if how == "moved":
        return build().to("meta")
    if how == "device=":
        return build(device="meta")
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize("how", ["moved", "device=", "context"])
@pytest.mark.parametrize(("build", "method"), _layer_cases())
def test_meta_device_gives_nn_conv2d_shapes(build, method, how) -> None:
    """A meta input (FLOP counters, building without memory) gives nn.Conv2d's output shape,
    forward and backward, in training and evaluation, for a layer moved to or built on meta."""
    layer = _on_meta(build, how)
    layer.method = method
    assert all(p.is_meta for p in layer.parameters())
    repr(layer)  # no value is read
    twin = _static_twin(layer, device="meta")
    for train in (True, False):
        layer.train(train)
        unbatched = [] if train else [(4, 7, 9)]  # (ODConv's BatchNorm: not a batch of 1)
        for shape in [(2, 4, 7, 9), (0, 4, 7, 9), *unbatched]:
            x = torch.empty(shape, device="meta", requires_grad=True)
            out = layer(x)
            assert out.is_meta and out.shape == twin(x).shape, shape
            out.sum().backward()
            assert x.grad.shape == x.shape
    with FlopCounterMode(display=False) as counter:
        layer(torch.empty(2, 4, 7, 9, device="meta"))
    assert counter.get_total_flops() > 0


def test_meta_device_every_op_and_method(monkeypatch) -> None:
    meta = {"device": "meta"}
    x = torch.empty(2, 4, 7, 9, **meta)
    expected = (2, 6, 7, 5)
    for method in PER_SAMPLE_METHODS[1:]:
        batch = 1 if method == "direct" else 2
        out = per_sample_conv2d(x[:batch], torch.empty(batch, 6, 2, 3, 3, **meta), **GEOMETRY,
                                method=method)
        assert out.is_meta and out.shape == (batch, *expected[1:]), method
    for method in MIXTURE_METHODS:
        out = mixture_conv2d(x, torch.empty(2, 3, **meta), torch.empty(3, 6, 2, 3, 3, **meta),
                             **GEOMETRY, spatial=torch.empty(2, 3, 3, **meta), method=method)
        assert out.is_meta and out.shape == expected, method
    for method in REGION_METHODS:  # 'restricted' sorts pixels by value: on meta, as 'dense'
        out = region_conv2d(x, torch.empty(2, 4, 6, 2, 3, 3, **meta),
                            torch.empty(2, 4, 7, 5, **meta), **GEOMETRY, method=method)
        assert out.is_meta and out.shape == expected, method
    # per-sample kernels recomputed in backward at any size (on meta, every storage is at
    # address 0: the hooks take every saved tensor for the kernels, whose shape they keep)
    monkeypatch.setattr(per_sample_module, "_RECOMPUTE_MIN_BYTES", 0)
    bank = torch.empty(3, 6, 2, 3, 3, **meta, requires_grad=True)
    x = torch.empty(2, 4, 7, 9, **meta, requires_grad=True)
    out = mixture_conv2d(x, torch.empty(2, 3, **meta), bank, **GEOMETRY,
                         spatial=torch.empty(2, 3, 3, **meta), method="aggregate")
    out.sum().backward()
    assert bank.grad.shape == bank.shape and x.grad.shape == x.shape


# -- autocast -----------------------------------------------------------------------------------

AUTOCASTS = [("cpu", torch.bfloat16), ("cpu", torch.float16),
             pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(
                 not torch.cuda.is_available(), reason="no GPU")),
             pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(
                 not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize(("device", "dtype"), AUTOCASTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("build", "method"), _layer_cases())
def test_layer_output_dtype_under_autocast_is_nn_conv2d_s(build, method, bias, device, dtype):
    """Under autocast every layer returns what nn.Conv2d returns: the autocast dtype, for a
    float32 input or one already in that dtype; a float64 layer stays float64 (autocast leaves
    float64 alone)."""
    torch.manual_seed(0)
    layer = build(bias=bias, device=device)
    layer.method = method
    twin = _static_twin(layer, bias=bias, device=device)
    for train in (True, False):
        layer.train(train)
        for x in (torch.randn(2, 4, 7, 9, device=device), torch.randn(2, 4, 7, 9, device=device,
                                                                     dtype=dtype)):
            with torch.autocast(device, dtype=dtype):
                out, expected = layer(x), twin(x)
            assert expected.dtype == dtype
            assert out.dtype == expected.dtype, (train, x.dtype)
            assert out.shape == expected.shape
    layer.double()
    with torch.autocast(device, dtype=dtype):
        out = layer(torch.randn(2, 4, 7, 9, device=device, dtype=torch.float64))
        assert out.dtype == twin.double()(torch.randn(1, 4, 7, 9, device=device,
                                                      dtype=torch.float64)).dtype


@pytest.mark.parametrize(("device", "dtype"), AUTOCASTS)
def test_op_output_dtype_under_autocast_is_f_conv2d_s(device, dtype) -> None:
    """The ops, every method, with a float32 bias, return F.conv2d's dtype under autocast."""
    f32 = {"device": device}
    x = torch.randn(2, 4, 7, 9, **f32)
    with torch.autocast(device, dtype=dtype):
        expected = nn.functional.conv2d(x, torch.randn(6, 2, 3, 3, **f32),
                                        torch.randn(6, **f32), **GEOMETRY).dtype
        assert expected == dtype
        for method in PER_SAMPLE_METHODS:
            batch = 1 if method == "direct" else 2
            out = per_sample_conv2d(x[:batch], torch.randn(batch, 6, 2, 3, 3, **f32),
                                    torch.randn(batch, 6, **f32), **GEOMETRY, method=method)
            assert out.dtype == expected, method
        for method in MIXTURE_METHODS:
            for spatial in (None, torch.rand(2, 3, 3, **f32)):
                out = mixture_conv2d(x, torch.rand(2, 3, **f32), torch.randn(3, 6, 2, 3, 3, **f32),
                                     torch.randn(3, 6, **f32), **GEOMETRY, spatial=spatial,
                                     method=method)
                assert out.dtype == expected, method
        for method in REGION_METHODS:
            out = region_conv2d(x, torch.randn(2, 4, 6, 2, 3, 3, **f32),
                                torch.randn(2, 4, 7, 5, **f32), torch.randn(2, 4, 6, **f32),
                                **GEOMETRY, method=method)
            assert out.dtype == expected, method


# -- booleans -----------------------------------------------------------------------------------


def _bool_parameters(fn) -> list[str]:
    """The parameters of ``fn`` declared bool (by annotation, or by a bool default)."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.annotation in ("bool", bool) or isinstance(p.default, bool)]


def _bool_argument_cases():
    """(name, builder, bool argument) for every public layer and model class and every conv
    type of create_conv2d, found by introspection: a new class or flag is covered without a new
    line (a new required argument needs one here)."""
    conv = {"in_channels": 4, "out_channels": 4, "kernel_size": 3}  # (through **kwargs too)
    required = {**conv, "num_kernels": 2, "block": BasicBlock, "layers": [1, 1, 1, 1],
                "num_classes": 3}
    for package in (dynconv.layers, dynconv.models):
        for name in package.__all__:
            cls = getattr(package, name)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                continue
            parameters = inspect.signature(cls).parameters
            more = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
            kw = {k: v for k, v in required.items() if k in parameters or (more and k in conv)}
            for arg in _bool_parameters(cls):
                yield f"{name}.{arg}", (lambda c=cls, kw=kw, **a: c(**kw, **a)), arg
    for conv_type in conv_types():
        builder = dynconv.layers.factory._REGISTRY[conv_type]
        for arg in {"bias", *_bool_parameters(builder)}:  # (create_conv2d's own: bias)
            yield (f"create_conv2d({conv_type!r}).{arg}",
                   lambda t=conv_type, **a: create_conv2d(t, 4, 4, 3, **a), arg)


BOOL_CASES = list(_bool_argument_cases())


def test_the_introspection_finds_every_known_flag() -> None:
    found = {case for case, _, _ in BOOL_CASES}
    assert {"DynamicConv2d.bias", "DynamicConv2d.attention_bias", "ODConv2d.bias",
            "DRConv2d.bias", "KernelBankConv.bias", "create_conv2d('static').bias",
            "create_conv2d('condconv').attention_bias", "ResNet.dynamic_stem",
            "ResNet.dynamic_downsample", "MobileNetV2.dynamic_stem"} <= found, found


@pytest.mark.parametrize("value", ["no", "False", 1, 0, None, torch.tensor(True)])
@pytest.mark.parametrize(("case", "build", "arg"), BOOL_CASES, ids=[c[0] for c in BOOL_CASES])
def test_bool_arguments_refuse_anything_but_a_bool(case, build, arg, value) -> None:
    with pytest.raises(TypeError, match=rf"{arg} must be a bool, got {value!r}".replace(
            "(", r"\(").replace(")", r"\)")):
        build(**{arg: value})
    for ok in (True, False):
        build(**{arg: ok})


# -- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_input_dtype_other_than_the_layer_s_is_refused_clearly(name) -> None:
    """As nn.Conv2d refuses it, but naming the layer and both dtypes; autocast still mixes."""
    layer = LAYERS[name]()
    cls = type(layer).__name__
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(2, 4, 7, 9, dtype=dtype)
        with pytest.raises(RuntimeError):
            _static_twin(layer)(x)  # torch refuses it too
        with pytest.raises(TypeError, match=rf"{cls}: the input is {dtype} but the layer is "
                                            r"torch\.float32"):
            layer(x)
    with pytest.raises(TypeError, match=f"{cls} expects a floating-point input, got dtype "
                                        "torch.uint8"):
        layer(torch.zeros(2, 4, 7, 9, dtype=torch.uint8))
    with pytest.raises(TypeError, match=rf"{cls}: the input is torch\.float32 but the layer is "
                                        r"torch\.float64"):
        layer.double()(torch.randn(4, 7, 9))
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # a bfloat16 or float16 input into float32 weights: autocast casts both
        for dtype in (torch.bfloat16, torch.float16):
            assert layer(torch.randn(2, 4, 7, 9, dtype=dtype)).dtype == torch.bfloat16
        # but not float64, and neither does it for nn.Conv2d
        x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
        with pytest.raises(RuntimeError):
            _static_twin(layer)(x)
        with pytest.raises(TypeError, match=rf"{cls}: the input is torch\.float64 but the layer "
                                            r"is torch\.float32.*autocast does not cast float64"):
            layer(x)


def test_ops_refuse_an_input_dtype_other_than_the_weight_s() -> None:
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"per_sample_conv2d: the input is torch\.float64 but "
                                        r"the weight is torch\.float32"):
        per_sample_conv2d(x, torch.randn(2, 6, 4, 3, 3))
    with pytest.raises(TypeError, match=r"mixture_conv2d: the input is torch\.float64 but the "
                                        r"bank is torch\.float32"):
        mixture_conv2d(x, torch.rand(2, 3), torch.randn(3, 6, 4, 3, 3))
    with pytest.raises(TypeError, match=r"region_conv2d: the input is torch\.float64 but the "
                                        r"weight is torch\.float32"):
        region_conv2d(x, torch.randn(2, 3, 6, 4, 3, 3), torch.randn(2, 3, 5, 7))


# -- a non-finite sample ------------------------------------------------------------------------


def _bad_batch(value: float) -> torch.Tensor:
    x = torch.randn(4, 4, 7, 9, generator=torch.Generator().manual_seed(1))
    x[2, 1, 3, 4] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_batchnorm_attention_refuses_a_non_finite_training_sample(value, monkeypatch) -> None:
    """Without the check, ODConv's attention BatchNorm turns one bad sample into a NaN batch
    and NaN running statistics (measured below); with it, the batch is refused with the layer
    and the sample named, and nothing is updated."""
    torch.manual_seed(0)
    layer = ODConv2d(4, 6, 3, **GEOMETRY).train()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"ODConv2d\(4, 6, kernel_size=\(3, 3\)\) in training "
                                         r"mode: sample\(s\) 2 of a batch of 4 .* non-finite"):
        layer(_bad_batch(value))
    for key, tensor in layer.state_dict().items():
        assert torch.equal(tensor, state[key]), key

    monkeypatch.setattr(ODConvAttention, "_check_finite", lambda self, h: None)
    out = layer(_bad_batch(value))  # what torch's BatchNorm makes of it
    assert not torch.isfinite(out).any()  # every sample, every value
    bn = layer.attention.bn
    assert not torch.isfinite(bn.running_mean).any() and not torch.isfinite(bn.running_var).any()


def test_the_finite_check_skips_meta_and_compiled_forwards() -> None:
    torch.manual_seed(0)
    layer = ODConv2d(4, 6, 3, **GEOMETRY).train()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # no graph break
    assert torch.isfinite(compiled(_bad_batch(0.0))).all()
    layer.to("meta")(torch.empty(4, 4, 7, 9, device="meta"))


BAD_SAMPLE_CASES = [
    ("dynamic", True), ("dynamic", False), ("condconv", True), ("drconv", True),
    ("drconv", False), ("odconv-batch", False), ("odconv-layer", True), ("odconv-layer", False),
    ("odconv-none", True), ("odconv-none", False),
]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(("name", "train"), BAD_SAMPLE_CASES)
def test_everywhere_else_a_bad_sample_stays_in_its_own_output(name, train, value) -> None:
    """What docs/layers.md says of a non-finite sample: outside the batch statistics of
    ODConv's attention BatchNorm in training, it spoils its own output only."""
    torch.manual_seed(0)
    layer = LAYERS[name]().train(train)
    x = _bad_batch(value)
    out = layer(x)
    assert not torch.isfinite(out[2]).all()
    good = [0, 1, 3]
    torch.testing.assert_close(out[good], layer(x[good]))
    for buffer in layer.buffers():
        assert torch.isfinite(buffer).all()


def test_batchnorm_attention_refuses_values_whose_sum_overflows() -> None:
    layer = ODConv2d(4, 6, 3, **GEOMETRY).train()
    with torch.no_grad():
        layer.attention.fc.weight.fill_(1e37)  # finite hidden features, an infinite sum
    with pytest.raises(ValueError, match="a batch of 4 reaches the BatchNorm of its attention "
                                         r"\(attention_norm='batch'\) with values so large"):
        layer(torch.rand(4, 4, 7, 9) + 1)
