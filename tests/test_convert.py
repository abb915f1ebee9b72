"""convert(): any model's nn.Conv2d layers become dynamic; 'dynamic' keeps the outputs exactly."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dynconv
from dynconv.tools.convert import convert

F64 = torch.float64


def _converted_matches(model: nn.Module, to: str, x: torch.Tensor, **kwargs) -> float:
    model = model.to(F64).eval()
    expected = model(x)
    report = convert(model, to, **kwargs)
    assert report.converted, "nothing was converted"
    return (model(x) - expected).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize(
    "build", [torchvision.models.resnet18, torchvision.models.mobilenet_v2],
    ids=["resnet18", "mobilenet_v2"],
)
def test_dynamic_conversion_is_exact_on_torchvision_models(build) -> None:
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    assert _converted_matches(model, "dynamic", x) < 1e-12
    n_static = sum(isinstance(m, nn.Conv2d) for m in build().modules())
    assert len(dynconv.dynamic_layers(model)) == n_static


def test_dynamic_conversion_is_exact_on_a_timm_model() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    assert _converted_matches(model, "dynamic", x) < 1e-12


def test_converted_model_trains() -> None:
    model = torchvision.models.resnet18(num_classes=3)
    convert(model, "dynamic", keep_stem_and_head=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None


def test_include_exclude_min_channels_and_report() -> None:
    model = torchvision.models.resnet18()
    report = convert(model, "condconv", include=["layer3.*", "layer4.*"],
                     exclude="*downsample*", min_channels=300, num_kernels=2)
    names = [r.name for r in report.converted]
    assert names == ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    reasons = {r.name: r.reason for r in report.skipped}
    assert reasons["layer1.0.conv1"] == "not matched by include"
    assert reasons["layer4.0.downsample.0"] == "matched by exclude"
    assert "256 input channels < min_channels=300" in reasons["layer4.0.conv1"]
    assert model.layer4[1].conv1.num_kernels == 2
    text = str(report)
    assert "layer4.1.conv2" in text and "skipped layer1.0.conv1" in text and "total" in text
    record = report.converted[0]
    assert record.params_before == 512 * 512 * 9
    assert record.params_after == sum(p.numel() for p in model.layer4[0].conv2.parameters())


def test_keep_stem_and_head_and_no_double_conversion() -> None:
    model = torchvision.models.mobilenet_v2()
    report = convert(model, "dynamic", keep_stem_and_head=True)
    skipped = {r.name: r.reason for r in report.skipped}
    assert "features.0.0" in skipped and "features.18.0" in skipped
    again = convert(model, "dynamic")  # the attention convs inside dynamic layers are left alone
    assert [r.name for r in again.converted] == ["features.0.0", "features.18.0"]


@pytest.mark.parametrize(("to", "kwargs"), [("condconv", {}),
                                            ("odconv", {"head_init": "official"})])
def test_other_types_start_close(to: str, kwargs: dict) -> None:
    """CondConv, and ODConv with the official random heads, start from the static kernel scaled
    for their gates' centre: close to the static model (not exact: the gates vary around 0.5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3))
    x = torch.randn(4, 8, 12, 12, dtype=F64)
    assert 1e-3 < _converted_matches(model, to, x, **kwargs) < 0.6


def test_odconv_conversion_is_exact() -> None:
    """ODConv's heads start at zero, so every attention sits at the centre its kernels are
    scaled for: the converted model computes what it did."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    assert _converted_matches(model, "odconv", x, num_kernels=2) < 1e-12


def test_drconv_conversion_keeps_the_bias_and_builds_every_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3))
    static_bias = model[2].bias.detach().clone()
    report = convert(model, "drconv", num_regions=4)
    assert [r.name for r in report.converted] == ["0", "2"]
    assert isinstance(model[2], dynconv.DRConv2d) and torch.equal(model[2].bias, static_bias)
    assert model(torch.randn(2, 8, 12, 12)).shape == (2, 16, 10, 10)


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown conv type"):
        convert(nn.Conv2d(3, 3, 1), "deform")
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        convert("resnet", "dynamic")
    with pytest.raises(ValueError, match="min_channels must be an int >= 1"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1)), "dynamic", min_channels=0)
    report = convert(nn.Sequential(nn.Conv2d(3, 3, 1)), "dynamic", num_kernels=0)
    assert "cannot build 'dynamic'" in report.skipped[0].reason
