"""Analytic MACs, the FLOP counters users run (FlopCounterMode, thop), and dynconv profile."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynconv import DRConv2d, DynamicConv2d, KWConv2d, ODConv2d, Warehouse
from dynconv.cli import main
from dynconv.functional import mixture
from dynconv.models import create_model
from dynconv.tools.convert import static_twin
from dynconv.tools.cost import (
    LayerMacs,
    count_macs,
    count_parameters,
    layer_macs,
    peak_memory_bytes,
)
from dynconv.tools.counters import register_thop, thop_ops
from dynconv.tools.profile import build_model, profile_model

torch.set_num_threads(1)


def _kw_in_a_shared_warehouse() -> KWConv2d:
    """The second layer of a warehouse at cell_num_ratio 1/2 with the non-local basis."""
    warehouse = Warehouse(0.5)
    KWConv2d(8, 8, 1, warehouse=warehouse)
    return KWConv2d(8, 12, 3, stride=2, padding=1, bias=False, warehouse=warehouse,
                    nonlocal_basis_ratio=0.5)


def _layers() -> dict[str, tuple[nn.Module, LayerMacs]]:
    """Each layer type on a 10x10 input, with its MACs per image worked out by hand."""
    hw = 10 * 10
    return {
        # KernelWarehouse alone: cells 12 x 8 x 1 x 1 (the layer's widths), m = n = 9 (one own
        # cell per kernel position); attention fc1 C_in->16, fc2 16->(n + 1)*m; assembly m*n
        # cells of 96 weights
        "kw": (KWConv2d(8, 12, 3, padding=1),
               LayerMacs(12 * 8 * 9 * hw, 8 * 16 + 16 * 10 * 9, 9 * 9 * 96)),
        # shared with an 8->8 1x1 layer: cells 4 x 8 x 1 x 1 (the gcds), m = 9 * 3; at ratio 1/2
        # the 1x1 layer owns 1 cell, this one 13 (the official i % 2 == (i // 2) % 2): n = 14;
        # the basis: fc2 16->(13 own + 16 basis + 1 zero)*m, fc3 16->1 other cell per mixture
        "kw shared, basis": (_kw_in_a_shared_warehouse(),
                             LayerMacs(12 * 8 * 9 * 25, 8 * 16 + 16 * 30 * 27 + 27 * 16 * 1,
                                       27 * 14 * 32)),
        # conv: C_out * C_in/g * k*k * H_out*W_out; attention fc1 C_in->hidden, fc2 hidden->K;
        # aggregation K * (kernel elements + C_out for the bias bank)
        "dynamic softmax": (DynamicConv2d(8, 12, 3, padding=1, num_kernels=4),
                            LayerMacs(12 * 8 * 9 * hw, 8 * 2 + 2 * 4, 4 * (12 * 8 * 9 + 12))),
        "dynamic sigmoid": (DynamicConv2d(8, 12, 3, stride=2, padding=1, routing="sigmoid",
                                          num_kernels=3, bias=False),
                            LayerMacs(12 * 8 * 9 * 25, 8 * 2 + 2 * 3, 3 * 12 * 8 * 9)),
        "dynamic K=1": (DynamicConv2d(8, 12, 3, padding=1, num_kernels=1),
                        LayerMacs(12 * 8 * 9 * hw)),
        # ODConv: fc C_in->A (A = 16 by min_channels), heads A->C_in, A->C_out, A->k*k, A->K
        "odconv": (ODConv2d(8, 12, 3, padding=1, num_kernels=4),
                   LayerMacs(12 * 8 * 9 * hw, 8 * 16 + 16 * (8 + 12 + 9 + 4), 4 * 12 * 8 * 9)),
        "odconv grouped+bias": (ODConv2d(8, 12, 3, padding=1, groups=2, bias=True,
                                         attention_norm="none"),
                                LayerMacs(12 * 4 * 9 * hw, 8 * 16 + 16 * (8 + 12 + 9 + 4),
                                          4 * (12 * 4 * 9 + 12))),
        # depthwise: no filter head
        "odconv depthwise": (ODConv2d(8, 8, 3, padding=1, groups=8, num_kernels=2),
                             LayerMacs(8 * 9 * hw, 8 * 16 + 16 * (8 + 9 + 2), 2 * 8 * 9)),
        # 1x1 with K = 1: no spatial and no kernel head, nothing mixed
        "odconv 1x1 K=1": (ODConv2d(8, 12, 1, num_kernels=1),
                           LayerMacs(12 * 8 * hw, 8 * 16 + 16 * (8 + 12))),
        # DRConv: one region's kernel per pixel (a static conv's MACs); attention: the guide
        # C_in -> R at every output pixel, the generator's 1x1 C_in -> R*R and grouped 1x1
        # (R groups of R inputs) -> R * C_out * C_in/g, both on the k*k pooled positions
        "drconv": (DRConv2d(8, 12, 3, padding=1, num_regions=4),
                   LayerMacs(12 * 8 * 9 * hw, 4 * 8 * 9 * hw + (8 * 16 + 16 * 12 * 8) * 9)),
        "drconv stride 2": (DRConv2d(8, 12, 3, stride=2, padding=1, num_regions=2),
                            LayerMacs(12 * 8 * 9 * 25, 2 * 8 * 9 * 25 + (8 * 4 + 4 * 12 * 8) * 9)),
        "static": (nn.Conv2d(8, 12, 3, padding=1, groups=2), LayerMacs(12 * 4 * 9 * hw)),
    }


@pytest.mark.parametrize("case", list(_layers()))
def test_layer_macs_match_the_hand_count(case):
    layer, expected = _layers()[case]
    assert layer_macs(layer, (10, 10)) == expected


def _counted_by_flop_counter(model: nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


@pytest.mark.parametrize("case", list(_layers()))
def test_flop_counter_agrees_with_the_aggregate_formulation(case, monkeypatch):
    """With the kernels assembled per sample, FlopCounterMode counts the grouped convolution and
    the matrix products: exactly the analytic count. DRConv's restricted formulation (each pixel
    with its region's kernel only) is counted exactly too; its dense one runs all R kernels."""
    monkeypatch.setattr(mixture, "_choose_mixture_method", lambda *a: "aggregate")
    layer, expected = _layers()[case]
    layer.eval()
    if isinstance(layer, DRConv2d):
        layer.method = "restricted"
    assert _counted_by_flop_counter(layer, torch.randn(3, 8, 10, 10)) == expected.total


def test_mixout_runs_more_than_the_layer_costs_but_count_macs_does_not_change(monkeypatch):
    layer = DynamicConv2d(8, 12, 3, padding=1, num_kernels=4, bias=False).eval()
    x = torch.randn(3, 8, 10, 10)
    analytic = layer_macs(layer, (10, 10))
    monkeypatch.setattr(mixture, "_choose_mixture_method", lambda *a: "mixout")
    ran = _counted_by_flop_counter(layer, x)
    # K dense convolutions and one mixing product per output element
    assert ran == 4 * analytic.conv + analytic.attention + 4 * 12 * 100
    assert count_macs(layer, x) == analytic.total
    monkeypatch.setattr(mixture, "_choose_mixture_method", lambda *a: "aggregate")
    assert count_macs(layer, x) == analytic.total


def _mixed_model() -> nn.Sequential:
    """Every layer type in one model (no normalisation and a max-pool: thop counts norms and
    average pools, the analytic rule and FlopCounterMode do not); three KernelWarehouse layers
    share a warehouse, one of them with the non-local basis."""
    warehouse = Warehouse(0.5)
    kw = {"warehouse": warehouse, "attention_norm": "none"}
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        DynamicConv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        DynamicConv2d(12, 12, 3, stride=2, padding=1, routing="sigmoid"),
        ODConv2d(12, 16, 3, padding=1, attention_norm="none"),
        ODConv2d(16, 16, 3, padding=1, groups=16, attention_norm="none"),
        ODConv2d(16, 8, 1, num_kernels=1, attention_norm="none"),
        KWConv2d(8, 8, 3, padding=1, **kw),
        KWConv2d(8, 16, 3, stride=2, padding=1, bias=False, nonlocal_basis_ratio=0.5, **kw),
        KWConv2d(16, 8, 1, **kw),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def _analytic_total(model: nn.Module, hw: int) -> int:
    total, size = 0, (hw, hw)
    for m in model:
        if isinstance(m, nn.Conv2d | DynamicConv2d | ODConv2d | KWConv2d):
            total += layer_macs(m, size).total
            size = (size[0] + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1, \
                   (size[1] + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
    return total + 8 * 5


def test_count_macs_and_flop_counter_on_a_model_of_every_layer_type(monkeypatch):
    model = _mixed_model()
    x = torch.randn(2, 3, 12, 12)
    expected = _analytic_total(model, 12)
    assert count_macs(model, x) == expected
    monkeypatch.setattr(mixture, "_choose_mixture_method", lambda *a: "aggregate")
    assert _counted_by_flop_counter(model, x) == expected


def _thop_pooling_ops(model: nn.Module, x: torch.Tensor) -> int:
    """What thop adds for the attentions' global average pools: H*W adds and a divide per
    output (the pools are modules so that thop's size extrapolation sees a fixed cost)."""
    ops: list[int] = []

    def hook(module, args, out):
        ops.append(out.numel() * (args[0].shape[-2] * args[0].shape[-1] + 1))

    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert pools, "every attention pools with an nn.AdaptiveAvgPool2d module"
    handles = [m.register_forward_hook(hook) for m in pools]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return sum(ops)


def test_thop_counts_the_dynamic_layers_after_registration():
    thop = pytest.importorskip("thop")
    model = _mixed_model()
    x = torch.randn(2, 3, 12, 12)
    expected = 2 * _analytic_total(model, 12) + _thop_pooling_ops(model, x)
    assert thop.profile(model, inputs=(x,), custom_ops=thop_ops(), verbose=False)[0] == expected
    assert register_thop() and register_thop()  # idempotent
    ops, params = thop.profile(model, inputs=(x,), verbose=False)
    assert ops == expected
    # the warehouse three layers hold is one tensor, counted once
    assert params == count_parameters(model) < sum(
        p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def test_static_twin_has_static_convs_of_the_same_geometry():
    model = _mixed_model()
    twin = static_twin(model)
    assert all(type(m) in (nn.Conv2d, nn.ReLU, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
               for m in twin)
    for a, b in zip(model, twin):
        if isinstance(b, nn.Conv2d):
            assert (a.in_channels, a.out_channels, a.kernel_size, a.stride, a.padding,
                    a.groups) == (b.in_channels, b.out_channels, b.kernel_size, b.stride,
                                  b.padding, b.groups)
    x = torch.randn(1, 3, 12, 12)
    assert twin(x).shape == model(x).shape
    assert count_macs(twin, x) == _static_total(model, 12)


def _static_total(model: nn.Module, hw: int) -> int:
    total, size = 0, (hw, hw)
    for m in model:
        if hasattr(m, "kernel_size"):
            ho = (size[0] + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
            total += m.out_channels * m.in_channels // m.groups * m.kernel_size[0] ** 2 * ho * ho
            size = (ho, ho)
    return total + 8 * 5


def test_peak_memory_covers_the_output():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(4, 3, 16, 16)
    assert peak_memory_bytes(conv, x) >= 4 * 16 * 16 * 16 * 4


def test_cpu_peak_memory_prints_no_profiler_log(tmp_path):
    """The profiler's C++ log (``profiler_start``/``profiler_stop`` markers, and on a CUDA build
    without a driver ``gpuGetDeviceCount failed``) stays out of the output; in a fresh process,
    because Kineto reads its log level once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    script = ("import torch\nfrom dynconv.tools.cost import peak_bytes_of\n"
              "print(peak_bytes_of(lambda: torch.ones(1000) + 1))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 4000  # the 1000 floats of the sum, at least
    assert done.stderr == ""


def test_profile_model_reports_both_models():
    model = build_model("small_cnn", "dynamic", {"width": 4}, (1, 8, 8))
    report = profile_model(model, (1, 8, 8), batch_sizes=(2,), min_run_time=0.01)
    static = create_model("small_cnn", conv_type="static", width=4, in_channels=1)
    assert report.static_macs == count_macs(static, torch.randn(1, 1, 8, 8))
    assert report.macs == count_macs(model, torch.randn(1, 1, 8, 8))
    assert report.macs > report.static_macs
    assert sum(r.macs.total for r in report.layers) + 16 * 10 == report.macs  # + the classifier
    assert [r.name for r in report.layers][:2] == ["stem.0", "stage1.0.0"]
    assert set(report.latency_ms) == set(report.peak_memory) == {2}
    assert all(v > 0 for pair in report.peak_memory.values() for v in pair)
    text = str(report)
    assert "total" in text and "DynamicConv2d" in text


def test_profile_counts_a_shared_warehouse_once():
    """The cells that three KernelWarehouse layers hold are one row of their own: no layer's row
    counts them, and the rows add up to the model's parameters."""
    model = _mixed_model()
    cells = model[7].warehouse.cells.numel()
    report = profile_model(model, (3, 12, 12), timing=False)
    (shared,) = report.shared
    assert (shared.name, shared.type, shared.layers, shared.params) == (
        "7.warehouse", "Warehouse", ["7", "8", "9"], cells)
    rows = {r.name: r for r in report.layers}
    assert rows["7"].params == count_parameters(model[7]) - cells
    assert rows["7"].static_params == 8 * 8 * 9 + 8
    classifier = 8 * 5 + 5
    assert sum(r.params for r in report.layers) + cells + classifier == report.params
    assert report.params == count_parameters(model)
    lines = str(report).splitlines()
    assert any(line.split()[:4] == ["7.warehouse", "Warehouse", "shared", "by"]
               and f"{cells:,}" in line for line in lines)
    (other,) = [line for line in lines if line.startswith("other")]
    assert other.split()[3] == f"{classifier:,}"  # "other (linear, ...)" is three words


def test_profile_rejects_bad_sizes():
    model = build_model("small_cnn", None, {}, (1, 8, 8))
    with pytest.raises(ValueError, match="input_size"):
        profile_model(model, (8, 8), timing=False)
    with pytest.raises(ValueError, match="batch sizes"):
        profile_model(model, (1, 8, 8), batch_sizes=(0,))


def test_cli_profile(capsys):
    assert main(["profile", "small_cnn", "--conv-type", "odconv", "--input-size", "1", "8", "8",
                 "--model-arg", "width=4", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "ODConv2d" in out and "static twin" in out
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "no_such_model", "--no-timing"])
    assert exit_.value.code == 2
    assert "argument MODEL: unknown model 'no_such_model'" in capsys.readouterr().err
