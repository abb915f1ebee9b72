"""Attention inspection: capture leaves outputs bitwise unchanged, records match the layers'
own attentions, entropy by hand, accumulation over batches, real PNGs, the CLI on a trained run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from matplotlib.collections import QuadMesh
from PIL import Image
from torch import Tensor, nn

import dynconv.tools.inspection as inspection
from dynconv import DRConv2d, DynamicConv2d, DynamicConvBase, KWConv2d, ODConv2d, Warehouses
from dynconv.cli import main
from dynconv.tools.convert import convert
from dynconv.tools.inspection import (
    AttentionCapture,
    attention_entropy,
    inspect_attention,
    plot_cell_attention,
    plot_kernel_attention,
    plot_region_maps,
    plot_spatial_attention,
    write_summary,
)
from dynconv.training import TrainConfig, load_digits, train

torch.set_num_threads(1)


def _resnet18(to: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    convert(model, to, num_kernels=3)
    with torch.no_grad():  # attentions that differ between samples
        for name, p in model.named_parameters():
            if "attention" in name:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("to", ["dynamic", "odconv"])
def test_capture_leaves_outputs_bitwise_unchanged_and_records_the_layers_attention(to):
    model = _resnet18(to)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        inputs = {}

        def keep_input(module, args, output):
            inputs["x"] = args[0]

        handle = model.layer2[0].conv1.register_forward_hook(keep_input)
        with AttentionCapture(model) as capture:
            captured = model(x)
        handle.remove()
        again = model(x)
    assert torch.equal(plain, captured) and torch.equal(plain, again)
    layer = model.layer2[0].conv1
    record = capture.last["layer2.0.conv1"]
    assert len(capture.last) == len(capture.layers) == sum(
        isinstance(m, DynamicConvBase) for m in model.modules())
    if to == "dynamic":
        assert set(record) == {"kernel"}
        expected = layer.kernel_attention(inputs["x"])
        assert torch.equal(record["kernel"], expected)
    else:
        att = layer.attentions(inputs["x"])
        assert set(record) == {"channel", "filter", "spatial", "kernel"}
        assert record["spatial"].shape == (3, 3, 3)
        for key in record:
            assert torch.equal(record[key], getattr(att, key))
    assert record["kernel"].shape == (3, 3)
    assert not torch.allclose(record["kernel"][0], record["kernel"][1])
    assert not model.layer2[0].conv1._forward_hooks  # hooks removed


def test_entropy_by_hand():
    weights = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0],
                            [0.5, 0.5, 0.0, 0.0], [0.7, 0.2, 0.1, 0.0]], dtype=torch.float64)
    hand = [math.log(4), 0.0, math.log(2),
            -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))]
    assert attention_entropy(weights).tolist() == pytest.approx(hand, abs=1e-12)
    # sigmoid gates: the entropy of their relative sizes
    gates = torch.tensor([[0.9, 0.9], [0.2, 0.6]], dtype=torch.float64)
    assert attention_entropy(gates).tolist() == pytest.approx(
        [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))], abs=1e-12)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        attention_entropy(torch.ones(3))


def test_accumulates_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(3, 4, 3, hidden_channels=4), nn.ReLU(),
                          ODConv2d(4, 4, 3, padding=1, head_init="official")).eval()
    batches = [torch.randn(n, 3, 8, 8) for n in (2, 5, 3)]
    layers = inspect_attention(model, batches)
    with torch.no_grad():
        kernels = torch.cat([model[0].kernel_attention(x) for x in batches])
        hidden = [model[1](model[0](x)) for x in batches]
        spatial = torch.cat([model[2].attentions(h).spatial for h in hidden])
        channel = torch.cat([model[2].attentions(h).channel for h in hidden])
    first, second = layers["0"], layers["2"]
    assert first.samples == second.samples == 10
    assert torch.allclose(first.kernel, kernels)
    assert torch.allclose(first.entropy, attention_entropy(kernels))
    assert torch.allclose(second.means["spatial"], spatial.mean(0), atol=1e-6)
    assert torch.allclose(second.means["channel"], channel.mean(0), atol=1e-6)
    summary = first.summary()
    assert summary["kernel_entropy_mean"] == pytest.approx(
        attention_entropy(kernels).mean().item(), abs=1e-6)
    assert sum(summary["top_kernel_share"]) == pytest.approx(1.0)


def test_clear_errors():
    with pytest.raises(ValueError, match="holds no dynconv layer"):
        AttentionCapture(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        AttentionCapture("model")
    model = nn.Sequential(ODConv2d(4, 4, 3)).train()
    with pytest.raises(ValueError, match="eval mode"), AttentionCapture(model):
        pass


class _Regions(DynamicConvBase):
    """A stand-in for a region-aware layer: the region of each pixel by the sign of two
    channels; one method makes it inspectable."""

    def forward(self, x: Tensor) -> Tensor:
        self.last_region_map = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        return x

    def attention_record(self, x: Tensor) -> dict[str, Tensor]:
        return {"region_map": self.last_region_map}


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every pixel
        return image.size


def _figure_pixels(width_in: float, height_in: float, dpi: int = 110) -> tuple[int, int]:
    return round(width_in * dpi), round(height_in * dpi)


def test_plots_and_summary_are_real_files(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_Regions(3, 3, 1), DynamicConv2d(3, 4, 3, padding=1),
                          ODConv2d(4, 4, 3, padding=1), ODConv2d(4, 4, 1, num_kernels=1)).eval()
    images = torch.randn(6, 3, 8, 8)
    layers = inspect_attention(model, [images[:4], images[4:]], keep_maps=5)
    regions = layers["0"]
    assert regions.region_maps.shape == (5, 8, 8)
    expected = torch.bincount(((images[:, 0] > 0).long() + 2 * (images[:, 1] > 0).long())
                              .flatten(), minlength=4)
    assert torch.equal(regions.region_counts, expected)

    assert plot_kernel_attention(layers, tmp_path / "k.png")  # two layers with K = 4
    assert _png_size(tmp_path / "k.png") == _figure_pixels(3.2 * 2, 2.6)
    assert plot_spatial_attention(layers, tmp_path / "s.png")  # one 3x3 ODConv
    assert _png_size(tmp_path / "s.png") == _figure_pixels(2.2, 2.3)
    assert plot_region_maps(layers, images, tmp_path / "r.png")
    assert _png_size(tmp_path / "r.png") == _figure_pixels(1.8 * 5 + 0.9, 1.9)
    only_regions = {"0": regions}
    assert not plot_kernel_attention(only_regions, tmp_path / "none.png")
    assert not plot_spatial_attention(only_regions, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()

    json_path, csv_path = write_summary(layers, tmp_path)
    rows = json.loads(json_path.read_text())
    assert [r["layer"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["region_share"] == pytest.approx(
        (expected / expected.sum()).tolist(), abs=1e-6)  # rounded to 6 digits
    assert rows[1]["kernel_entropy_max"] == pytest.approx(math.log(4))
    assert "spatial_mean" in rows[2] and "spatial_mean" not in rows[3]
    assert csv_path.read_text().splitlines()[0].startswith("layer,type,samples,num_kernels")


def test_cli_inspects_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(data="digits", conv_type="odconv", model_args={"width": 8}, epochs=1,
                      batch_size=64, temperature_epochs=1, threads=1, quiet=True, out=str(run)),
          dataset=load_digits())
    out = tmp_path / "inspect"
    assert main(["inspect", str(run), "--out", str(out), "--limit", "100"]) == 0
    text = capsys.readouterr().out
    assert "6 dynamic layers over 100 test images" in text
    for name in ("kernel_attention.png", "spatial_attention.png"):
        width, height = _png_size(out / name)
        assert width > 200 and height > 200
    rows = json.loads((out / "attention_summary.json").read_text())
    assert len(rows) == 6 and all(r["samples"] == 100 for r in rows)
    assert main(["inspect", str(run), "--conv-type", "dynamic"]) == 2
    assert "keeps its own" in capsys.readouterr().err


def test_drconv_region_maps_are_captured_as_the_layer_assigned_them():
    torch.manual_seed(0)
    model = nn.Sequential(DRConv2d(3, 4, 3, padding=1, num_regions=4), nn.ReLU()).eval()
    images = torch.randn(5, 3, 8, 8)
    expected = model(images)
    with AttentionCapture(model) as capture:
        out = model(images)
    assert torch.equal(out, expected)
    assert torch.equal(capture.last["0"]["region_map"], model[0].last_region_map)
    counts = torch.bincount(model[0].last_region_map.flatten(), minlength=4)  # all 5 images
    layers = inspect_attention(model, [images[:2], images[2:]])
    assert torch.equal(layers["0"].region_counts, counts)
    assert layers["0"].num_regions == 4


def test_region_maps_have_a_colour_bar_of_every_region(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(DRConv2d(1, 4, 3, padding=1, num_regions=6), nn.ReLU(),
                          DRConv2d(4, 4, 3, padding=1, num_regions=6)).eval()
    images = torch.rand(3, 1, 8, 8)
    layers = inspect_attention(model, [images])
    figures = []
    monkeypatch.setattr(inspection, "save_png", lambda figure, path: figures.append(figure))
    assert plot_region_maps(layers, images, tmp_path / "r.png")
    (figure,) = figures
    bar = next(ax for ax in figure.axes if ax.get_ylabel() == "region")
    assert [t.get_text() for t in bar.get_yticklabels()] == [str(r) for r in range(6)]
    # the maps are drawn in the colour bar's colours (opaque), region r in colour r
    maps = [ax for ax in figure.axes if ax is not bar]
    assert len(maps) == 2 * 3
    drawn = maps[0].get_images()[0]
    region = int(layers["0"].region_maps[0, 0, 0])
    assert drawn.get_alpha() is None
    (solids,) = [c for c in bar.collections if isinstance(c, QuadMesh)]  # the bar's colours
    assert drawn.cmap(drawn.norm(region)) == solids.cmap(solids.norm(region))
    assert len({drawn.cmap(drawn.norm(r)) for r in range(6)}) == 6


# -- KernelWarehouse ---------------------------------------------------------------------------


def _kw_model() -> nn.Sequential:
    """Two layers sharing warehouse 'a' (one with the non-local basis), one with 'b' of its own;
    random attentions, so that the samples differ."""
    torch.manual_seed(0)
    shop = Warehouses(0.5)
    model = nn.Sequential(KWConv2d(4, 8, 3, padding=1, warehouse=shop["a"]), nn.ReLU(),
                          KWConv2d(8, 8, 3, padding=1, warehouse=shop["a"],
                                   nonlocal_basis_ratio=0.5),
                          KWConv2d(8, 4, 1, warehouse=shop["b"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attention" in name:
                p.normal_(0, 0.5)
    return model.eval()


def test_kw_cell_weights_are_summarised_by_warehouse_cell_and_owner(tmp_path):
    model = _kw_model()
    batches = [torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(n))
               for n in (3, 2)]
    with torch.no_grad():
        plain = [model(x) for x in batches]
        with AttentionCapture(model) as capture:
            assert all(torch.equal(model(x), y) for x, y in zip(batches, plain))
        records = [model[2].attention_record(model[1](model[0](x)))["cells"] for x in batches]
    assert capture.last["2"]["cells"].shape == (2, 18, 14)  # [N, m, n]
    layers = inspect_attention(model, batches)
    second = layers["2"]
    first_cells, second_cells = model[0].layout.own_cells, model[2].layout.own_cells
    assert second.cell_owners == [("0", 0, first_cells), ("2", first_cells, second_cells)]
    assert layers["3"].cell_owners == [("3", 0, 1)]
    assert second.samples == 5 and second.kernel is None and "cells" not in second.means
    # by hand: each warehouse cell's share of the absolute weights over samples and kernel cells
    size = torch.cat(records).double().abs()
    usage = size.sum((0, 1)) / size.sum()
    torch.testing.assert_close(second.cell_usage, usage.float())
    torch.testing.assert_close(second.cell_share, (size.sum(0) / size.sum((0, 2))[:, None])
                               .float())
    entropy = attention_entropy(size.reshape(-1, 14)).reshape(5, 18).mean(1)
    torch.testing.assert_close(second.cell_entropy, entropy.float())
    own = usage[first_cells:].sum().item()
    assert second.cell_share_by_layer() == pytest.approx({"0": 1 - own, "2": own})
    order = usage.argsort(descending=True)[:5].tolist()
    assert [i for i, _, _ in second.top_cells()] == order
    assert [o for _, o, _ in second.top_cells()] == ["0" if i < first_cells else "2"
                                                     for i in order]

    json_path, csv_path = write_summary(layers, tmp_path)
    rows = {r["layer"]: r for r in json.loads(json_path.read_text())}
    row = rows["2"]
    assert (row["mixtures"], row["num_cells"]) == (18, 14)
    assert row["own_cell_share"] == pytest.approx(own, abs=1e-6)
    assert row["cell_entropy_mean"] == pytest.approx(entropy.mean().item(), abs=1e-6)
    assert row["cell_entropy_max"] == pytest.approx(math.log(14))
    assert row["top_cells"] == order and len(row["cell_usage"]) == 14
    assert "cells_mean" not in row  # not m x n numbers without their meaning
    header, *lines = csv_path.read_text().splitlines()
    assert "own_cell_share" in header.split(",") and len(lines) == 3


def test_kw_cell_attention_plot(tmp_path):
    model = _kw_model()
    layers = inspect_attention(model, [torch.randn(4, 4, 6, 6)])
    assert plot_cell_attention(layers, tmp_path / "c.png")  # three KW layers, one row
    assert _png_size(tmp_path / "c.png") == _figure_pixels(4.2 * 3, 2.6)
    others = inspect_attention(nn.Sequential(DynamicConv2d(4, 4, 3)).eval(),
                               [torch.randn(2, 4, 6, 6)])
    assert not plot_cell_attention(others, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_cli_inspects_kw_layers(tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", "--model", "small_cnn", "--conv-type", "kw", "--model-arg",
                 "width=4", "--limit", "20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "KWConv2d" in line]
    assert len(lines) == 6
    assert all(re.search(r"m=\d+ n=\d+  entropy [\d.]+ / [\d.]+ nats, own cells \d+%, "
                         r"most used \d+ \(\d+%\)", line) for line in lines)
    width, height = _png_size(out / "cell_attention.png")
    assert width > 200 and height > 200
    assert "cell_attention.png" in text
