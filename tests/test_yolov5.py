"""dynconv.integrations.yolov5 against the real YOLOv5 (the pip package ``yolov5``, 7.0.x).

Offline: the data set is a few generated 64x64 images, nothing downloads weights
(``--weights ''``), and :func:`dynconv.integrations.yolov5.compat` keeps YOLOv5 from downloading
its font.
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

import dynconv
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
    test does not look at it. Yields the ``model_info`` replaced (the registered one)."""
    original = yolo.model_info
    yolo.model_info = lambda *args, **kwargs: None
    yield original
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
        assert not hasattr(yolo.model_info, "__dynconv_original__")
        assert "DynamicConv" not in vars(yolo) and "C3_ODConv" not in vars(yolo)
        with pytest.raises(NameError, match="DynamicConv"):
            yolo.parse_model(copy.deepcopy(spec), ch=[3])
    finally:
        dyn_yolov5.register()
    assert dyn_yolov5.is_registered(yolo) and yolo.parse_model is not patched.__wrapped__
    assert yolo.model_info.__dynconv_original__.__module__ == "yolov5.utils.torch_utils"
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


def test_compat_draws_with_a_local_font_and_downloads_none(yolo, tmp_path, monkeypatch) -> None:
    """Where YOLOv5 would download Arial.ttf into its (here empty) settings folder, the plots
    draw with DejaVu Sans; a font that is there is used; the fonts have Pillow 9's getsize."""
    import numpy as np
    import yolov5.utils.general as general
    import yolov5.utils.plots as plots

    for module in (general, plots):
        monkeypatch.setattr(module, "CONFIG_DIR", tmp_path)
    dyn_yolov5.compat()
    assert dyn_yolov5.compat() == []  # idempotent
    assert hasattr(plots.check_pil_font, "__dynconv_original__")
    general.check_font("Arial.ttf", progress=True)  # YOLOv5 would download it here
    plots.check_font("Arial.Unicode.ttf")
    font = plots.check_pil_font(size=20)
    assert list(tmp_path.iterdir()) == []
    assert font.path == dyn_yolov5.local_font() and font.size == 20
    assert font.getsize("ellipse 0.93") == font.getbbox("ellipse 0.93")[2:]
    annotator = plots.Annotator(np.zeros((64, 96, 3), np.uint8), pil=True, example="abc")
    annotator.box_label([4, 30, 60, 60], "ellipse 0.93", color=(0, 200, 0))
    drawn = annotator.result()
    assert (drawn[:30, :, 1] == 200).any()  # the label's box, above the object's
    mono = Path(dyn_yolov5.local_font()).with_name("DejaVuSansMono.ttf")
    (tmp_path / "Arial.ttf").write_bytes(mono.read_bytes())  # a font in the settings folder
    assert plots.check_pil_font("Arial.ttf", 12).path == str(tmp_path / "Arial.ttf")
    assert hasattr(plots.check_pil_font("Arial.ttf", 12), "getsize")


def run_launcher(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """``python -m dynconv.integrations.yolov5 ARGS`` in ``cwd``: its output (stdout, then
    stderr), after checking that it succeeded, printed no traceback and downloaded nothing."""
    done = subprocess.run([sys.executable, "-m", "dynconv.integrations.yolov5", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-6000:]
    assert "Downloading" not in output, output[-4000:]
    return output


def test_launcher_trains_validates_detects_exports_and_the_checkpoint_loads_elsewhere(
    yolo, tmp_path
) -> None:
    """The docs' launcher commands, offline, in a fresh home (no font in YOLOv5's settings
    folder), plots on: each writes its files, prints its figures and no traceback."""
    data = write_shapes_dataset(tmp_path / "shapes", train=4, val=4, imgsz=64)
    image = tmp_path / "img.jpg"
    image.write_bytes((data.parent / "images" / "val" / "0000.jpg").read_bytes())
    home = tmp_path / "home"
    home.mkdir()
    env = {name: value for name, value in os.environ.items() if name not in (
        "YOLOV5_CONFIG_DIR", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")}
    env.update({"HOME": str(home), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "WANDB_MODE": "disabled",
                "PYTHONPATH": os.pathsep.join([str(Path(blocks.__file__).parents[2]),
                                               os.environ.get("PYTHONPATH", "")])})
    quick = ["--imgsz", "64", "--device", "cpu"]

    printed = run_launcher(["train", "--cfg", "yolov5n-dynconv.yaml", "--weights", "",
                            "--data", str(data), "--epochs", "1", "--imgsz", "64",
                            "--batch-size", "2", "--workers", "0", "--device", "cpu"],
                           tmp_path, env)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" in printed and "DejaVuSans.ttf" in printed
    assert re.search(r"YOLOv5n-dynconv summary: .* [\d.]+ GFLOPs", printed)
    run = tmp_path / "runs" / "train" / "exp"
    weights = run / "weights" / "best.pt"
    for name in ("weights/last.pt", "weights/best.pt", "results.csv", "labels.jpg",
                 "train_batch0.jpg", "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (run / name).is_file(), name  # the plots draw their labels with PIL's getsize
    assert (tmp_path / "cache" / "dynconv" / "yolov5" / "yolov5n-dynconv.yaml").is_file()

    printed = run_launcher(["val", "--weights", str(weights.relative_to(tmp_path)),
                            "--data", str(data), "--workers", "0", *quick], tmp_path, env)
    assert re.search(r"\n\s+all\s+4\s+\d+(\s+[\d.]+){4}\n", printed), printed[-2000:]
    assert (tmp_path / "runs" / "val" / "exp" / "confusion_matrix.png").is_file()
    assert (tmp_path / "runs" / "val" / "exp" / "val_batch0_labels.jpg").is_file()

    printed = run_launcher(["detect", "--weights", str(weights), "--source", str(image), *quick],
                           tmp_path, env)
    assert "image 1/1" in printed and (tmp_path / "runs" / "detect" / "exp" / "img.jpg").is_file()

    printed = run_launcher(["export", "--weights", str(weights), "--include", "onnx",
                            "--opset", "18", "--imgsz", "64", "--device", "cpu"], tmp_path, env)
    assert "export success" in printed and weights.with_suffix(".onnx").is_file()
    assert not list((home / ".config" / "Ultralytics").glob("*.ttf"))  # no font fetched

    script = f"""
import sys, torch
ckpt = torch.load({str(weights)!r}, map_location="cpu", weights_only=False)
model = ckpt["model"].float().eval()
assert "dynconv.integrations.yolov5" not in sys.modules  # nothing registered: classes suffice
layer = model.model[10]
shape = tuple(model(torch.zeros(1, 3, 64, 64))[0].shape)
print(type(layer).__module__, type(layer).__name__, shape)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # three classes: 3 anchors x (8x8 + 4x4 + 2x2) cells, 5 + 3 outputs each
    assert "dynconv.blocks.yolo DynamicConv (1, 252, 8)" in done.stdout, done.stdout


def summary_gflops(model, imgsz: int) -> float:
    """GFLOPs as YOLOv5's model summary prints them (``model.info``, one decimal)."""
    import yolov5.utils.torch_utils as torch_utils

    lines = []
    logger = torch_utils.LOGGER
    torch_utils.LOGGER = types.SimpleNamespace(info=lines.append)
    try:
        model.info(img_size=imgsz)
    finally:
        torch_utils.LOGGER = logger
    return float(re.search(r"([\d.]+) GFLOPs", lines[-1])[1])


@pytest.mark.parametrize("name", ["yolov5n", "yolov5n-dynconv", "yolov5n-odconv"])
def test_gflops_yolov5_prints_are_what_runs(yolo, quiet_info, name, tmp_path, monkeypatch):
    """YOLOv5's summary at 640: thop's count at 640 itself (the model as built: BatchNorm's
    element-wise work included), and after ``fuse()`` (as val, detect and export print it)
    dynconv's count of what runs. YOLOv5 alone profiles at 32x32 and multiplies by 400, the
    attentions' fixed per-image cost too (yolov5n-odconv: 5.4 shown)."""
    import yolov5.utils.torch_utils as torch_utils

    size = 640
    x = torch.zeros(1, 3, size, size)
    cfg = (str(stock_yaml(yolo, "n")) if name == "yolov5n"
           else dyn_yolov5.cfg_path(f"{name}.yaml", out_dir=tmp_path))
    torch.manual_seed(0)
    model = yolo.Model(cfg).eval()
    monkeypatch.setattr(yolo, "model_info", quiet_info)  # the registered one, from here on
    assert hasattr(quiet_info, "__dynconv_original__")
    thop_count = torch_utils.thop.profile(copy.deepcopy(model), inputs=(x,), verbose=False)[0]
    assert summary_gflops(model, size) == pytest.approx(thop_count * 2 / 1e9, abs=0.051)
    model.fuse()
    ours = count_macs(model, x) * 2 / 1e9
    assert summary_gflops(model, size) == pytest.approx(ours, abs=0.051)
    assert ours == pytest.approx(count_macs(yolo.Model(str(stock_yaml(yolo, "n"))), x) * 2 / 1e9,
                                 abs=0.005)  # the two attentions cost ~nothing


def test_a_kw_yaml_trains_a_step_saves_reloads_and_fuses(yolo, quiet_info, tmp_path) -> None:
    """'kw' is one more conv type: C3_KWConv in the neck, one warehouse per block, a training
    step with YOLOv5's loss moves the shared cells, and the checkpoint train.py writes (the
    pickled model in half precision) reloads elsewhere, warehouses still shared; fuse() folds
    the static blocks and keeps KW's BatchNorm, outputs unchanged."""
    from yolov5.utils.loss import ComputeLoss

    text = load(dyn_yolov5.cfg_path("yolov5n-odconv.yaml", out_dir=tmp_path))
    cfg = tmp_path / "yolov5n-kw.yaml"
    cfg.write_text(yaml.safe_dump(text).replace("C3_ODConv", "C3_KWConv"))
    torch.manual_seed(0)
    model = yolo.Model(str(cfg), nc=2).train()
    necks = [layer for layer in model.model if type(layer) is blocks.C3_KWConv]
    assert len(necks) == 4
    kw = [[m for m in block.modules() if isinstance(m, dynconv.KWConv2d)] for block in necks]
    assert all(block[0].warehouse.members == tuple(block) for block in kw)
    model.hyp = load(Path(sys.modules["yolov5"].__file__).parent / "data/hyps/hyp.scratch-low.yaml")
    cells = kw[0][0].warehouse.cells
    before = cells.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.3], [1, 1, 0.3, 0.6, 0.2, 0.25]])
    loss, _ = ComputeLoss(model)(model(torch.rand(2, 3, 64, 64)), targets)
    loss.backward()
    optimizer.step()
    assert not torch.equal(cells.detach(), before)
    path = tmp_path / "last.pt"
    torch.save({"epoch": 0, "model": copy.deepcopy(model).half()}, path)
    reference = copy.deepcopy(model).half().float().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)[0]
        loaded = torch.load(path, map_location="cpu", weights_only=False)["model"].float().eval()
        layers = [m for m in loaded.model[13].modules() if isinstance(m, dynconv.KWConv2d)]
        assert layers[0].warehouse.members == tuple(layers)
        torch.testing.assert_close(loaded(x)[0], expected)
        loaded.fuse()
        assert isinstance(loaded.model[13].cv1.bn, nn.Identity)  # static: folded
        assert isinstance(loaded.model[13].m[0].cv2.bn, nn.BatchNorm2d)  # KW: kept
        torch.testing.assert_close(loaded(x)[0], expected, rtol=1e-4, atol=1e-4)
