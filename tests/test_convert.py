"""convert(): any model's nn.Conv2d layers become dynamic; 'dynamic' keeps the outputs exactly."""

from __future__ import annotations

import re

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


# -- KernelWarehouse: warehouses shared by stage -------------------------------------------------


def _sharing(model: nn.Module) -> list[list[str]]:
    """The names of the KW layers of ``model``, grouped by the warehouse they share."""
    groups: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, dynconv.KWConv2d):
            groups.setdefault(id(module.warehouse), []).append(name)
    return list(groups.values())


def test_kw_shares_one_warehouse_per_stage_as_the_official_resnet18() -> None:
    """share='stage' (the default) groups torchvision's ResNet-18 as the official KW ResNet-18
    does (a stage's stride-2 convolutions join the stage before: the same input size), so its
    parameter counts are the official table's; the report counts each warehouse once; the
    model's training flags and BatchNorm statistics are as they were."""
    model = torchvision.models.resnet18().train()
    model.layer1.eval()
    running = model.bn1.running_mean.clone()
    report = convert(model, "kw", exclude="conv1")
    stage = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
             "layer2.0.conv1", "layer2.0.downsample.0"]
    assert _sharing(model) == [
        stage, ["layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2", "layer3.0.conv1",
                "layer3.0.downsample.0"],
        ["layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer4.0.conv1",
         "layer4.0.downsample.0"],
        ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]]
    assert list(report.warehouses) == ["56x56", "28x28", "14x14", "7x7"]
    assert report.warehouses["56x56"].members == tuple(model.get_submodule(n) for n in stage)
    assert model.training and not model.layer1.training and model.layer2.training
    assert torch.equal(model.bn1.running_mean, running)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 11.93  # KW (1x)
    converted = {id(p): p for name in (r.name for r in report.converted)
                 for p in model.get_submodule(name).parameters()}
    assert sum(r.params_after for r in report.converted) == sum(
        p.numel() for p in converted.values())
    text = str(report)
    assert "warehouse 56x56: 6 layers share 56 cells of 64x64x1x1 (229,376 parameters)" in text
    assert re.search(r"layer2\.0\.downsample\.0 +64->128 1x1 s2 +56x56 +8,192 +11,186", text)
    half = torchvision.models.resnet18()
    convert(half, "kw", exclude="conv1", cell_num_ratio=0.5, cell_in_ratio=0.5,
            cell_out_ratio=0.5)
    assert round(sum(p.numel() for p in half.parameters()) / 1e6, 2) == 7.43  # KW (1/2x)


def test_kw_conversion_computes_the_static_model_at_temperature_one() -> None:
    """Every layer joins its warehouse before any copies its kernel in (a join re-initialises
    the cells): at temperature 1 each kernel cell is its own warehouse cell, the static one."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    expected = model.to(F64).eval()(x)
    assert _converted_matches(model, "kw", x, temperature=1.0, cell_num_ratio=2,
                              example_input=x[:1]) < 1e-12
    dynconv.set_temperature(model, 0.0)
    assert (model(x) - expected).abs().max() > 1e-3  # t = 0: the attention's mixture


def test_kw_on_a_small_model_and_the_other_rules() -> None:
    """A model that takes only 28x28 images: the dry pass stops once every converted
    convolution has run, so its classifier never sees the 224x224 zeros."""
    def small() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, padding=1),
                             nn.Flatten(), nn.Linear(8 * 14 * 14, 10))

    model = small()
    report = convert(model, "kw")
    assert _sharing(model) == [["0", "2"], ["3"]]
    assert [r.warehouse for r in report.converted] == ["224x224", "224x224", "112x112"]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    model = small()
    convert(model, "kw", share="layer")
    assert _sharing(model) == [["0"], ["2"], ["3"]]
    model = small()
    convert(model, "kw", share="model", include=["2", "3"])
    assert _sharing(model) == [["2", "3"]]
    model = small()
    report = convert(model, "kw", share=lambda name: "odd" if name in ("0", "3") else "even")
    assert _sharing(model) == [["0", "3"], ["2"]] and list(report.warehouses) == ["odd", "even"]
    # cell_num_ratio < 1: the layers cannot start from their kernels, and stay, fresh
    model = small()
    report = convert(model, "kw", cell_num_ratio=0.5)
    assert len(report.converted) == 3 and "fresh initialisation" in report.notes[0]
    assert "cell_num_ratio < 1" in str(report)


def test_kw_dry_pass_errors_and_example_input() -> None:
    class LatentFirst(nn.Module):  # a generator: a vector in, its convolutions after a Linear
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 8 * 7 * 7)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.unused = nn.Conv2d(8, 8, 1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.conv(self.fc(z).reshape(-1, 8, 7, 7))

    with pytest.raises(ValueError, match=r"share='stage' runs the model once.*LatentFirst failed "
                                         r"on \[\(1, 8, 224, 224\)\] after 0 of 2.*example_input="):
        convert(LatentFirst(), "kw")
    model = LatentFirst()
    report = convert(model, "kw", example_input=torch.zeros(2, 16))
    assert report.converted[0].warehouse == "7x7" and report.converted[1].warehouse == "unused"
    assert "did not run" in report.notes[0] and "unused" in report.notes[0]


@pytest.mark.parametrize(("to", "kwargs", "error", "message"), [
    ("odconv", {"share": "stage"}, ValueError, r"share='stage' is for the conv types whose "
                                               r"layers share a warehouse \('kw'\), not 'odconv'"),
    ("dynamic", {"example_input": torch.zeros(1, 3, 8, 8)}, ValueError, "example_input is for"),
    ("kw", {"share": "block"}, ValueError, r"share must be one of \('stage', 'layer', 'model'\)"),
    ("kw", {"share": 3}, TypeError, "share must be one of .* got int"),
    ("kw", {"share": "layer", "example_input": torch.zeros(1, 3, 8, 8)}, ValueError,
     "example_input is for share='stage', not share='layer'"),
    ("kw", {"example_input": [torch.zeros(1, 3, 8, 8)]}, TypeError, "example_input must be"),
    ("kw", {"share": lambda name: 1}, TypeError, "must return a warehouse name .* got 1 for '0'"),
    ("kw", {"warehouse": dynconv.Warehouse()}, ValueError, "builds the warehouses itself"),
    ("kw", {"cell_num_ratio": 0.3}, ValueError, "cell_num_ratio must be an integer >= 1"),
])
def test_kw_conversion_errors(to, kwargs, error, message) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(error, match=message):
        convert(model, to, **kwargs)
    assert type(model[0]) is nn.Conv2d  # nothing changed
