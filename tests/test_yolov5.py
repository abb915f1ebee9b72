"""dynconv.integrations.yolov5 against the real YOLOv5 (the pip package ``yolov5``, 7.0.x).

Offline: the data set is a few generated 64x64 images, the font YOLOv5 fetches for its plots is
a local TTF, and nothing downloads weights (``--weights ''``).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("yolov5.models.yolo", exc_type=ImportError)

from dynconv.blocks import yolo as blocks
from dynconv.integrations import yolov5 as dyn_yolov5
from dynconv.integrations.shapes import write_shapes_dataset
from dynconv.tools.cost import count_macs

SCALES = list(dyn_yolov5.SCALES)


@pytest.fixture(scope="module")
def yolo():
    module = dyn_yolov5.register()
    assert module.__name__ == "yolov5.models.yolo"
    return module


@pytest.fixture(scope="module")
def quiet_info(yolo):
    """YOLOv5 profiles every model it builds with thop (a forward per build): skip that where a
    test does not look at it."""
    original = yolo.model_info
    yolo.model_info = lambda *args, **kwargs: None
    yield
    yolo.model_info = original


def stock_yaml(yolo, scale: str) -> Path:
    return Path(yolo.__file__).parent / f"yolov5{scale}.yaml"


def load(path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def layer_shapes(layers: nn.Sequential, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Output shape of every layer but Detect, routed as YOLOv5's BaseModel routes them."""
    outputs: list[torch.Tensor] = []
    for layer in layers[:-1]:
        if layer.f != -1:
            x = outputs[layer.f] if isinstance(layer.f, int) else [
                x if j == -1 else outputs[j] for j in layer.f]
        x = layer(x)
        outputs.append(x)
    return [tuple(y.shape) for y in outputs]


@pytest.mark.parametrize("scale", SCALES)
def test_seed_layout_builds_with_the_stock_shapes_at_every_scale(yolo, scale, tmp_path) -> None:
    cfg = dyn_yolov5.cfg_path(f"yolov5{scale}-dynconv.yaml", out_dir=tmp_path)
    assert Path(cfg).name == f"yolov5{scale}-dynconv.yaml"
    spec, stock_spec = load(cfg), load(stock_yaml(yolo, scale))
    assert (spec["depth_multiple"], spec["width_multiple"]) == (
        stock_spec["depth_multiple"], stock_spec["width_multiple"])
    torch.manual_seed(0)
    dyn, _ = yolo.parse_model(copy.deepcopy(spec), ch=[3])
    stock, _ = yolo.parse_model(copy.deepcopy(stock_spec), ch=[3])
    kinds = [type(layer).__name__ for layer in dyn]
    assert [i for i, kind in enumerate(kinds) if kind == "DynamicConv"] == [10, 14]
    assert kinds[:10] + kinds[11:14] + kinds[15:] == [
        type(layer).__name__ for i, layer in enumerate(stock) if i not in (10, 14)]
    assert isinstance(dyn[10].conv, type(blocks.DynamicConv(8, 8).conv))  # a dynamic kernel bank
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert layer_shapes(dyn.eval(), x) == layer_shapes(stock.eval(), x)
    heads = [[tuple(conv.weight.shape) for conv in net[-1].m] for net in (dyn, stock)]
    assert heads[0] == heads[1]


def test_the_seed_yaml_text_with_dynamic_conv2d_builds(yolo, quiet_info, tmp_path) -> None:
    """Seed 001's YAML as users paste it: ``Dynamic_conv2d`` on the head's 1x1 convolutions,
    multiples 1.0 (its args [512, 1, 1] are c2, k, s, as for Conv)."""
    text = (dyn_yolov5.CFG_DIR / "yolov5-dynconv.yaml").read_text()
    text = text.replace("DynamicConv,", "Dynamic_conv2d,")
    text = re.sub(r"(?m)^(depth|width)_multiple: [\d.]+", r"\1_multiple: 1.0", text)
    assert "[-1, 1, Dynamic_conv2d, [512, 1, 1]]" in text
    assert "[-1, 1, Dynamic_conv2d, [256, 1, 1]]" in text
    (tmp_path / "yolov5_dynamic.yaml").write_text(text)
    layers, _ = yolo.parse_model(load(tmp_path / "yolov5_dynamic.yaml"), ch=[3])
    assert type(layers[10]) is blocks.DynamicConv and type(layers[14]) is blocks.DynamicConv
    assert (layers[10].conv.in_channels, layers[10].conv.out_channels) == (1024, 512)
    assert (layers[14].conv.in_channels, layers[14].conv.out_channels) == (512, 256)


@pytest.fixture(scope="module")
def nano(yolo, quiet_info, tmp_path_factory):
    torch.manual_seed(0)
    cfg = dyn_yolov5.cfg_path("yolov5n-dynconv.yaml", out_dir=tmp_path_factory.mktemp("cfg"))
    return yolo.Model(cfg, nc=2)


def test_training_step_with_yolov5_loss_updates_the_dynamic_weights(nano) -> None:
    from yolov5.utils.loss import ComputeLoss

    model = copy.deepcopy(nano).train()
    hyp = load(Path(sys.modules["yolov5"].__file__).parent / "data/hyps/hyp.scratch-low.yaml")
    model.hyp = hyp
    compute_loss = ComputeLoss(model)
    layer = model.model[10]
    dynamic = {name: p.detach().clone() for name, p in layer.named_parameters()}
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.3], [1, 1, 0.3, 0.6, 0.2, 0.25]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss, items = compute_loss(model(images), targets)
    assert torch.isfinite(loss).all() and loss.item() > 0 and items.shape == (3,)
    loss.backward()
    optimizer.step()
    changed = [name for name, p in layer.named_parameters()
               if not torch.equal(p.detach(), dynamic[name])]
    assert any("weight" in name and "attention" not in name for name in changed), changed
    assert any("attention" in name or "routing" in name or "fc" in name for name in changed), (
        changed)


def test_fuse_folds_the_dynamic_blocks_and_keeps_outputs(nano) -> None:
    model = copy.deepcopy(nano).eval()
    torch.manual_seed(2)
    for bn in model.modules():  # non-trivial statistics, so that folding them shows
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
        after = model(x)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.model[10].bn, nn.Identity)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_register_is_idempotent_and_undone_by_unregister(yolo, quiet_info, tmp_path) -> None:
    patched, fuse = yolo.parse_model, yolo.BaseModel.fuse
    assert dyn_yolov5.register() is yolo and yolo.parse_model is patched
    assert yolo.BaseModel.fuse is fuse and yolo.Dynamic_conv2d is blocks.DynamicConv
    spec = load(dyn_yolov5.cfg_path("yolov5n-dynconv.yaml", out_dir=tmp_path))
    dyn_yolov5.unregister()
    try:
        assert not dyn_yolov5.is_registered()
        assert yolo.parse_model is patched.__wrapped__
        assert not hasattr(yolo.BaseModel.fuse, "__dynconv_original__")
        assert "DynamicConv" not in vars(yolo) and "C3_ODConv" not in vars(yolo)
        with pytest.raises(NameError, match="DynamicConv"):
            yolo.parse_model(copy.deepcopy(spec), ch=[3])
    finally:
        dyn_yolov5.register()
    assert dyn_yolov5.is_registered(yolo) and yolo.parse_model is not patched.__wrapped__
    layers, _ = yolo.parse_model(copy.deepcopy(spec), ch=[3])
    assert type(layers[10]) is blocks.DynamicConv


def test_unsupported_layouts_and_versions_are_refused(yolo, monkeypatch) -> None:
    fake = types.ModuleType("models.yolo")
    fake.parse_model = lambda d, ch: None
    with pytest.raises(RuntimeError, match=r"not a YOLOv5 models/yolo.py .*missing BaseModel"):
        dyn_yolov5.register(fake)
    dyn_yolov5.unregister()
    monkeypatch.setattr(sys.modules["yolov5"], "__version__", "6.2.3")
    try:
        with pytest.raises(RuntimeError, match=r"yolov5 >=7.0,<7.1 \(tested with 7.0.14\)"):
            dyn_yolov5.register()
        assert not dyn_yolov5.is_registered()
    finally:
        monkeypatch.undo()
        dyn_yolov5.register()


def test_cfg_path_scales_and_names(tmp_path) -> None:
    assert dyn_yolov5.cfg_path("yolov5-odconv.yaml") == str(
        dyn_yolov5.CFG_DIR / "yolov5-odconv.yaml")
    for scale, (depth, width) in dyn_yolov5.SCALES.items():
        spec = load(dyn_yolov5.cfg_path(f"yolov5{scale}-odconv", out_dir=tmp_path))
        assert (spec["depth_multiple"], spec["width_multiple"]) == (depth, width)
        assert spec["head"][3][2] == "C3_ODConv"
    with pytest.raises(ValueError, match="no shipped model YAML"):
        dyn_yolov5.cfg_path("yolov5q-dynconv.yaml")
    with pytest.raises(ValueError, match="no shipped model YAML"):
        dyn_yolov5.cfg_path("yolov8s-dynconv.yaml")
    assert dyn_yolov5.resolve_cfg("models/mine.yaml") == "models/mine.yaml"


def test_odconv_neck_trains_as_c3(yolo, quiet_info, tmp_path) -> None:
    spec = load(dyn_yolov5.cfg_path("yolov5n-odconv.yaml", out_dir=tmp_path))
    layers, _ = yolo.parse_model(spec, ch=[3])
    stock, _ = yolo.parse_model(load(stock_yaml(yolo, "n")), ch=[3])
    for i in (13, 17, 20, 23):
        assert type(layers[i]) is blocks.C3_ODConv
        assert len(layers[i].m) == len(stock[i].m)  # repeats folded in as for C3
        assert layers[i].cv3.conv.out_channels == stock[i].cv3.conv.out_channels


def test_launcher_trains_an_epoch_and_the_checkpoint_loads_elsewhere(
    yolo, tmp_path, monkeypatch
) -> None:
    import matplotlib
    import yolov5.utils.general as general

    from dynconv.integrations.yolov5.__main__ import main

    data = write_shapes_dataset(tmp_path / "data", train=4, val=4, imgsz=64)
    fonts = tmp_path / "fonts"  # YOLOv5 downloads Arial.ttf for its plots unless it is here
    fonts.mkdir()
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    (fonts / "Arial.ttf").write_bytes(ttf.read_bytes())
    monkeypatch.setattr(general, "CONFIG_DIR", fonts)
    for name, value in {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "WANDB_MODE": "disabled",
                        "XDG_CACHE_HOME": str(tmp_path / "cache"),
                        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    main(["train", "--cfg", "yolov5n-dynconv.yaml", "--weights", "", "--data", str(data),
          "--epochs", "1", "--imgsz", "64", "--batch-size", "2", "--workers", "0",
          "--device", "cpu", "--noplots", "--project", str(tmp_path / "runs"), "--name", "t"])
    weights = tmp_path / "runs" / "t" / "weights" / "last.pt"
    assert weights.is_file()
    assert (tmp_path / "cache" / "dynconv" / "yolov5" / "yolov5n-dynconv.yaml").is_file()

    script = f"""
import sys, torch
ckpt = torch.load({str(weights)!r}, map_location="cpu", weights_only=False)
model = ckpt["model"].float().eval()
assert "dynconv.integrations.yolov5" not in sys.modules  # nothing registered: classes suffice
layer = model.model[10]
shape = tuple(model(torch.zeros(1, 3, 64, 64))[0].shape)
print(type(layer).__module__, type(layer).__name__, shape)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(blocks.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # three classes: 3 anchors x (8x8 + 4x4 + 2x2) cells, 5 + 3 outputs each
    assert "dynconv.blocks.yolo DynamicConv (1, 252, 8)" in done.stdout, done.stdout


def yolov5_gflops(model, imgsz: int) -> tuple[float, float]:
    """YOLOv5's GFLOPs for ``model`` at ``imgsz``: as its model summary prints it (one decimal),
    and unrounded by the same method (thop at 32x32, times the area ratio)."""
    import yolov5.utils.torch_utils as torch_utils

    lines = []
    logger = torch_utils.LOGGER
    torch_utils.LOGGER = types.SimpleNamespace(info=lines.append)
    try:
        torch_utils.model_info(model, imgsz=imgsz)
    finally:
        torch_utils.LOGGER = logger
    printed = float(re.search(r"([\d.]+) GFLOPs", lines[-1])[1])
    macs = torch_utils.thop.profile(copy.deepcopy(model), inputs=(torch.zeros(1, 3, 32, 32),),
                                    verbose=False)[0]
    exact = macs * 2 / 1e9 * (imgsz / 32) ** 2
    assert printed == pytest.approx(exact, abs=0.051)
    return printed, exact


def test_gflops_yolov5_reports_against_dynconv_count(yolo, quiet_info, tmp_path) -> None:
    """YOLOv5 profiles at 32x32 and scales by area: right for the stock model, an over-count of
    the attention's fixed per-image cost for the dynamic one (reported, not corrected). At 320
    here to keep it quick (the figures at 640 are in docs/yolo.md)."""
    size = 320
    x = torch.zeros(1, 3, size, size)
    stock = yolo.Model(str(stock_yaml(yolo, "n"))).eval()
    dyn = yolo.Model(dyn_yolov5.cfg_path("yolov5n-dynconv.yaml", out_dir=tmp_path)).eval()
    ours = {name: count_macs(m, x) * 2 / 1e9 for name, m in (("stock", stock), ("dyn", dyn))}
    theirs = {"stock": yolov5_gflops(stock, size)[1], "dyn": yolov5_gflops(dyn, size)[1]}
    print(f"GFLOPs at {size}, yolov5n: YOLOv5 {theirs}, dynconv {ours}")
    assert theirs["stock"] == pytest.approx(ours["stock"], abs=0.05 + 0.03 * ours["stock"])
    assert 0 < ours["dyn"] - ours["stock"] < 0.005  # the two attentions cost ~nothing
    # thop sees the dynamic layers' cost, but multiplies their fixed part by (320 / 32)^2
    assert theirs["dyn"] > theirs["stock"] + 0.02
