"""The dispatch rule per device type and opt-in autotuning (``dynconv.autotune``): choices by
an injected timer, the keys, the cache file, the distributed agreement (2 processes over gloo)
and that a tuned model computes what an untuned one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import dynconv
from dynconv import DRConv2d, DynamicConv2d, ODConv2d
from dynconv._conv_args import parse_geometry
from dynconv.functional import dispatch, per_sample_conv2d, tuning
from dynconv.functional.mixture import _choose_mixture_method
from dynconv.functional.per_sample import _choose_per_sample_method
from dynconv.functional.region import _choose_region_method

from helpers import assert_same_outputs_and_grads

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _fresh_tuner():
    """Every test starts untuned, with autotuning off, and leaves it so."""
    tuning.reset_autotune()
    with dynconv.autotune(False):
        yield
    tuning.reset_autotune()


class FakeTimer:
    """Seconds per formulation from a table (the rest: 1 s); runs each call, records them."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds = seconds or {}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, key: tuning.TuneKey, method: str, run) -> float:
        run()
        self.calls.append((key.text.split()[0], method))
        return self.seconds.get(method, 1.0)

    def methods(self) -> set[str]:
        return {method for _, method in self.calls}


# -- the rule per device type ---------------------------------------------------------------------


def test_each_device_type_has_its_table_and_others_use_the_cpu_one() -> None:
    assert dispatch.rule_for("cuda:1") is dispatch.RULES["cuda"]
    for other in ("cpu", "meta", "mps", torch.device("xpu")):
        assert dispatch.rule_for(other) is dispatch.RULES["cpu"]
    assert "measured" in dispatch.RULES["cpu"].source
    assert "unmeasured" in dispatch.RULES["cuda"].source


def test_the_per_sample_rule_reads_the_table_of_the_device() -> None:
    geometry = parse_geometry(3, 1, 1, 1, 1)
    # 8x8 maps with gradients: im2col on the CPU (measured), the grouped convolution on CUDA
    assert _choose_per_sample_method(32, 64, True, geometry, "cpu") == "unfold"
    assert _choose_per_sample_method(32, 64, True, geometry, "cuda") == "grouped"
    pointwise = parse_geometry(1, 1, 0, 1, 1)  # a batched product on the input on both
    assert _choose_per_sample_method(32, 1600, True, pointwise, "cuda") == "unfold"


@pytest.mark.parametrize("grad", [False, True])
def test_the_cuda_table_keeps_the_grouped_convolution_wherever_unmeasured(
        monkeypatch, grad: bool) -> None:
    """No im2col, no K-fold outputs, no restricted region loop: the seeds' formulation, at every
    map size and batch (the CPU table is swapped for the CUDA one to run on CPU tensors)."""
    monkeypatch.setitem(dispatch.RULES, "cpu", dispatch.RULES["cuda"])
    for batch in (2, 32, 128):
        for size, channels in ((4, 512), (8, 256), (16, 128), (40, 64)):
            geometry = parse_geometry(3, 1, 1, 1, 1)
            x = torch.empty(batch, channels, size, size, requires_grad=grad)
            bank = torch.empty(4, channels, channels, 3, 3, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                assert _choose_mixture_method(x, bank, geometry, spatial=True) == "aggregate"
                assert _choose_mixture_method(x, bank, geometry) == "aggregate"
                assert _choose_per_sample_method(batch, size * size, grad, geometry) == "grouped"
            weight = torch.empty(batch, 8, channels, channels, 3, 3)
            assert _choose_region_method(weight, geometry, size * size) == "dense"


def test_the_cpu_table_is_the_rule_measured_before() -> None:
    """The CPU table gives the choices of the rule before it moved into a table (the mixture
    rule's rows of docs/performance.md)."""
    geometry = parse_geometry(3, 1, 1, 1, 1)
    x = torch.empty(64, 512, 4, 4, requires_grad=True)
    bank = torch.empty(4, 512, 512, 3, 3, requires_grad=True)
    assert _choose_mixture_method(x, bank, geometry) == "mixout"
    x = torch.empty(64, 64, 32, 32, requires_grad=True)
    assert _choose_mixture_method(x, bank[:, :64, :64], geometry) == "aggregate"
    weight = torch.empty(32, 8, 256, 256, 3, 3)
    assert _choose_region_method(weight, geometry, 64) == "restricted"


# -- autotuning -----------------------------------------------------------------------------------


def test_the_fastest_formulation_is_chosen_once_per_key_and_reused() -> None:
    x = torch.randn(4, 6, 8, 8)
    weight = torch.randn(4, 5, 6, 3, 3, requires_grad=True)
    timer = FakeTimer({"grouped": 0.1, "unfold": 0.5})
    with dynconv.autotune(timer=timer, repeats=2):
        per_sample_conv2d(x, weight, padding=1).sum().backward()
        assert timer.methods() == {"grouped", "loop", "unfold"}  # every exact formulation
        # the rule's pick first ('unfold' at 8x8 with gradients), then twice each, but 'loop'
        # (1 s, over 4x the best median so far, 0.1 s) stops at once
        assert [m for _, m in timer.calls] == ["unfold", "unfold", "grouped", "grouped", "loop"]
        per_sample_conv2d(x, weight, padding=1)  # the same key: reused, not timed again
        assert len(timer.calls) == 5
    [(key, choice)] = tuning._choices.items()
    assert choice == "grouped"
    assert key.text.startswith("per_sample_conv2d 4x6x8x8:float32,4x5x6x3x3:float32,-")
    assert " grad " in key.text
    assert tuning.autotune_summary().startswith("autotune: 1 shape: 1 timed in ")


def test_the_tuned_choice_is_what_runs(monkeypatch) -> None:
    from dynconv.functional import per_sample

    ran = []
    for name, impl in list(per_sample._PER_SAMPLE_IMPLS.items()):
        monkeypatch.setitem(per_sample._PER_SAMPLE_IMPLS, name,
                            lambda *a, _impl=impl, _name=name: ran.append(_name) or _impl(*a))
    x, weight = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 4, 3, 3)
    with dynconv.autotune(timer=FakeTimer({"unfold": 0.5, "loop": 0.1})):
        per_sample_conv2d(x, weight, padding=1)
    ran.clear()
    with dynconv.autotune(timer=FakeTimer()):
        per_sample_conv2d(x, weight, padding=1)
    assert ran == ["loop"]
    ran.clear()
    per_sample_conv2d(x, weight, padding=1)  # autotuning off: the rule
    assert ran == ["grouped"]


def test_every_part_of_the_key_makes_a_new_key() -> None:
    timer = FakeTimer()
    weight = torch.randn(4, 5, 6, 3, 3)
    calls = [
        lambda: per_sample_conv2d(torch.randn(4, 6, 8, 8), weight, padding=1),
        lambda: per_sample_conv2d(torch.randn(4, 6, 8, 8), weight, padding=1),  # the same
        lambda: per_sample_conv2d(torch.randn(4, 6, 8, 8), weight, padding=1, stride=2),
        lambda: per_sample_conv2d(torch.randn(4, 6, 9, 9), weight, padding=1),
        lambda: per_sample_conv2d(torch.randn(4, 6, 8, 8, requires_grad=True), weight,
                                  padding=1),
        lambda: per_sample_conv2d(torch.randn(4, 6, 8, 8, dtype=torch.float64),
                                  weight.double(), padding=1),
        lambda: per_sample_conv2d(
            torch.randn(4, 6, 8, 8).contiguous(memory_format=torch.channels_last), weight,
            padding=1),
    ]
    with dynconv.autotune(timer=timer):
        for call in calls:
            call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            calls[0]()
    texts = [key.text for key in tuning._choices]
    assert len(texts) == 7, texts  # all but the repeated call
    assert any("channels_last" in t for t in texts) and any("autocast=bfloat16" in t
                                                            for t in texts)
    assert any("float64" in t for t in texts) and any("stride=2,2" in t for t in texts)


LAYERS = {
    "dynamic": lambda: DynamicConv2d(6, 8, 3, padding=1, num_kernels=3),
    "odconv": lambda: ODConv2d(6, 8, 3, padding=1, num_kernels=3),
    "drconv": lambda: DRConv2d(6, 8, 3, padding=1, num_regions=4),
    "depthwise": lambda: DynamicConv2d(6, 6, 3, padding=1, groups=6, num_kernels=3),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("favourite", ["mixout", "aggregate/loop", "aggregate/unfold",
                                       "restricted", "dense/loop", "dense/unfold"])
def test_a_tuned_layer_computes_what_an_untuned_one_does(layer: str, favourite: str) -> None:
    """Whichever formulation the timer favours, outputs and gradients (input, parameters) are
    the untuned layer's, in float64, in training (the backward was timed) and evaluation."""
    torch.manual_seed(0)
    module = LAYERS[layer]().double()
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    inputs = [x, *module.parameters()]
    timer = FakeTimer({favourite: 0.1})

    def tuned():
        with dynconv.autotune(timer=timer):
            return module(x)

    assert_same_outputs_and_grads(tuned, lambda: module(x), inputs)
    assert timer.calls, "the layer's formulation was tuned"
    if favourite in timer.methods():  # a formulation of this layer's op: the one it runs
        assert favourite in set(tuning._choices.values())
    module.eval()
    with torch.no_grad():
        expected = module(x)
        with dynconv.autotune(timer=timer):
            torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    assert any(" no_grad " in key.text for key in tuning._choices)


def test_a_forward_and_backward_are_timed_with_gradients() -> None:
    backwards = []
    x = torch.randn(3, 4, 6, 6)
    weight = torch.randn(3, 4, 4, 3, 3, requires_grad=True)

    def timer(key, method, run) -> float:
        run()
        backwards.append(key.text.split()[-3])
        return 1.0

    with dynconv.autotune(timer=timer):
        out = per_sample_conv2d(x, weight, padding=1)
    assert set(backwards) == {"grad"}
    assert weight.grad is None  # the timing's backward never reached the caller's tensors
    assert out.grad_fn is not None  # the caller's graph is intact
    out.sum().backward()
    assert weight.grad is not None


def test_tuning_waits_outside_checkpointing_and_saved_tensor_hooks() -> None:
    """Activation checkpointing recomputes the forward and expects the same formulation: under
    the caller's saved-tensor hooks, or inside a backward, the rule decides."""
    module = DynamicConv2d(6, 8, 3, padding=1, num_kernels=3)
    x = torch.randn(4, 6, 8, 8, requires_grad=True)
    timer = FakeTimer({"mixout": 0.1})
    with dynconv.autotune(timer=timer):
        checkpoint(module, x, use_reentrant=False).sum().backward()
        with torch.autograd.graph.save_on_cpu():
            module(x).sum().backward()
        assert timer.calls == []
        module(x)  # outside: tuned
    assert timer.calls


def test_the_budget_bounds_the_time_spent_and_is_reported() -> None:
    timer = FakeTimer()
    with dynconv.autotune(timer=timer, budget_s=1e-9):
        per_sample_conv2d(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3, 3))
        calls = len(timer.calls)
        per_sample_conv2d(torch.randn(2, 3, 6, 6), torch.randn(2, 4, 3, 3, 3))
        assert len(timer.calls) == calls  # over budget: the rule
    summary = tuning.autotune_summary()
    assert "1 timed in" in summary and "1 left to the rule (the 1e-09 s budget" in summary
    assert len(tuning._choices) == 2 and len(tuning._untuned) == 1  # the second is not cached


def test_a_context_restores_the_settings_and_the_switch_stays_on() -> None:
    assert not tuning.autotune_enabled()
    with dynconv.autotune():
        assert tuning.autotune_enabled()
        with dynconv.autotune(False):
            assert not tuning.autotune_enabled()
        assert tuning.autotune_enabled()
    assert not tuning.autotune_enabled()
    dynconv.autotune()  # the global switch, as torch.backends.cudnn.benchmark = True
    try:
        assert tuning.autotune_enabled()
    finally:
        dynconv.autotune(False)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"enabled": 1}, TypeError, "enabled must be True or False, got 1"),
    ({"repeats": 0}, ValueError, "repeats must be a positive integer, got 0"),
    ({"budget_s": -1}, ValueError, "budget_s must be a positive number of seconds, got -1"),
    ({"timer": 3}, TypeError, "timer must be callable"),
    ({"cache": 3}, TypeError, "cache must be a path or None, got int"),
])
def test_bad_arguments_are_named(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        dynconv.autotune(**kwargs)


# -- the cache file -------------------------------------------------------------------------------


def _tune_two_keys() -> None:
    per_sample_conv2d(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3, 3))
    DynamicConv2d(3, 4, 3, num_kernels=2)(torch.randn(2, 3, 5, 5))


def test_the_cache_carries_the_choices_to_the_next_run(tmp_path: Path) -> None:
    cache = tmp_path / "tuned" / "autotune.json"
    with dynconv.autotune(cache=cache, timer=FakeTimer({"loop": 0.1, "aggregate/loop": 0.1})):
        _tune_two_keys()
    written = json.loads(cache.read_text())
    [(section, entries)] = written["sections"].items()
    assert section == (f"{tuning.device_name(torch.device('cpu'))} | torch {torch.__version__} "
                       f"| dynconv {dynconv.__version__}")
    assert sorted(entries.values()) == ["aggregate/loop", "loop"]
    # another run: the choices come from the file, nothing is timed
    tuning.reset_autotune()

    def no_timing(key, method, run):
        raise AssertionError(f"{method} timed although cached")

    with dynconv.autotune(cache=cache, timer=no_timing):
        _tune_two_keys()
    assert sorted(tuning._choices.values()) == ["aggregate/loop", "loop"]
    assert tuning.autotune_summary() == (
        f"autotune: 2 shapes: 0 timed in 0.0 s, 2 from the cache {cache}")


def test_sections_of_other_machines_and_versions_are_kept_but_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "autotune.json"
    with dynconv.autotune(cache=cache, timer=FakeTimer({"loop": 0.1})):
        per_sample_conv2d(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3, 3))
    content = json.loads(cache.read_text())
    [(section, entries)] = content["sections"].items()
    other = section.replace(f"torch {torch.__version__}", "torch 1.0")
    content["sections"] = {other: {k: "grouped" for k in entries}, "H100 | torch x | dynconv y":
                           {"some key": "aggregate/unfold"}}
    cache.write_text(json.dumps(content))
    tuning.reset_autotune()
    timer = FakeTimer({"unfold": 0.1})
    with dynconv.autotune(cache=cache, timer=timer):
        per_sample_conv2d(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3, 3))
    assert timer.calls  # the other torch's choice was not used
    sections = json.loads(cache.read_text())["sections"]
    assert set(sections) == {other, "H100 | torch x | dynconv y", section}
    assert list(sections[section].values()) == ["unfold"]


@pytest.mark.parametrize("content, expected", [
    (b"\x80\x81 not text", "not a JSON file"),
    (b"{ truncated", "not a JSON file"),
    (b"[1, 2]", "expected a dynconv autotune cache"),
    (b'{"format": "something", "sections": {}}', "expected a dynconv autotune cache"),
    (b'{"format": "dynconv-autotune-1", "sections": {"a": {"k": 3}}}',
     "expected a dynconv autotune cache"),
])
def test_a_bad_cache_file_is_named(tmp_path: Path, content: bytes, expected: str) -> None:
    cache = tmp_path / "autotune.json"
    cache.write_bytes(content)
    with pytest.raises(dynconv.AutotuneError, match=f"autotune cache {cache}: {expected}"):
        dynconv.autotune(cache=cache)
    assert not tuning.autotune_enabled()
    with pytest.raises(ValueError, match="expected a JSON file, got the folder"):
        dynconv.autotune(cache=tmp_path)


# -- several processes ----------------------------------------------------------------------------


def _torchrun(tmp_path: Path, scenario: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(HERE / "autotune_ranks.py"), scenario,
               str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_process_runs_the_choice_of_rank_0(tmp_path: Path) -> None:
    """Each process's timer prefers another formulation; with gradients both run rank 0's,
    only rank 0 times, and only rank 0 writes the cache."""
    rank0, rank1 = _torchrun(tmp_path, "agree")
    assert rank0["choices"] == rank1["choices"] and len(rank0["choices"]) == 2
    assert set(rank0["choices"].values()) == {"aggregate/loop", "loop"}  # rank 0's favourites
    assert rank0["timed"] and not rank1["timed"]
    assert "2 decided by rank 0" in rank1["summary"]
    assert rank0["outputs_equal_untuned"] and rank1["outputs_equal_untuned"]
    # evaluation (no gradients, shards of different sizes): each process decides for itself
    assert rank0["evaluation"] == ["aggregate/loop"] and rank1["evaluation"] == ["aggregate/unfold"]
    # rank 0's choices, its evaluation's included
    assert sorted(json.loads((tmp_path / "cache.json").read_text())["sections"].popitem()[1]
                  .values()) == ["aggregate/loop", "aggregate/loop", "loop"]


def test_processes_that_meet_different_shapes_are_told(tmp_path: Path) -> None:
    for rank in _torchrun(tmp_path, "disagree"):  # both are told, neither waits forever
        assert "the processes of a distributed run must call the dynamic layers with the same " \
               "shapes" in rank["error"]
