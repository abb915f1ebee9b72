"""ONNX export: every layer type, a small model and a converted torchvision ResNet-18 run in
onnxruntime at batch sizes 1, 3 and 8 and match PyTorch; fixed-batch fallback; clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dynconv import DRConv2d, DynamicConv2d, KWConv2d, ODConv2d, Warehouse
from dynconv._conv_args import parse_geometry
from dynconv.cli import main
from dynconv.functional import is_exporting
from dynconv.functional.mixture import _choose_mixture_method
from dynconv.functional.per_sample import _choose_per_sample_method
from dynconv.tools.convert import convert
from dynconv.tools.export import check_onnx, export_onnx, fixed_batch_layers
from dynconv.training import TrainConfig, load_digits, load_run, train

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)
BATCHES = (1, 3, 8)
ATOL = 1e-4

H = {"hidden_channels": 4}  # a wide enough attention that samples get different weights
OD = {"head_init": "official"}  # random heads, for the same reason
LAYERS = {
    "dynamic-softmax": lambda: DynamicConv2d(4, 8, 3, padding=1, **H),
    "dynamic-sigmoid": lambda: DynamicConv2d(4, 8, 3, padding=1, routing="sigmoid", **H),
    "dynamic-groups-reflect": lambda: DynamicConv2d(4, 8, 3, padding=1, groups=2,
                                                   padding_mode="reflect", **H),
    "dynamic-same-even": lambda: DynamicConv2d(4, 8, 4, padding="same", bias=False, **H),
    "odconv": lambda: ODConv2d(4, 8, 3, stride=2, padding=1, bias=True, **OD),
    "odconv-depthwise": lambda: ODConv2d(4, 4, 3, padding=1, groups=4, **OD),
    "odconv-1x1-k1": lambda: ODConv2d(4, 8, 1, num_kernels=1, **OD),
    "odconv-groups-reflect": lambda: ODConv2d(4, 8, 3, padding=1, groups=2,
                                              padding_mode="reflect", num_kernels=2, **OD),
    "drconv": lambda: DRConv2d(4, 8, 3, padding=1, num_regions=4, bias=True),
    "kw": lambda: KWConv2d(4, 8, 3, stride=2, padding=1),
}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (so that the attentions differ between samples), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval()


def _export_and_check(model: nn.Module, shape, tmp_path, name="model.onnx"):
    result = export_onnx(model, tmp_path / name, torch.randn(2, *shape), check=True,
                         check_batches=BATCHES, atol=ATOL)
    assert result.dynamic_batch
    assert set(result.max_abs_diff) == set(BATCHES)
    assert all(d <= ATOL for d in result.max_abs_diff.values()), result.max_abs_diff
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch dimension
    return result


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_layer_exports_with_a_dynamic_batch(name, tmp_path):
    layer = _randomise(LAYERS[name]())
    _export_and_check(layer, (4, 9, 9), tmp_path)
    # the attention really differs between samples: the file is not a static convolution
    x = torch.randn(3, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    record = layer.attention_record(x)
    attention = next(record[k] for k in ("kernel", "channel", "region_map", "cells")
                     if k in record)
    assert not torch.equal(attention[0], attention[1])


def test_batch_of_one_example_and_training_mode(tmp_path):
    layer = _randomise(ODConv2d(4, 8, 3, padding=1)).train()
    result = export_onnx(layer, tmp_path / "one.onnx", torch.randn(1, 4, 6, 6), check=True)
    assert result.dynamic_batch and result.batch_size == 2  # a batch of 1 would be a constant
    assert max(result.max_abs_diff.values()) <= ATOL  # exported in eval mode
    assert layer.training  # the mode is restored


def test_converted_torchvision_resnet18(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    dynamic = convert(model, "dynamic", exclude=["layer4.*"], num_kernels=2)
    odconv = convert(model, "odconv", include=["layer4.*"], num_kernels=2)
    assert len(dynamic.converted) > 10 and len(odconv.converted) >= 4
    _randomise(model, seed=2)
    with torch.no_grad():  # tame the random weights of a deep net
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, DynamicConv2d, ODConv2d, nn.Linear)):
                m.weight.mul_(0.2)
    _export_and_check(model, (3, 32, 32), tmp_path)


def test_kw_layers_sharing_a_warehouse(tmp_path):
    """Three KernelWarehouse layers (one with the non-local basis) mixing one warehouse's cells:
    a dynamic batch, onnxruntime equal to PyTorch, and the cells stored once in the file."""
    onnx = pytest.importorskip("onnx")
    warehouse = Warehouse(0.5)
    model = _randomise(nn.Sequential(
        KWConv2d(4, 8, 3, padding=1, warehouse=warehouse), nn.ReLU(),
        KWConv2d(8, 8, 3, stride=2, padding=1, warehouse=warehouse, nonlocal_basis_ratio=0.5),
        KWConv2d(8, 4, 1, bias=False, warehouse=warehouse)))
    with torch.no_grad():
        warehouse.cells.mul_(0.3)
    _export_and_check(model, (4, 9, 9), tmp_path)
    cells = warehouse.cells.detach().flatten()
    stored = [t for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer
              if torch.equal(torch.from_numpy(onnx.numpy_helper.to_array(t).copy()).flatten(),
                             cells)]
    assert len(stored) == 1


def test_dispatch_is_batch_agnostic_only_while_exporting():
    assert not is_exporting()
    geometry = parse_geometry(3, 1, 1, 1, 1)
    assert _choose_per_sample_method(4, 1024, False, geometry) == "grouped"
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["exporting"] = is_exporting()
            seen["per_sample"] = _choose_per_sample_method(4, 1024, False, geometry)
            return x + 1

    torch.export.export(Probe(), (torch.randn(2, 3),))
    assert seen == {"exporting": True, "per_sample": "unfold"}
    bank = torch.randn(2, 8, 4, 3, 3)
    assert _choose_mixture_method(torch.randn(4, 4, 5, 5), bank, geometry) in {
        "aggregate", "mixout"}


class _BatchBound(DynamicConv2d):
    export_dynamic_batch = False


def test_layer_without_dynamic_batch_is_named_and_batch_fixed(tmp_path):
    model = nn.Sequential(_randomise(DynamicConv2d(4, 8, 3, padding=1)),
                          _randomise(_BatchBound(8, 8, 3, padding=1)))
    assert fixed_batch_layers(model) == ["1"]
    with pytest.warns(UserWarning, match=r"1 \(_BatchBound\).*batch size 3 only"):
        result = export_onnx(model, tmp_path / "fixed.onnx", torch.randn(3, 4, 9, 9),
                             check=True)
    assert not result.dynamic_batch and list(result.max_abs_diff) == [3]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 4, 9, 9]
    with pytest.raises(Exception):  # noqa: B017 - the file really refuses another batch size
        check_onnx(model, result.path, [4, 9, 9], batches=[2])


def test_explicit_fixed_batch_does_not_warn(tmp_path):
    layer = _randomise(DynamicConv2d(4, 8, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = export_onnx(layer, tmp_path / "f.onnx", torch.randn(2, 4, 6, 6),
                             dynamic_batch=False, check=True)
    assert not result.dynamic_batch and result.max_abs_diff[2] <= ATOL


def test_clear_errors(tmp_path):
    layer = DynamicConv2d(4, 8, 3)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module, got str"):
        export_onnx("model", tmp_path / "x.onnx", torch.randn(2, 4, 5, 5))
    with pytest.raises(TypeError, match=r"example_input must be a torch\.Tensor"):
        export_onnx(layer, tmp_path / "x.onnx", [1, 2])
    with pytest.raises(ValueError, match="check batches must be ints >= 1"):
        export_onnx(layer, tmp_path / "x.onnx", torch.randn(2, 4, 5, 5), check_batches=[0])
    # below 18 torch's exporter would write opset 18 and say nothing (measured: 3 and 7)
    for opset in (3, 17, 10_000, True, "18"):
        with pytest.raises(ValueError, match=r"the ONNX opset must be an integer from 18 to \d+"):
            export_onnx(layer, tmp_path / "x.onnx", torch.randn(2, 4, 5, 5), opset_version=opset)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_exports_a_trained_run_with_check(tmp_path, capsys):
    # trained, so that the logits are far from zero (an untrained small_cnn's are ~1e-10)
    run = tmp_path / "run"
    train(TrainConfig(data="digits", conv_type="odconv", model_args={"width": 8}, epochs=1,
                      batch_size=64, temperature_epochs=1, threads=1, quiet=True, out=str(run)),
          dataset=load_digits())
    assert main(["export", str(run), "--check"]) == 0
    text = capsys.readouterr().out
    assert (run / "model.onnx").is_file() and "input ['batch', 1, 8, 8]" in text
    assert text.count("max abs diff") == 3
    model, _, dataset = load_run(run)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    images = dataset.normalize(dataset.test.images[:5])
    logits = torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
    with torch.no_grad():
        expected = model(images)
    assert expected.abs().max() > 0.1 and torch.allclose(logits, expected, atol=ATOL)
    assert main(["export", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "either RUN_DIR" in capsys.readouterr().err
