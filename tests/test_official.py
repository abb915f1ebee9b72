"""The reference code's checkpoints both ways (dynconv.tools.official), timm's CondConv, and the
reference code's spelling of the keywords."""

from __future__ import annotations

import inspect
from collections import OrderedDict

import pytest
import torch
from torch import nn

import dynconv
from dynconv import DRConv2d, DynamicConv2d, KernelBankConv, ODConv2d, load_checkpoint
from dynconv._conv_args import KEYWORD_SPELLINGS
from dynconv.functional import MIXTURE_METHODS
from dynconv.layers import RoutedConv2d
from dynconv.models import create_model, list_models
from dynconv.tools.official import (
    LAYOUTS,
    OfficialLoadResult,
    convert_timm_condconv,
    load_official,
    to_official_state_dict,
)

from seed_layouts import OfficialODConv2d, SeedDRConv2d, SeedDynamicConv2d

F64 = torch.float64


def _randomize(module: nn.Module) -> None:
    """Every parameter and BatchNorm statistic away from its initialisation (in place)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def _assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor, *args) -> None:
    torch.testing.assert_close(a(x, *args), b(x, *args), rtol=0, atol=1e-10)


# -- our layers -> the reference layout -> the reference module, and back ------------------------

# (our layer, the reference module, its layout)
_CASES = {
    "odconv": lambda: (
        ODConv2d(8, 12, 3, padding=1, num_kernels=4, dtype=F64),
        OfficialODConv2d(8, 12, 3, padding=1, kernel_num=4),
    ),
    "odconv-depthwise-1x1": lambda: (
        ODConv2d(8, 8, 1, groups=8, num_kernels=1, dtype=F64),
        OfficialODConv2d(8, 8, 1, groups=8, kernel_num=1),
    ),
    "dyconv-2020": lambda: (
        DynamicConv2d(8, 12, 3, padding=1, groups=2, dtype=F64),
        SeedDynamicConv2d(8, 12, 3, padding=1, groups=2, K=4, temperature=1),
    ),
    "dyconv-2022": lambda: (
        DynamicConv2d(8, 12, 3, padding=1, hidden_channels=3, attention_bias=True, dtype=F64),
        SeedDynamicConv2d(8, 12, 3, padding=1, K=4, temperature=1, fc2_bias=True, extra=1),
    ),
    "dyconv-2022-rgb": lambda: (
        DynamicConv2d(3, 8, 3, stride=2, bias=False, attention_bias=True, dtype=F64),
        SeedDynamicConv2d(3, 8, 3, stride=2, bias=False, K=4, temperature=1, fc2_bias=True,
                          extra=1),
    ),
    "drconv": lambda: (
        DRConv2d(6, 5, 3, padding=1, num_regions=4, dtype=F64),
        SeedDRConv2d(6, 5, 3, region_num=4, padding=1),
    ),
}


@pytest.mark.parametrize("case", sorted(_CASES))
@pytest.mark.parametrize("train", [False, True])
def test_round_trip_through_the_reference_module(case: str, train: bool) -> None:
    torch.manual_seed(0)
    ours, reference = _CASES[case]()
    reference = reference.double()
    _randomize(ours)
    layout = case.removesuffix("-rgb").removesuffix("-depthwise-1x1")
    # the reference module refuses our own state_dict: the temperature is not a tensor there
    with pytest.raises(RuntimeError, match=r"Unexpected key.*temperature"):
        reference.load_state_dict(ours.state_dict(), strict=True)
    state = to_official_state_dict(ours, layout=layout)
    assert "temperature" not in state
    reference.load_state_dict(state, strict=True)
    ours.train(train)
    reference.train(train)
    x = torch.randn(4, ours.in_channels, 9, 8, dtype=F64)
    _assert_same(ours, reference, x)
    # and back: the reference module's state_dict gives the same layer
    back = _CASES[case]()[0].train(train)
    back.load_state_dict(reference.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    _assert_same(ours, back, x)


def test_round_trip_of_a_network_keeps_the_other_modules() -> None:
    def network(odconv, dyconv, drconv) -> nn.Sequential:
        return nn.Sequential(OrderedDict(
            stem=nn.Conv2d(3, 8, 3, padding=1), bn=nn.BatchNorm2d(8), od=odconv, dy=dyconv,
            dr=drconv, pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 5),
        ))

    torch.manual_seed(1)
    ours = network(
        ODConv2d(8, 8, 3, padding=1, temperature=7.0),
        DynamicConv2d(8, 6, 3, padding=1, hidden_channels=3, attention_bias=True),
        DRConv2d(6, 6, 3, padding=1, num_regions=3),
    ).double()
    reference = network(
        OfficialODConv2d(8, 8, 3, padding=1),
        SeedDynamicConv2d(8, 6, 3, padding=1, temperature=1, fc2_bias=True, extra=1),
        SeedDRConv2d(6, 6, 3, region_num=3, padding=1),
    ).double()
    _randomize(ours)
    state = to_official_state_dict(ours)
    assert list(state) == [k for k in ours.state_dict() if not k.endswith("temperature")]
    reference.load_state_dict(state, strict=True)
    ours.eval()
    reference.eval()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    dynconv.set_temperature(ours, 1.0)  # the reference code's inference temperature
    _assert_same(ours, reference, x)
    # the reference training file loads back with load_checkpoint, module. prefix and all
    back = network(ODConv2d(8, 8, 3, padding=1),
                   DynamicConv2d(8, 6, 3, padding=1, hidden_channels=3, attention_bias=True),
                   DRConv2d(6, 6, 3, padding=1, num_regions=3)).double().eval()
    wrapped = {"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}
    assert load_checkpoint(back, wrapped).exact
    _assert_same(ours, back, x)


@pytest.mark.parametrize(
    "layer,match",
    [
        (ODConv2d(8, 8, 3, attention_norm="layer"), r"'odconv' layout.*attention_norm='layer'"),
        (ODConv2d(8, 8, 3, bias=True), r"'odconv' layout: it has a bias"),
        (ODConv2d(8, 8, (1, 3)), r"a non-square kernel \(1, 3\)"),
        (DynamicConv2d(8, 8, 3, routing="sigmoid"), r"routing='sigmoid'"),
        (DynamicConv2d(8, 8, 3, padding_mode="reflect"), r"padding_mode='reflect'"),
        (DynamicConv2d(3, 8, 3, hidden_channels=1), r"1 hidden attention channels on a "
                                                    r"3-channel input.*K = 4"),
        (DRConv2d(8, 8, 3, groups=2), r"groups=2"),
        (DRConv2d(8, 8, 3, bias=True), r"a bias"),
        (RoutedConv2d(8, 8, 3, padding_mode="circular"), r"padding_mode='circular'"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_what_the_reference_code_cannot_hold_is_refused_with_the_layer_named(layer, match):
    model = nn.Sequential(OrderedDict(head=nn.Conv2d(8, 8, 1), body=layer))
    with pytest.raises(ValueError, match=r"layer 'body': .*" + match):
        to_official_state_dict(model)


def test_layout_argument() -> None:
    model = nn.Sequential(ODConv2d(4, 4, 3), DynamicConv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"layer '0': ODConv2d fits the 'odconv' layout, not "
                                         r"'dyconv-2020'"):
        to_official_state_dict(model, layout="dyconv-2020")
    with pytest.raises(ValueError, match=r"unknown layout 'odconv2'; expected one of \["):
        to_official_state_dict(model, layout="odconv2")
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got dict"):
        to_official_state_dict({})
    assert set(to_official_state_dict(model)) == set(model.state_dict()) - {
        "0.temperature", "1.temperature"}
    assert set(LAYOUTS) == {"odconv", "dyconv-2020", "dyconv-2022", "drconv", "timm-condconv",
                            "kernelwarehouse"}


# -- the 2022 DY-Conv layout: hidden width K on an RGB stem ---------------------------------------


def _reference_dy_net(version: int) -> nn.Sequential:
    """A stem and a wider layer in a DY-Conv layout (2022: hidden int(C_in * 0.25) + 1, K for
    an RGB input, fc2 with bias; 2020: int(C_in * 0.25), K for RGB, no fc2 bias)."""
    extra, bias = (1, True) if version == 2022 else (0, False)
    return nn.Sequential(
        SeedDynamicConv2d(3, 8, 3, padding=1, K=4, temperature=1, fc2_bias=bias, extra=extra),
        nn.ReLU(),
        SeedDynamicConv2d(8, 12, 3, padding=1, K=4, temperature=1, fc2_bias=bias,
                          extra=extra),
    ).double()


def test_the_reference_code_uses_k_hidden_channels_on_an_rgb_input() -> None:
    state = _reference_dy_net(2022).state_dict()
    assert state["0.attention.fc1.weight"].shape[0] == 4  # K, not int(3 * 0.25) + 1 = 1
    assert state["2.attention.fc1.weight"].shape[0] == 3  # int(8 * 0.25) + 1


@pytest.mark.parametrize("c_in", [3, 8, 33])
def test_documented_2022_recipe_builds_the_layout(c_in: int) -> None:
    k = 4
    reference = SeedDynamicConv2d(c_in, 6, 3, K=k, temperature=1, fc2_bias=True, extra=1)
    # docs/layers.md: hidden_channels=(num_kernels if C_in == 3 else int(C_in * 0.25) + 1)
    hidden = k if c_in == 3 else int(c_in * 0.25) + 1
    layer = DynamicConv2d(c_in, 6, 3, num_kernels=k, hidden_channels=hidden,
                          attention_bias=True)
    layer.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("version", [2022, 2020])
def test_load_official_fits_the_attention_to_either_layout(tmp_path, version: int) -> None:
    torch.manual_seed(2)
    reference = _reference_dy_net(version)
    _randomize(reference)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               path)
    # a model built in the other layout: the defaults (2020), or the 2022 recipe
    bias = version == 2020
    ours = nn.Sequential(
        DynamicConv2d(3, 8, 3, padding=1, attention_bias=bias),
        nn.ReLU(),
        DynamicConv2d(8, 12, 3, padding=1, attention_bias=bias,
                      hidden_channels=3 if bias else None),
    ).double().eval()
    with pytest.raises(ValueError, match=r"size mismatch|missing|unexpected"):
        load_checkpoint(ours, path)  # as built, it does not fit
    result = load_official(ours, path)
    assert isinstance(result, OfficialLoadResult) and result.load.exact
    change = "added" if version == 2022 else "removed"
    assert result.refitted["0"] == f"attention rebuilt as in the checkpoint: attention.fc2 " \
                                   f"bias {change}"  # K hidden channels on RGB already
    width = "2 -> 3" if version == 2022 else "3 -> 2"
    assert result.refitted["2"] == (f"attention rebuilt as in the checkpoint: hidden channels "
                                    f"{width}, attention.fc2 bias {change}")
    assert "0: attention rebuilt" in str(result) and str(result).endswith("all keys matched")
    assert ours[2].attention.fc1.weight.dtype == F64 and not ours[2].attention.training
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    _assert_same(ours, reference, x)
    # exported back in the checkpoint's layout
    assert to_official_state_dict(ours, layout=f"dyconv-{version}").keys() == \
        reference.state_dict().keys()
    # a second load changes nothing
    assert load_official(ours, path).refitted == {}


def test_load_official_leaves_other_mismatches_to_the_load() -> None:
    reference = SeedDynamicConv2d(8, 12, 3, K=2, temperature=1, fc2_bias=True, extra=1)
    ours = DynamicConv2d(8, 12, 3, num_kernels=4)
    with pytest.raises(ValueError, match=r"size mismatch for weight"):
        load_official(ours, reference.state_dict())


def test_load_official_on_odconv_is_load_checkpoint() -> None:
    reference = OfficialODConv2d(8, 8, 3, padding=1).double()
    _randomize(reference)
    ours = ODConv2d(8, 8, 3, padding=1, dtype=F64).eval()
    result = load_official(ours, {"model": reference.state_dict()})
    assert result.refitted == {} and result.load.unwrapped == ("model",)
    _assert_same(ours, reference.eval(), torch.randn(2, 8, 6, 6, dtype=F64))


# -- timm's CondConv -------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    "kwargs,size",
    [
        (dict(in_channels=6, out_channels=10, kernel_size=1), (7, 7)),
        (dict(in_channels=8, out_channels=8, kernel_size=5, padding="", groups=8), (9, 8)),
        (dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding="same",
              bias=True), (9, 10)),  # TensorFlow 'SAME' at stride 2: padding by input size
        (dict(in_channels=6, out_channels=4, kernel_size=(3, 1), dilation=2, groups=2,
              bias=True), (8, 8)),
    ],
)
@pytest.mark.parametrize("method", MIXTURE_METHODS)
def test_routed_layer_matches_timm_condconv(kwargs, size, method) -> None:
    torch.manual_seed(3)
    theirs = timm.layers.CondConv2d(**kwargs, num_experts=3).double()
    model = nn.ModuleDict({"conv": theirs})
    reference = timm.layers.CondConv2d(**kwargs, num_experts=3).double()
    reference.load_state_dict(theirs.state_dict())
    assert convert_timm_condconv(model) == ["conv"]
    ours = model["conv"]
    assert isinstance(ours, RoutedConv2d) and ours.dynamic_padding == reference.dynamic_padding
    ours.method = method
    x = torch.randn(3, kwargs["in_channels"], *size, dtype=F64, requires_grad=True)
    routing = torch.rand(3, 3, dtype=F64, requires_grad=True)
    out, expected = ours(x, routing), reference(x, routing)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (x, routing, ours.weight))
    expected_grads = torch.autograd.grad((expected * upstream).sum(),
                                         (x, routing, reference.weight))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=1e-10)
    # timm's layout both ways
    assert to_official_state_dict(ours)["weight"].shape == reference.weight.shape
    reference.load_state_dict(to_official_state_dict(ours), strict=True)
    ours.load_state_dict(reference.state_dict(), strict=True)


def _timm_model(name: str) -> nn.Module:
    torch.manual_seed(4)
    model = timm.create_model(name, pretrained=False).double().eval()
    _randomize(model)
    with torch.no_grad():  # keep the activations of the random network at a sane scale
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(1 / m.weight[0].numel() ** 0.5)
            if isinstance(m, timm.layers.CondConv2d):  # [K, C_out * fan_in]
                m.weight.mul_(1 / (m.weight[0].numel() / m.out_channels) ** 0.5)
    return model


@pytest.mark.parametrize("name", ["efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_4e"])
def test_timm_efficientnet_cc_converted_and_back(name: str) -> None:
    reference = _timm_model(name)
    converted = timm.create_model(name, pretrained=False).double().eval()
    names = convert_timm_condconv(converted)
    assert len(names) == 24 and names[:3] == ["blocks.4.0.conv_pw", "blocks.4.0.conv_dw",
                                              "blocks.4.0.conv_pwl"]
    # timm's checkpoint (flattened CondConv weights) loads into the converted model
    assert load_checkpoint(converted, {"model": reference.state_dict()}).exact
    # 32 pixels: 2 at blocks.5.0.conv_dw (stride 2), which TensorFlow pads by 1 and 2
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-10)
        # back to timm's layout, which a fresh timm model takes with strict=True
        fresh = timm.create_model(name, pretrained=False).double().eval()
        fresh.load_state_dict(to_official_state_dict(converted, layout="timm-condconv"),
                              strict=True)
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-10)
    assert expected.std() > 0.01  # the random network's outputs are not washed out


def test_routed_layer_errors() -> None:
    layer = RoutedConv2d(4, 4, 3, num_kernels=2)
    x = torch.randn(3, 4, 6, 6)
    with pytest.raises(ValueError, match=r"routing_weights of shape \[N, K\] = \[3, 2\], got "
                                         r"\[3, 3\]"):
        layer(x, torch.rand(3, 3))
    assert layer(x[0], torch.rand(2)).shape == (4, 4, 4)  # unbatched: routing [K]
    with pytest.raises(ValueError, match=r"no temperature to set, got 2\.0"):
        dynconv.set_temperature(nn.Sequential(layer), 2.0)
    assert dynconv.set_temperature(nn.Sequential(layer), 1.0) == 1
    with pytest.raises(ValueError, match="padding must be 0"):
        RoutedConv2d(4, 4, 3, padding=1, dynamic_padding=True)
    with pytest.raises(ValueError, match="holds no timm CondConv2d"):
        convert_timm_condconv(nn.Sequential(nn.Conv2d(3, 3, 1)))
    macs = layer.macs((6, 6))
    assert macs.conv == 4 * 4 * 9 * 16 and macs.attention == 0 and macs.aggregation == 2 * 144
    # TensorFlow's padding: 3 x 3 outputs from 5 x 5 at stride 2, as the layer computes
    padded = RoutedConv2d(4, 4, 3, stride=2, num_kernels=2, dynamic_padding=True)
    assert padded(torch.randn(1, 4, 5, 5), torch.rand(1, 2)).shape == (1, 4, 3, 3)
    assert padded.macs((5, 5)).conv == 4 * 4 * 9 * 9


def test_a_converted_timm_block_is_counted() -> None:
    class Block(nn.Module):  # timm's CondConvResidual, reduced to its routing and one conv
        def __init__(self) -> None:
            super().__init__()
            self.routing_fn = nn.Linear(4, 2)
            self.conv = timm.layers.CondConv2d(4, 6, 3, padding=1, num_experts=2)

        def forward(self, x):
            routing = torch.sigmoid(self.routing_fn(x.mean((2, 3))))
            return self.conv(x, routing)

    block = Block()
    convert_timm_condconv(block)
    x = torch.randn(2, 4, 5, 5)
    kernel = 6 * 4 * 9
    assert dynconv.count_macs(block, x) == kernel * 25 + 2 * kernel + 4 * 2


# -- the reference code's spelling of the keywords ------------------------------------------------

_LAYERS = [DynamicConv2d, ODConv2d, DRConv2d, RoutedConv2d]


@pytest.mark.parametrize("layer_type", _LAYERS, ids=lambda t: t.__name__)
def test_every_layer_names_its_spelling_of_a_keyword(layer_type) -> None:
    taken = set(inspect.signature(layer_type).parameters)
    checked = 0
    for spellings in KEYWORD_SPELLINGS:
        own = [s for s in spellings if s in taken]
        if not own:
            continue
        for other in set(spellings) - taken:
            with pytest.raises(TypeError, match=rf"^{layer_type.__name__}\(\) got an unexpected "
                                                rf"keyword argument '{other}': use {own[0]}="):
                layer_type(8, 8, 3, **{other: 2})
            checked += 1
    assert checked >= 3  # the channels and the layer's own keywords, at least
    with pytest.raises(TypeError, match=r"conv type 'odconv' does not accept one of "
                                        r"\['kernel_num'\]: .*use num_kernels="):
        dynconv.create_conv2d("odconv", 8, 8, 3, kernel_num=2)


def test_a_layer_type_of_ones_own_is_checked_too() -> None:
    class Gated(KernelBankConv):
        def __init__(self, in_channels, out_channels, kernel_size, *, num_kernels=2):
            super().__init__(in_channels, out_channels, kernel_size, num_kernels=num_kernels)

    with pytest.raises(TypeError, match=r"Gated\(\) got .* 'kernel_num': use num_kernels="):
        Gated(4, 4, 3, kernel_num=2)
    assert Gated(4, 4, 3, num_kernels=3).num_kernels == 3


@pytest.mark.parametrize("name", list_models())
def test_every_model_names_the_keyword_to_use(name: str) -> None:
    if name.startswith("od_"):  # the official zoo keeps the official spelling
        cases = {"num_kernels": "use kernel_num=", "K": "use kernel_num=",
                 "ratio": "use reduction="}
    else:
        cases = {"kernel_num": "conv_kwargs={'num_kernels': ...}",
                 "num_kernels": "conv_kwargs={'num_kernels': ...}",
                 "region_num": "conv_kwargs={'num_regions': ...}",
                 "min_channel": "conv_kwargs={'min_channels': ...}"}
    for wrong, hint in cases.items():
        with pytest.raises(TypeError, match=rf"got an unexpected keyword argument '{wrong}': "
                                            rf".*{hint.replace('{', '.').replace('}', '.')}"):
            create_model(name, **{wrong: 2})
    # and through conv_kwargs, the layer names its own spelling
    if name.startswith("kw_"):  # KernelWarehouse layers have no kernel count at all
        with pytest.raises(TypeError, match=r"KWConv2d.* got an unexpected keyword argument "
                                            r"'kernel_num'"):
            create_model(name, conv_kwargs={"kernel_num": 2})
        return
    with pytest.raises(TypeError, match=r"'kernel_num': use num_kernels="):
        create_model(name, conv_type="odconv", conv_kwargs={"kernel_num": 2}) \
            if not name.startswith("od_") else create_model(name, conv_kwargs={"kernel_num": 2})
