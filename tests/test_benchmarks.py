"""The device report of the benchmark suite (``make bench-gpu``; ``--device cpu --quick`` on
the CPU) keeps working: run on a tiny plan, it writes every table with every type, the rule's
and autotune's picks and the memory targets. Timings are never asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device as device_report  # noqa: E402
import dispatch  # noqa: E402
import layers  # noqa: E402
import models  # noqa: E402
from layers import Shape  # noqa: E402

from dynconv import KWConv2d, Warehouse  # noqa: E402
from dynconv.functional import tuning  # noqa: E402

TINY = Shape("tiny 8x8", 8, 8, 3, 8)

pytest.importorskip("ultralytics")


def test_the_device_report_runs_on_the_cpu(monkeypatch) -> None:
    tiny = device_report.Plan(shapes=[TINY], batches=[1, 4],
                              dtypes=["float32", "bfloat16"], resnet18_batch=4,
                              resnet50=(2, 32), yolo=(1, 64),
                              model_types=["static", "dynamic", "odconv"])
    monkeypatch.setattr(device_report, "plan_for", lambda device, quick: tiny)
    tuning.reset_autotune()
    try:
        text = device_report.run(torch.device("cpu"), True, 0.001, (1, 1))
    finally:
        tuning.reset_autotune()
    layers, models = text.split("### Models")
    rows = [line.split(" | ") for line in layers.splitlines() if line.startswith("| tiny")]
    # every type at every batch and dtype, with a rule's and an autotune's pick each
    assert sorted({(r[1], r[2], r[3]) for r in rows}) == sorted(
        (str(n), d, t) for n in (1, 4) for d in ("float32", "bfloat16")
        for t in device_report.LAYER_TYPES)
    picks = {r[3]: (r[11], r[12]) for r in rows if r[1] == "4" and r[2] == "float32"}
    assert picks["DY-Conv"][0].startswith("aggregate/")  # the rule assembles the kernels
    assert "KW" in device_report.LAYER_TYPES
    # KW always assembles its kernels: a per-sample method (forward / forward+backward)
    assert set(picks["KW"][0].split(" / ")) <= {"grouped", "unfold"}
    assert all(re.fullmatch(r"[a-z/, ]+", pick) for pair in picks.values() for pick in pair)
    assert "(unmeasured" not in layers and "Dispatch table for cpu: measured" in text
    for task in ("ResNet-18 CIFAR train N=4", "ResNet-50 32px train N=2",
                 "YOLOv8n 64px f+b N=1"):
        assert f"| {task} | static |" in models and f"| {task} | dynamic |" in models
    assert re.search(r"dynamic: [\d.]+x static \(target 1.5x: (met|MISSED by \d+%)\)", models)
    assert re.search(r"odconv: [\d.]+x static \(target 2.0x: (met|MISSED by \d+%)\)", models)
    assert re.search(r"^autotune: \d+ shapes: \d+ timed in ", text, re.M)


def test_make_bench_gpu_runs_the_device_report() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^bench-gpu: .*\n(\t.*\n)*?\t.*benchmarks/run\.py --tables device "
                     r"--device cuda --output runs/bench-gpu\.md \$\(ARGS\)", makefile, re.M)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tables",
                           "nothing"], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "'device'" in done.stderr


def test_the_layer_and_dispatch_tables_have_kw_rows(monkeypatch) -> None:
    """KernelWarehouse against nn.Conv2d and the official formulation, and its per-sample
    formulations forced in turn, on a tiny shape."""
    monkeypatch.setattr(layers, "QUICK_SHAPES", [TINY])
    monkeypatch.setattr(layers, "QUICK_BATCHES", [1, 4])
    text = layers.run(torch.device("cpu"), True, 0.001, (1, 1), memory=False)
    kw = text.split("### KW")[1]
    rows = [line.split(" | ") for line in kw.splitlines() if line.startswith("| tiny")]
    assert [r[1] for r in rows] == ["1", "4"]
    assert all(re.fullmatch(r"[\d.]+", r[8]) for r in rows)  # f+b x the official code
    monkeypatch.setattr(dispatch, "SHAPES", [TINY] * 4)
    text = dispatch.run(torch.device("cpu"), True, 0.001, (1, 1))
    kw = text.split("### KW: x conv per formulation (* = auto)")[1]
    rows = [line for line in kw.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 3 * 2 and all(row.count("*") == 1 for row in rows)


def test_the_kw_resnets_share_one_warehouse_per_stage() -> None:
    model = models.build_model("kw", torch.device("cpu"))
    warehouses = {id(m): m for m in model.modules() if isinstance(m, Warehouse)}
    # the official kw_resnet18: block convolutions and strided shortcuts, a stage's first
    # convolution and shortcut in the previous stage's warehouse
    assert len(warehouses) == 4
    assert [len(w.members) for w in warehouses.values()] == [6, 5, 5, 3]
    assert sum(isinstance(m, KWConv2d) for m in model.modules()) == 19
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "kw" in models.TYPES
    assert "kw" in device_report.plan_for(torch.device("cpu"), False).model_types
