"""dynconv.integrations.ultralytics against the real Ultralytics package (the ``yolo`` extra)."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ultralytics")

from ultralytics import YOLO
from ultralytics.nn import tasks
from ultralytics.nn.modules.block import C3k
from ultralytics.utils.torch_utils import get_flops

import dynconv
import dynconv.integrations.ultralytics as dy_ultralytics
from dynconv.blocks import yolo as blocks
from dynconv.integrations.shapes import write_shapes_dataset
from dynconv.tools.convert import dynamic_layer_names, static_twin
from dynconv.tools.cost import count_macs

CFGS = dy_ultralytics.shipped_cfgs()
SCALES = "nsmlx"
SRC = Path(dy_ultralytics.__file__).parents[3]  # the src/ folder of the dynconv under test


def _family(cfg: str) -> str:
    return cfg.split("-")[0]


def _scaled(cfg: str, scale: str) -> str:
    family = _family(cfg)
    return cfg.replace(family, family + scale, 1)


def _stock(cfg: str, scale: str) -> str:
    return f"{_family(cfg)}{scale}.yaml"


@functools.cache
def _built(name: str) -> tasks.DetectionModel:
    return tasks.DetectionModel(name, verbose=False).eval()


def _build(name: str) -> tasks.DetectionModel:
    """A fresh copy of the model Ultralytics builds for ``name`` (built once per session)."""
    return copy.deepcopy(_built(name))


def test_the_expected_yamls_ship():
    assert CFGS == sorted([
        "yolo11-drconv.yaml", "yolo11-dynconv.yaml", "yolo11-odconv.yaml", "yolov5-dynconv.yaml",
        "yolov8-drconv.yaml", "yolov8-dynconv-down.yaml", "yolov8-dynconv.yaml",
        "yolov8-odconv.yaml",
    ])


@pytest.mark.parametrize("cfg", CFGS)
def test_a_shipped_yaml_is_the_stock_model_with_dynamic_blocks(cfg):
    """Same rows as the stock YAML once each block name reads the stock block it stands in for."""
    import yaml

    ours = yaml.safe_load((dy_ultralytics.CFG_DIR / cfg).read_text())
    stock = tasks.yaml_model_load(_stock(cfg, ""))
    aliases = tasks._dynconv_stock_class
    renamed = 0
    for section in ("backbone", "head"):
        assert len(ours[section]) == len(stock[section])
        for row, ref in zip(ours[section], stock[section]):
            name = row[2]
            if name in dy_ultralytics.BLOCKS:
                name = aliases(dy_ultralytics.BLOCKS[name]).__name__
                renamed += 1
            assert [row[0], row[1], name, row[3]] == ref[:4]
    assert renamed >= 2
    assert ours["scales"] == stock["scales"] and ours["nc"] == stock["nc"]


def _conv_geometry(model: nn.Module) -> dict[str, tuple]:
    """Every parameter and buffer shape, with the dynamic layers as the static convolutions of
    the same geometry: equal for two models exactly when they have the same architecture."""
    twin = static_twin(model)
    return {name: tuple(t.shape) for name, t in twin.state_dict().items()}


def _parse_on_meta(name: str) -> tuple[nn.Sequential, bool]:
    """The layers ``parse_model`` builds for ``name`` (on the meta device: no memory, no init
    cost) and the head style it chose (``Detect.legacy``)."""
    spec = tasks.yaml_model_load(name)
    with torch.device("meta"):
        layers, _ = tasks.parse_model(copy.deepcopy(spec), ch=3, verbose=False)
    return layers, layers[-1].legacy


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("cfg", CFGS)
def test_every_shipped_yaml_builds_at_every_scale_like_the_stock_model(cfg, scale):
    model, legacy = _parse_on_meta(_scaled(cfg, scale))
    stock, stock_legacy = _parse_on_meta(_stock(cfg, scale))
    assert dynamic_layer_names(model), "the model has dynamic layers"
    assert _conv_geometry(model) == _conv_geometry(stock)  # channels, width, depth, repeats
    assert legacy == stock_legacy  # v8 or v11 head, as parse_model decided for stock
    assert [type(m).__name__ in dy_ultralytics.BLOCKS for m in model].count(True) >= 2
    if cfg.startswith("yolo11") and scale in "mlx":  # parse_model forces C3k inner blocks there
        assert isinstance(stock[22].m[0], C3k)
        assert isinstance(model[22].m[0], blocks.C3k)
        assert model[22].m[0].conv_type == model[22].conv_type != "static"


@pytest.mark.parametrize("cfg", CFGS)
def test_a_shipped_yaml_runs_like_the_stock_model(cfg):
    """Built for real at scale n: the same strides and per-layer output shapes as stock."""
    model, stock = _build(_scaled(cfg, "n")), _build(_stock(cfg, "n"))
    assert torch.equal(model.stride, stock.stride)

    def shapes(net: tasks.DetectionModel) -> list[tuple[int, ...]]:
        found: list[tuple[int, ...]] = []
        handles = [layer.register_forward_hook(lambda m, i, o: found.append(tuple(o.shape)))
                   for layer in net.model[:-1]]
        with torch.no_grad():
            net(torch.rand(2, 3, 64, 64))
        for handle in handles:
            handle.remove()
        return found

    assert shapes(model) == shapes(stock)


def test_an_unknown_module_stays_a_clear_error():
    with pytest.raises(KeyError, match="C2f_NoSuchConv"):
        tasks.parse_model({"nc": 1, "backbone": [[-1, 1, "C2f_NoSuchConv", [16]]], "head": []},
                          ch=3, verbose=False)


def test_registration_is_idempotent_and_undone():
    patched = tasks.parse_model
    dy_ultralytics.register()
    assert tasks.parse_model is patched and dy_ultralytics.is_registered()
    try:
        dy_ultralytics.unregister()
        assert not dy_ultralytics.is_registered()
        assert tasks.parse_model is patched.__wrapped__
        assert "C2f_ODConv" not in vars(tasks)
        with pytest.raises(KeyError):
            _build(dy_ultralytics.cfg_path("yolov8n-odconv.yaml"))
    finally:
        dy_ultralytics.register()
    assert dy_ultralytics.is_registered() and "C2f_ODConv" in vars(tasks)
    assert dy_ultralytics.cfg_path("yolov8n-odconv.yaml").startswith(str(dy_ultralytics.CFG_DIR))


def test_an_unsupported_version_names_the_tested_range(monkeypatch):
    import ultralytics

    dy_ultralytics.unregister()
    monkeypatch.setattr(ultralytics, "__version__", "9.0.1")
    try:
        with pytest.raises(RuntimeError, match=r"ultralytics >=8\.4,<8\.5 \(tested with 8\.4"):
            dy_ultralytics.register()
        assert not dy_ultralytics.is_registered()
    finally:
        monkeypatch.undo()
        dy_ultralytics.register()
    assert dy_ultralytics.is_registered()


def test_shipped_yamls_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = YOLO("yolo11s-dynconv.yaml")
    assert model.model.yaml["scale"] == "s"
    assert isinstance(model.model.model[13], blocks.VARIANTS["C3k2_DynamicConv"])
    with pytest.raises(ValueError, match="no shipped model YAML"):
        dy_ultralytics.cfg_path("yolov8n-nosuch.yaml")


def test_the_seed_001_name_builds_the_dynamic_conv():
    spec = {"nc": 2, "backbone": [[-1, 1, "Conv", [32, 3, 2]],
                                  [-1, 1, "Dynamic_conv2d", [64, 1, 1]]], "head": []}
    model, _ = tasks.parse_model(copy.deepcopy(spec), ch=3, verbose=False)
    layer = model[1]
    assert isinstance(layer, blocks.VARIANTS["DynamicConv"])
    assert (layer.conv.in_channels, layer.conv.out_channels, layer.conv.kernel_size) == (
        32, 64, (1, 1))


@pytest.mark.parametrize("cfg", CFGS)
def test_gflops_count_the_dynamic_layers(cfg):
    """model.info()'s GFLOPs (thop) never fall below the stock model's, and agree with dynconv's
    own count up to what thop adds for every model (BatchNorm, activations, pooling)."""
    size = 160
    x = torch.zeros(1, 3, size, size)
    figures = {}
    for name in (_scaled(cfg, "n"), _stock(cfg, "n")):
        model = _build(name)
        figures[name] = get_flops(model, size), 2 * count_macs(model, x) / 1e9
    (ours_thop, ours), (stock_thop, stock) = figures.values()
    assert ours_thop >= stock_thop > 0
    assert ours >= stock
    assert ours_thop / ours == pytest.approx(stock_thop / stock, rel=2e-3)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("cfg", CFGS)
def test_fuse_folds_batchnorm_into_the_dynamic_blocks_exactly(cfg):
    torch.manual_seed(0)
    model = _build(_scaled(cfg, "n"))
    for m in model.modules():  # statistics that are not the identity, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 3, 64, 64)
    before = _outputs(model, x)
    model.fuse(verbose=False)
    convs = [m for m in model.modules() if isinstance(m, blocks.Conv)]
    assert convs and all(isinstance(m.bn, nn.Identity) for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(_outputs(model, x), before, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cfg", CFGS)
def test_onnx_export_matches_pytorch_in_onnxruntime(cfg, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    model = YOLO(_scaled(cfg, "n"))
    reference = copy.deepcopy(model.model).eval()
    for dynamic in (False, True):
        path = model.export(format="onnx", imgsz=64, dynamic=dynamic, batch=1, simplify=False)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for batch, size in ((1, 64), (3, 96)) if dynamic else ((1, 64),):
            x = torch.rand(batch, 3, size, size)
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            np.testing.assert_allclose(got, _outputs(reference, x).numpy(), rtol=1e-4, atol=2e-3)


TRAIN_CFGS = ["yolov8n-odconv.yaml", "yolo11n-drconv.yaml"]


@pytest.fixture
def keep_torch_threads():
    """Ultralytics' CPU trainer sets torch's thread count to cores - 1: put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cfg", TRAIN_CFGS)
@pytest.mark.usefixtures("keep_torch_threads")
def test_trains_offline_then_reloads_and_predicts_in_a_fresh_process(cfg, tmp_path):
    data = write_shapes_dataset(tmp_path / "data", train=6, val=4, imgsz=64)
    model = YOLO(cfg)
    initial = {k: v.clone() for k, v in model.model.state_dict().items() if "conv.weight" in k}
    model.train(data=str(data), epochs=1, imgsz=64, batch=4, workers=0, device="cpu",
                amp=False, plots=False, project=str(tmp_path / "runs"), name="t", exist_ok=True,
                verbose=False)
    best = tmp_path / "runs" / "t" / "weights" / "best.pt"
    assert best.is_file()
    metrics = model.val(data=str(data), imgsz=64, batch=4, workers=0, device="cpu",
                        plots=False, project=str(tmp_path / "runs"), name="v", exist_ok=True,
                        verbose=False)
    assert 0.0 <= metrics.box.map50 <= 1.0
    trained = YOLO(str(best)).model.float().state_dict()
    changed = [k for k, v in initial.items() if not torch.equal(trained[k], v)]
    assert any(".m.0.cv1.conv.weight" in k for k in changed), "the dynamic kernels trained"

    image = next((data.parent / "images" / "val").glob("*.jpg"))
    script = textwrap.dedent(f"""
        import contextlib, os, sys
        import torch
        import dynconv  # no registration call
        from ultralytics import YOLO
        how = os.environ["HOW"]
        if how == "integration":
            import dynconv.integrations.ultralytics
        else:
            assert "dynconv.integrations.ultralytics" not in sys.modules
        scope = dynconv.safe_load_globals() if how == "block" else contextlib.nullcontext()
        try:
            with scope:
                model = YOLO({str(best)!r})
        except TypeError as error:
            print("REFUSED", error)
            raise SystemExit(0)
        assert not set(dynconv.integrations.safe_load.module_classes()) & set(
            torch.serialization.get_safe_globals())  # nothing left allowed after the load
        kinds = {{type(m).__name__ for m in model.model.modules()}}
        assert kinds & {{"DynamicConv2d", "ODConv2d", "DRConv2d"}}, kinds
        results = model.predict({str(image)!r}, imgsz=64, device="cpu", verbose=False)
        print("PREDICTED", len(results), results[0].boxes.data.shape[-1])
    """)
    # Ultralytics' default load (weights_only=False); its weights_only safe-load mode, which
    # builds dynconv's classes inside safe_load_globals() or with the integration imported only
    for safe, how, expected in (("0", "plain", "PREDICTED 1 6"),
                                ("1", "plain", "REFUSED"),
                                ("1", "block", "PREDICTED 1 6"),
                                ("1", "integration", "PREDICTED 1 6")):
        env = {**os.environ, "PYTHONPATH": str(SRC), "ULTRALYTICS_SAFE_LOAD": safe,
               "HOW": how}
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        assert expected in run.stdout, (safe, how, run.stdout[-2000:])
        if expected == "REFUSED":  # Ultralytics' own refusal of classes it does not know
            assert "references types outside the supported" in run.stdout, run.stdout[-2000:]


def _launch(args: list[str], cwd: Path) -> str:
    """``python -m dynconv.integrations.ultralytics ARGS`` in ``cwd``: its stdout, after checking
    that it succeeded and printed no traceback."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    run = subprocess.run([sys.executable, "-m", "dynconv.integrations.ultralytics", *args],
                         capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "Traceback" not in run.stdout + run.stderr, run.stderr[-4000:]
    return run.stdout


def test_the_launcher_runs_the_yolo_command_line_with_the_blocks(tmp_path):
    """docs/yolo.md's offline train on the generated data set (one epoch here), then predict
    with the weights it wrote (a folder of our own: Ultralytics' default is in its settings)."""
    data = write_shapes_dataset(tmp_path / "shapes", train=4, val=2, imgsz=64)
    image = next((data.parent / "images" / "val").glob("*.jpg"))
    printed = _launch(["train", "model=yolov8n-dynconv.yaml", f"data={data}", "epochs=1",
                       "imgsz=64", "batch=2", "device=cpu", "workers=0",
                       f"project={tmp_path / 'runs'}", "name=train"], tmp_path)
    assert "YOLOv8n-dynconv summary" in printed and "1 epochs completed" in printed
    best = tmp_path / "runs" / "train" / "weights" / "best.pt"
    assert best.is_file()
    printed = _launch(["predict", f"model={best}", f"source={image}", "imgsz=64", "device=cpu",
                       f"project={tmp_path / 'runs'}", "name=p", "save=False"], tmp_path)
    assert "image 1/1" in printed and "64x64" in printed


def _total(out) -> torch.Tensor:
    """The sum of every tensor in a model's output (tensors, lists, tuples and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    values = out.values() if isinstance(out, dict) else out
    return sum(_total(value) for value in values)


def test_a_kw_yaml_builds_trains_a_step_saves_and_reloads(tmp_path):
    """'kw' is one more conv type: a YAML naming C2f_KWConv builds with one warehouse per block,
    runs forward and backward at batch 1, and the checkpoint Ultralytics' save() writes (the
    pickled model in half precision) reloads through YOLO() and in safe-load mode, warehouses
    still shared, with the same outputs."""
    cfg = tmp_path / "yolov8n-kw.yaml"
    cfg.write_text((dy_ultralytics.CFG_DIR / "yolov8-odconv.yaml").read_text().replace(
        "C2f_ODConv", "C2f_KWConv"))
    torch.manual_seed(0)
    model = YOLO(str(cfg))
    net = model.model

    def warehouses(network: nn.Module) -> list[set[int]]:
        return [{id(layer.warehouse) for layer in block.modules()
                 if isinstance(layer, dynconv.KWConv2d)}
                for block in network.model if isinstance(block, blocks.VARIANTS["C2f_KWConv"])]

    found = warehouses(net)
    assert len(found) == 4 and all(len(ids) == 1 for ids in found)
    assert len(set.union(*found)) == 4
    net.train()
    _total(net(torch.rand(1, 3, 64, 64))).backward()
    cells = net.model[12].m[0].cv1.conv.warehouse.cells
    assert cells.grad is not None and cells.grad.abs().sum() > 0
    path = tmp_path / "kw.pt"
    model.save(str(path))
    reference = copy.deepcopy(net).half().float().eval()
    x = torch.rand(2, 3, 64, 64)
    expected = _outputs(reference, x)
    unwrapped = dy_ultralytics._patches.original(tasks, "torch_safe_load")
    with pytest.raises(TypeError, match="references types outside the supported"):
        unwrapped(str(path), safe_only=True)  # weights_only=True: Ultralytics' classes only...
    safe, _ = tasks.torch_safe_load(str(path), safe_only=True)  # ...and dynconv's, here
    for loaded in (YOLO(str(path)).model.float().eval(), safe["model"].float().eval()):
        assert [len(ids) for ids in warehouses(loaded)] == [1, 1, 1, 1]
        layers = [m for m in loaded.model[12].modules() if isinstance(m, dynconv.KWConv2d)]
        assert layers[0].warehouse.members == tuple(layers)
        torch.testing.assert_close(_outputs(loaded, x), expected)
