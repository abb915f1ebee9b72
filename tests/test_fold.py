"""dynconv.fold: calibrated static kernels, exact where the attention does not vary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynconv import DRConv2d, DynamicConv2d, KWConv2d, ODConv2d, Warehouse, fold
from dynconv.cli import main
from dynconv.layers.fuse import fold_batchnorm
from dynconv.tools.convert import static_twin
from dynconv.training import TrainConfig, load_dataset, train

torch.set_num_threads(1)


def _layers(temperature: float = 1.0) -> list[nn.Module]:
    od = {"temperature": temperature, "head_init": "official"}  # attentions that vary
    return [
        DynamicConv2d(6, 8, 3, padding=1, temperature=temperature),
        DynamicConv2d(6, 8, 3, padding=1, routing="sigmoid", temperature=temperature),
        ODConv2d(6, 8, 3, padding=1, bias=True, attention_norm="none", **od),
        ODConv2d(6, 8, 3, stride=2, padding=1, groups=2, **od),
        ODConv2d(6, 6, 3, padding=1, groups=6, **od),
        ODConv2d(6, 4, 1, num_kernels=1, **od),
    ]


@pytest.mark.parametrize("index", range(6))
def test_fold_on_one_sample_reproduces_that_sample(index):
    torch.manual_seed(index)
    model = nn.Sequential(_layers()[index]).double().eval()
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    report = fold(model, x, measure_speed=False)
    assert isinstance(report.model[0], nn.Conv2d)
    torch.testing.assert_close(report.model(x), model(x), rtol=1e-12, atol=1e-12)
    assert report.layers[0].spread == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("index", range(6))
def test_fold_is_exact_when_the_attention_is_constant(index):
    """A huge temperature makes every softmax uniform and every sigmoid 0.5, for any input."""
    torch.manual_seed(index)
    model = nn.Sequential(_layers(temperature=1e12)[index]).double().eval()
    calibration = [torch.randn(4, 6, 7, 7, dtype=torch.float64) for _ in range(2)]
    report = fold(model, calibration, measure_speed=False)
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(report.model(x), model(x), rtol=1e-10, atol=1e-10)
    assert not report.layers[0].flagged


def test_fold_flags_a_layer_whose_attention_varies():
    torch.manual_seed(0)
    varying = DynamicConv2d(6, 8, 3, padding=1, temperature=0.02)
    constant = DynamicConv2d(8, 8, 3, padding=1, temperature=1e12)
    model = nn.Sequential(varying, constant).eval()
    report = fold(model, torch.randn(32, 6, 7, 7) * 3, tolerance=0.1, measure_speed=False)
    first, second = report.layers
    assert first.flagged and first.spread > 0.1 and first.samples == 32
    assert not second.flagged and second.spread < 1e-3
    assert "poor approximation" in str(report)
    assert isinstance(model[0], DynamicConv2d)  # the model itself is left as it was


def test_region_aware_layers_stay_dynamic_and_are_reported():
    """A DRConv layer applies a different kernel per region of the image: no single static
    kernel stands in for it, so fold leaves it and says so."""
    torch.manual_seed(0)
    model = nn.Sequential(DRConv2d(6, 8, 3, padding=1, num_regions=4),
                          DynamicConv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(4, 6, 7, 7)
    report = fold(model, x, measure_speed=False)
    assert isinstance(report.model[0], DRConv2d) and isinstance(report.model[1], nn.Conv2d)
    torch.testing.assert_close(report.model[0](x), model[0](x))
    assert "no fold rule" in str(report)


def _kw_model(temperature: float) -> nn.Sequential:
    """Three KernelWarehouse layers sharing a warehouse at cell_num_ratio 1/2, one with the
    non-local basis, float64, eval mode."""
    torch.manual_seed(0)
    warehouse = Warehouse(0.5, dtype=torch.float64)
    kw = {"warehouse": warehouse, "temperature": temperature, "dtype": torch.float64}
    return nn.Sequential(KWConv2d(6, 8, 3, padding=1, **kw), nn.ReLU(),
                         KWConv2d(8, 8, 3, stride=2, padding=1, nonlocal_basis_ratio=0.5, **kw),
                         KWConv2d(8, 4, 1, bias=False, **kw)).eval()


def test_kw_layers_fold_from_their_effective_kernels():
    """One sample: the folded model is that sample's; temperature 1: every kernel cell is its
    assigned warehouse cell whatever the input, and the fold is exact for any input."""
    model = _kw_model(0.0)
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    report = fold(model, x, measure_speed=False)
    assert [type(m) for m in report.model] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Conv2d]
    torch.testing.assert_close(report.model(x), model(x), rtol=1e-12, atol=1e-12)
    assert not any(isinstance(m, Warehouse) for m in report.model.modules())
    assert isinstance(model[0], KWConv2d)  # the model itself is left as it was

    model = _kw_model(1.0)
    report = fold(model, [torch.randn(4, 6, 7, 7, dtype=torch.float64) for _ in range(2)],
                  measure_speed=False)
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(report.model(x), model(x), rtol=1e-12, atol=1e-12)
    assert all(r.spread < 1e-6 and not r.flagged for r in report.layers)


class _LastUnused(nn.Module):
    """Runs all its layers but the last."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[:-1](x)


def test_a_kw_layer_left_dynamic_keeps_the_shared_cells():
    """A layer that did not run is left dynamic; the folded copy still mixes the same cells."""
    model = _kw_model(0.0)
    report = fold(_LastUnused(model).eval(), torch.randn(3, 6, 7, 7, dtype=torch.float64),
                  measure_speed=False)
    folded = report.model.layers
    assert isinstance(folded[0], nn.Conv2d) and isinstance(folded[3], KWConv2d)
    assert "did not run on the calibration data" in str(report)
    h = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(folded[3](h), model[3](h), rtol=0, atol=0)


def test_a_kw_layer_keeps_the_batchnorm_that_follows_it():
    """A BatchNorm's per-channel scale cannot go into cells that other channels and layers mix:
    fold_batchnorm changes nothing and says so; fold() gives a conv that takes it exactly."""
    model = _kw_model(0.0)
    layer = model[2]
    bn = nn.BatchNorm2d(8).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.running_mean.normal_()
    cells, bias = layer.warehouse.cells.clone(), layer.bias.clone()
    assert not fold_batchnorm(layer, bn)
    assert torch.equal(layer.warehouse.cells, cells) and torch.equal(layer.bias, bias)
    with pytest.raises(NotImplementedError, match="warehouse cells that its other output"):
        layer.fold_output_affine(torch.ones(8), torch.zeros(8))
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    conv = fold(nn.Sequential(layer).eval(), x, measure_speed=False).model[0]
    assert fold_batchnorm(conv, bn)
    torch.testing.assert_close(conv(x), bn(layer(x)), rtol=1e-12, atol=1e-12)


def test_fold_rejects_bad_data():
    model = nn.Sequential(DynamicConv2d(3, 4, 3)).eval()
    with pytest.raises(ValueError, match="no batch"):
        fold(model, [], measure_speed=False)
    with pytest.raises(TypeError, match="calibration data"):
        fold(model, ["not a tensor"], measure_speed=False)
    with pytest.raises(ValueError, match="tolerance"):
        fold(model, torch.randn(1, 3, 5, 5), tolerance=-1)


def test_fold_a_trained_model_on_the_digits(tmp_path, capsys):
    torch.manual_seed(0)
    dataset = load_dataset("digits")
    config = TrainConfig(data="digits", model="small_cnn", conv_type="dynamic", epochs=20,
                         temperature="none",
                         out=str(tmp_path / "run"), quiet=True)
    result = train(config, dataset=dataset)
    model = result.model.eval()
    calibration = dataset.normalize(dataset.train.images[:256]).split(128)
    test = (dataset.normalize(dataset.test.images), dataset.test.labels)
    report = fold(model, calibration, test, min_run_time=0.05)
    assert report.accuracy_before == pytest.approx(result.metrics[-1]["test_acc"])
    assert report.accuracy_before > 0.8
    # measured 96.7% -> 83.6%: the mean kernels keep most of it, far above chance (10%)
    assert report.accuracy_after > 0.5
    assert report.latency_ms is not None and all(t > 0 for t in report.latency_ms)
    assert all(not isinstance(m, DynamicConv2d) for m in report.model.modules())

    assert main(["fold", str(tmp_path / "run"), "--calibration-size", "128",
                 "--out", str(tmp_path / "folded.pt")]) == 0
    out = capsys.readouterr().out
    assert "accuracy: dynamic" in out and "speed-up" in out
    twin = static_twin(model)
    twin.load_state_dict(torch.load(tmp_path / "folded.pt", weights_only=True))
