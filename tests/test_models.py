"""Models: every conv type builds and trains a step; layouts and parameter counts are official."""

from __future__ import annotations

import pytest
import torch
import torchvision

import dynconv
from dynconv.layers.factory import conv_types, create_conv2d, register_conv
from dynconv.models import create_model, list_models

TYPES = ["static", "dynamic", "condconv", "odconv", "drconv"]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_type_is_registered() -> None:
    assert set(TYPES) <= set(conv_types())


@pytest.mark.parametrize("conv_type", TYPES)
@pytest.mark.parametrize(
    "name,kwargs,size",
    [("resnet18", {"stem": "cifar"}, 16), ("resnet50", {}, 32),
     ("mobilenet_v2", {"width_mult": 0.5}, 32)],
)
def test_model_builds_and_trains_a_step(conv_type, name, kwargs, size) -> None:
    torch.manual_seed(0)
    if conv_type == "drconv":  # R * R * C_in * C_out generator weights per layer: keep R small
        kwargs = {**kwargs, "conv_kwargs": {"num_regions": 2}}
    model = create_model(name, conv_type=conv_type, num_classes=7, **kwargs)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if conv_type != "static":
        assert dynconv.dynamic_layers(model)


@pytest.mark.parametrize(
    "ours,theirs",
    [(lambda: dynconv.models.resnet18(), torchvision.models.resnet18),
     (lambda: dynconv.models.resnet50(), torchvision.models.resnet50),
     (lambda: dynconv.models.mobilenet_v2(), torchvision.models.mobilenet_v2)],
)
def test_static_models_have_torchvision_layout(ours, theirs) -> None:
    a, b = ours(), theirs()
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [
        (k, v.shape) for k, v in b.state_dict().items()
    ]
    a.load_state_dict(b.state_dict())
    a.eval(), b.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize(
    "name,kernel_num,millions",
    [
        ("resnet18", None, 11.69), ("od_resnet18", 1, 11.94), ("od_resnet18", 4, 44.90),
        ("resnet50", None, 25.56), ("od_resnet50", 1, 28.64), ("od_resnet50", 4, 90.67),
        ("mobilenet_v2", None, 3.50), ("od_mobilenetv2_100", 1, 4.94),
        ("od_mobilenetv2_100", 4, 11.51),
        # the rest of the official table
        ("resnet101", None, 44.55), ("od_resnet101", 1, 50.82), ("od_resnet101", 2, 90.44),
        ("od_mobilenetv2_050", 1, 2.43), ("od_mobilenetv2_050", 4, 4.44),
    ],
)
def test_parameter_counts_match_the_official_table(name, kernel_num, millions) -> None:
    kwargs = {} if kernel_num is None else {"kernel_num": kernel_num}
    assert round(_count(create_model(name, **kwargs)) / 1e6, 2) == millions


def test_mobilenet_v2_050_static_count() -> None:
    assert round(_count(create_model("mobilenet_v2", width_mult=0.5)) / 1e6, 2) == 1.97


def test_od_resnet18_keys_follow_the_official_layout() -> None:
    state = create_model("od_resnet18", kernel_num=4).state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)  # static stem
    assert state["layer1.0.conv1.weight"].shape == (4, 64, 64, 3, 3)
    assert state["layer1.0.conv1.attention.fc.weight"].shape == (16, 64, 1, 1)
    assert state["layer1.0.conv1.attention.spatial_fc.weight"].shape == (9, 16, 1, 1)
    assert state["layer1.0.conv1.attention.kernel_fc.weight"].shape == (4, 16, 1, 1)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)  # static shortcut
    assert state["fc.weight"].shape == (1000, 512)
    one = create_model("od_resnet18").state_dict()
    assert "layer1.0.conv1.attention.kernel_fc.weight" not in one  # no kernel head for K = 1


def test_od_mobilenetv2_keys_follow_the_official_layout() -> None:
    state = create_model("od_mobilenetv2_100").state_dict()
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)  # static stem
    assert state["features.1.conv.0.0.weight"].shape == (1, 32, 1, 3, 3)  # depthwise ODConv
    assert "features.1.conv.0.0.attention.filter_fc.weight" not in state  # depthwise: no filter
    assert "features.2.conv.0.0.attention.spatial_fc.weight" not in state  # 1x1: no spatial
    assert state["features.18.0.weight"].shape == (1, 1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)


def test_resnet_options() -> None:
    cifar = dynconv.models.resnet18("dynamic", stem="cifar", dynamic_stem=True,
                                    dynamic_downsample=True, conv_kwargs={"num_kernels": 2})
    assert isinstance(cifar.conv1, dynconv.DynamicConv2d) and cifar.conv1.num_kernels == 2
    assert isinstance(cifar.layer2[0].downsample[0], dynconv.DynamicConv2d)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert cifar(torch.randn(2, 3, 8, 8)).shape == (2, 1000)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown conv type 'deform'; expected one of"):
        create_model("resnet18", conv_type="deform")
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'; expected one of"):
        create_model("resnet19")
    with pytest.raises(ValueError, match="width_mult must be a number > 0"):
        create_model("mobilenet_v2", width_mult=0)
    with pytest.raises(ValueError, match="stem must be 'imagenet' or 'cifar'"):
        create_model("resnet18", stem="tiny")
    with pytest.raises(TypeError, match="conv type 'static' does not accept"):
        create_conv2d("static", 3, 4, 3, num_kernels=4)
    with pytest.raises(ValueError, match="already registered"):
        register_conv("static", torch.nn.Conv2d)
    assert "od_resnet18" in list_models()


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_small_cnn_stem_stride_halves_every_later_map(stem_stride) -> None:
    model = create_model("small_cnn", conv_type="dynamic", in_channels=1, stem_stride=stem_stride)
    seen: dict[str, torch.Size] = {}
    for name in ("stage1", "stage3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: seen.update({name: o.shape}))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    size = 28 // stem_stride
    assert seen["stage1"][-2:] == (size, size)
    assert seen["stage3"][-2:] == (-(-size // 4), -(-size // 4))
    with pytest.raises(ValueError, match="stem_stride"):
        create_model("small_cnn", stem_stride=0)


def test_small_cnn_kw_shares_a_warehouse_per_input_size_as_convert_does() -> None:
    """The small CNN's 'kw' layers share one warehouse per input size, the same groups as
    convert(share='stage') finds in the static network; the warehouse settings may be among
    conv_kwargs; the layers keep the official initialisation (init_weights calls their
    reset_parameters), with either attention norm."""
    def groups(model: torch.nn.Module) -> list[list[str]]:
        found: dict[int, list[str]] = {}
        for name, module in model.named_modules():
            if isinstance(module, dynconv.KWConv2d):
                found.setdefault(id(module.warehouse), []).append(name)
        return list(found.values())

    model = create_model("small_cnn", conv_type="kw",
                         conv_kwargs={"cell_num_ratio": 2, "attention_norm": "batch"})
    static = create_model("small_cnn")
    dynconv.convert(static, "kw", exclude="stem.*", example_input=torch.zeros(1, 3, 16, 16))
    assert groups(model) == groups(static) == [
        ["stage1.0.0", "stage1.1.0", "stage2.0.0"], ["stage2.1.0", "stage3.0.0"], ["stage3.1.0"]]
    layer = model.stage1[0][0]
    assert layer.warehouse.cell_num_ratio == 2 and layer.attention_norm == "batch"
    # Kaiming (fan_out, ReLU gain) on 16 hidden units: std sqrt(2 / 16) = 0.35, not the 0.01
    # that init_weights gives the other Linear layers
    assert 0.2 < layer.attention.fc1.weight.std().item() < 0.5
