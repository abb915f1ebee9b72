"""``compare`` on a reduced setting: a table with every row (the widened static network
included) and finite numbers, paired intervals from the kept predictions, files, plots that fit
their axes, resume, bit-identical repeats, the progress bar; the command line around it."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynconv.cli import main
from dynconv.layers.factory import conv_types
from dynconv.tools.cost import count_parameters
from dynconv.training import (
    DEFAULT_CONV_TYPES,
    WIDE_STATIC,
    TrainConfig,
    compare,
    format_table,
    load_digits,
)
from dynconv.training.compare import _build_rows, _Progress, wide_width
from dynconv.training.intervals import PairedInterval, paired_interval
from dynconv.training.loop import build_model
from dynconv.training.plots import outliers, plot_accuracy_vs_cost, plot_curves
from dynconv.training.predictions import PREDICTIONS_NAME, read_predictions
from dynconv.training.summary import RowSummary

TYPES = [t for t in DEFAULT_CONV_TYPES if t in conv_types()]
ROWS = [TYPES[0], WIDE_STATIC, *TYPES[1:]]
SEEDS = (0, 1)
DIGITS = load_digits()


def _base(**kwargs) -> TrainConfig:
    settings = {"data": "digits", "model_args": {"width": 4}, "epochs": 2, "batch_size": 64,
                "temperature_epochs": 1, "threads": 1, **kwargs}
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return compare(_base(), out, seeds=SEEDS, progress=False, log=lambda message: None)


def _parameters(conv_type: str, width: int) -> int:
    config = _base(conv_type=conv_type, model_args={"width": width})
    return count_parameters(build_model(config, DIGITS))


def test_table_has_every_row_and_finite_numbers(comparison) -> None:
    assert [s.name for s in comparison.summaries] == ROWS
    assert {"static", "dynamic", "condconv"} <= set(TYPES)
    with (comparison.out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ROWS
    text_columns = ("row", "conv_type", "model_args", "vs_static", "vs_static_wide")
    for row in rows:
        numbers = {k: v for k, v in row.items() if k not in text_columns and v != ""}
        assert all(math.isfinite(float(v)) for v in numbers.values()), row
        assert int(row["seeds"]) == len(SEEDS)
        assert float(row["test_acc_min"]) <= float(row["test_acc_mean"]) <= float(
            row["test_acc_max"])
    by_name = {s.name: s for s in comparison.summaries}
    static = by_name["static"]
    for s in comparison.summaries[1:]:
        # a dynamic layer holds more than one kernel and computes its attention on top
        assert s.parameters > static.parameters and s.macs > static.macs
    markdown = (comparison.out / "table.md").read_text()
    assert all(f"| {s.label} |" in markdown for s in comparison.summaries)
    assert "± " in markdown and "seeds**: 0, 1" in markdown
    assert "Δ vs static [95% CI]" in markdown and "Δ vs static-wide [95% CI]" in markdown
    assert "**temperature**: linear, from 30 over 1 epoch;" in markdown
    assert "**interval**: paired 95%: over the 2 seeds (Student's t, 1 degrees" in markdown


def test_the_wide_static_row_matches_the_parameters_of_dynconv(comparison) -> None:
    wide = next(s for s in comparison.summaries if s.name == WIDE_STATIC)
    width = wide.model_args["width"]
    assert wide.conv_type == "static" and wide.label == f"{WIDE_STATIC} (width {width})"
    target = _parameters("dynamic", 4)
    assert wide.parameters == _parameters("static", width)
    # no other width comes closer
    assert all(abs(_parameters("static", w) - target) >= abs(wide.parameters - target)
               for w in range(1, 3 * width))
    assert comparison.settings[WIDE_STATIC] == (
        f"small_cnn width {width}: {wide.parameters:,} parameters, the closest to dynamic's "
        f"{target:,} (width 4)")
    # a model without a width argument: none, and an explicit request is an error
    assert wide_width(_base(model="resnet18", model_args={}), DIGITS) is None
    base = _base(model="resnet18", model_args={})
    rows, note = _build_rows(["static", WIDE_STATIC], base, DIGITS, False)
    assert [r.name for r in rows] == ["static"]
    assert note == "skipped: resnet18 has no width argument to widen"
    with pytest.raises(ValueError, match="'static-wide' widens the model's width argument, and "
                                         "resnet18 has none"):
        compare(base, Path("unused"), conv_types_=["static", WIDE_STATIC], progress=False)


def test_intervals_pair_the_kept_predictions(comparison) -> None:
    def correct(name: str) -> torch.Tensor:
        return torch.stack([
            read_predictions(comparison.out / "runs" / f"{name}-seed{s}" / PREDICTIONS_NAME)
            .correct for s in SEEDS])

    by_name = {s.name: s for s in comparison.summaries}
    static, wide = by_name["static"], by_name[WIDE_STATIC]
    assert static.delta_vs_static is None and static.delta_vs_wide is None
    assert wide.delta_vs_wide is None
    for s in comparison.summaries[1:]:
        assert s.delta_vs_static == paired_interval(correct(s.name), correct("static"))
        paired = statistics.fmean(a - b for a, b in zip(s.accuracies, static.accuracies))
        assert s.delta_vs_static.mean == pytest.approx(paired)  # the seeds' mean difference
        assert s.delta_vs_static.low <= s.delta_vs_static.mean <= s.delta_vs_static.high
        if s is not wide:
            assert s.delta_vs_wide == paired_interval(correct(s.name), correct(WIDE_STATIC))
    with (comparison.out / "table.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["row"] == "dynamic")
    delta = by_name["dynamic"].delta_vs_static
    assert float(row["delta_vs_static_low"]) == round(100 * delta.low, 3)
    assert row["vs_static"] == delta.conclusion


def test_metrics_and_plots_are_written(comparison, tmp_path: Path) -> None:
    with (comparison.out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ROWS) * len(SEEDS) * 2
    assert {(r["row"], int(r["seed"])) for r in rows} == {(t, s) for t in ROWS for s in SEEDS}
    assert all(math.isfinite(float(r["test_loss"])) for r in rows)
    for name in ("curves.png", "accuracy_vs_macs.png"):
        with Image.open(comparison.out / name) as image:
            assert image.format == "PNG" and image.width > 800 and image.height > 300
    assert set(comparison.files) >= {"table.csv", "table.md", "metrics.csv", "curves.png",
                                     "accuracy_vs_macs.png"}
    figure = plot_accuracy_vs_cost(comparison.summaries, tmp_path / "a.png")
    accuracy, deltas = figure.axes
    assert accuracy.get_xscale() == "log"
    texts = {t.get_text() for t in accuracy.texts}
    assert all(s.label in texts for s in comparison.summaries)  # every row labelled
    assert [t.get_text() for t in deltas.get_yticklabels()] == [
        s.label for s in reversed(comparison.summaries[1:])]


def _summary(name: str, macs: float, accuracies: list[float], delta: float | None,
             half: float = 0.5) -> RowSummary:
    interval = None if delta is None else PairedInterval(
        delta / 100, (delta - half) / 100, (delta + half) / 100, 3, 10_000, half / 200, half / 200)
    return RowSummary(name, "static" if name.startswith("static") else name, name, 10_000, macs,
                      0.1, {1: 0.1, 64: 1.0}, accuracies, {}, interval)


def test_outliers_are_kept_off_the_axes(tmp_path: Path) -> None:
    assert outliers([97.4, 98.4, 98.4, 92.9, 45.3], floor=5.0) == {4}
    assert outliers([97.4, 98.4, 92.9], floor=5.0) == set()
    assert outliers([10.0, 90.0], floor=5.0) == set()  # two values: none is the odd one
    summaries = [_summary("static", 189e3, [0.967, 0.975, 0.983], None),
                 _summary("dynamic", 263e3, [0.981, 0.989, 0.983], 1.0),
                 _summary("condconv", 263e3, [0.978, 0.992, 0.983], 1.0),
                 _summary("odconv", 269e3, [0.892, 0.956, 0.930], -4.5, 1.8),
                 _summary("drconv", 1.53e6, [0.414, 0.506, 0.440], -52.1, 4.0)]
    figure = plot_accuracy_vs_cost(summaries, tmp_path / "a.png")
    accuracy, deltas = figure.axes
    bottom, top = accuracy.get_ylim()
    assert 85 < bottom < 89.2 and top <= 100.5  # odconv's lowest seed (89.2) in, drconv out
    assert "drconv: 45.3%\n(below the axis)" in {t.get_text() for t in accuracy.texts}
    left, right = deltas.get_xlim()
    assert -8 < left < -6.3 and 1.5 < right < 3
    assert "-52.1 (off the axis)" in {t.get_text() for t in deltas.texts}
    # the curves: zoomed on the rows that are not outliers, and the subtitle says so
    metrics = [{"row": s.name, "seed": seed, "epoch": e, "test_acc": a * e / 3,
                "train_loss": 1 / e, "test_loss": 1 / e}
               for s in summaries for seed, a in enumerate(s.accuracies) for e in (1, 2, 3)]
    figure = plot_curves(metrics, tmp_path / "c.png")
    low, _ = figure.axes[0].get_ylim()
    assert low > 60
    assert figure.get_suptitle().endswith(f"accuracy axis from {low:.0f}%")
    labels = [t.get_text() for t in figure.axes[-1].get_legend().get_texts()]
    assert labels[-1] == "drconv\n(final 45.3%,\nbelow the axis)" and labels[0] == "static"
    figure = plot_curves([m for m in metrics if m["row"] == "drconv"], tmp_path / "d.png")
    assert figure.axes[0].get_ylim()[0] == 0 and "axis from" not in figure.get_suptitle()


def test_resume_keeps_finished_runs_and_refuses_to_overwrite(comparison) -> None:
    with pytest.raises(ValueError, match="already holds a comparison; resume it"):
        compare(_base(), comparison.out, seeds=SEEDS, progress=False, log=lambda m: None)
    # the same settings, resumed: nothing is trained again
    checkpoint = comparison.out / "runs" / "static-seed0" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    again = compare(_base(), comparison.out, conv_types_=["static"], seeds=SEEDS, resume=True,
                    progress=False, log=lambda m: None)
    assert checkpoint.stat().st_mtime_ns == before
    assert again.summaries[0].accuracies == comparison.summaries[0].accuracies
    with pytest.raises(ValueError, match="different run"):
        compare(_base(epochs=3), comparison.out, conv_types_=["static"], seeds=SEEDS,
                resume=True, progress=False, log=lambda m: None)


def _without_timings(path: Path) -> list[dict[str, str]]:
    timed = ("train_s_per_epoch", "latency_ms", "train_time_s", "eval_time_s", "images_per_s")
    with path.open() as f:
        return [{k: v for k, v in row.items() if not k.startswith(timed)}
                for row in csv.DictReader(f)]


def test_identical_comparisons_give_identical_tables(tmp_path: Path, capsys) -> None:
    results = []
    for name, progress in (("a", True), ("b", False)):  # the progress bar times a step first
        results.append(compare(_base(epochs=1), tmp_path / name,
                               conv_types_=["static", WIDE_STATIC, "dynamic"], seeds=SEEDS,
                               progress=progress, log=lambda m: None))
    assert "left" in capsys.readouterr().err  # the bar ran, with its remaining time
    a, b = (tmp_path / "a", tmp_path / "b")
    for name in ("table.csv", "metrics.csv"):
        assert _without_timings(a / name) == _without_timings(b / name)
    for run in (a / "runs").iterdir():
        assert (run / PREDICTIONS_NAME).read_bytes() == (
            b / "runs" / run.name / PREDICTIONS_NAME).read_bytes()
    assert [s.delta_vs_static for s in results[0].summaries] == [
        s.delta_vs_static for s in results[1].summaries]


def test_progress_weighs_each_rows_epochs_by_their_time() -> None:
    stream = io.StringIO()
    bar = _Progress(["static", "drconv"], 2, 3, True,
                                   {"static": 1.0, "drconv": 9.0}, file=stream)
    assert bar.fraction == 0
    for seed in (0, 1):
        bar.start("static", seed, seed + 1)
        for _ in range(3):
            bar.epoch({"train_time_s": 0.8, "eval_time_s": 0.2})
        bar.finished(3)
    assert bar.fraction == pytest.approx(6 / (6 + 6 * 9))  # not 1/2: drconv costs 9 times more
    bar.start("drconv", 0, 3)
    bar.epoch({"train_time_s": 11.0, "eval_time_s": 1.0})  # measured: 12 s, not 9
    assert bar.fraction == pytest.approx((6 + 12) / (6 + 6 * 12))
    bar.finished(3)  # two epochs found done (resumed): done, but not in the rate
    assert bar.bar.initial == pytest.approx(2 * 12)
    bar.close()
    shown = stream.getvalue()
    assert "drconv seed 0 (run 3/4)" in shown and " elapsed, " in shown and " left" in shown


def test_compare_errors(tmp_path: Path) -> None:
    base = _base(epochs=1)
    with pytest.raises(ValueError, match=r"unknown conv type 'deform'.*or 'static-wide'"):
        compare(base, tmp_path, conv_types_=["static", "deform"])
    with pytest.raises(ValueError, match="listed twice"):
        compare(base, tmp_path, conv_types_=["static", "static"])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        compare(base, tmp_path, seeds=[1, 1])


def test_command_line_compare(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    status = main(["compare", "--data", "digits", "--conv-types", "static", "dynamic",
                   "--seeds", "3", "--epochs", "1", "--model-arg", "width=4", "--threads", "1",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "test acc % (mean ± std)" in printed and "Δ vs static [95% CI]" in printed
    assert ("One seed: the intervals cover the sample of test images only, not the training "
            "randomness (more --seeds add it).") in printed
    assert "interval: 95%, paired bootstrap over the 360 test images (2,000 resamples, seed " \
           "0) only: one seed, so the training randomness is not covered" in printed
    assert f"to {out}/" in printed
    assert torch.load(out / "runs" / "static-seed3" / "model.pt", weights_only=True)
    # static networks only: no temperature anywhere
    out = tmp_path / "static"
    assert main(["compare", "--data", "digits", "--conv-types", "static", WIDE_STATIC,
                 "--seeds", "0", "--epochs", "1", "--model-arg", "width=4", "--threads", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "static-wide (width" in printed and "temperature" not in printed
    assert "temperature" not in (out / "table.md").read_text()
    with pytest.raises(SystemExit):
        main(["compare", "--conv-types", "static", "static-wider"])
    assert ("argument --conv-types: unknown conv type 'static-wider'" in capsys.readouterr().err)


def test_command_line_compare_autotunes_and_keeps_the_choices(tmp_path: Path, capsys) -> None:
    from dynconv.functional import tuning

    cache = tmp_path / "autotune.json"
    argv = ["compare", "--data", "digits", "--conv-types", "static", "dynamic", "--seeds", "3",
            "--epochs", "1", "--model-arg", "width=4", "--threads", "1", "--autotune",
            "--autotune-cache", str(cache)]
    tuning.reset_autotune()
    try:
        assert main([*argv, "--out", str(tmp_path / "a")]) == 0
        printed = capsys.readouterr().out
        timed = re.search(r"autotune: (\d+) shapes: (\d+) timed in [\d.]+ s", printed)
        assert timed and int(timed[1]) == int(timed[2]) > 0, printed
        assert "- **autotune**: " in (tmp_path / "a" / "table.md").read_text()
        entries = json.loads(cache.read_text())["sections"].popitem()[1]
        assert len(entries) == int(timed[1])
        assert all(key.startswith("mixture_conv2d ") for key in entries)  # DY-Conv's layers
        tuning.reset_autotune()  # as a new process: the choices come from the file
        assert main([*argv, "--out", str(tmp_path / "b")]) == 0
        printed = capsys.readouterr().out
        assert f"autotune: {timed[1]} shapes: 0 timed in 0.0 s, {timed[1]} from the cache " \
               f"{cache}" in printed
    finally:
        tuning.reset_autotune()


@pytest.mark.parametrize("command", [[], ["compare"], ["train"]])
def test_help_reads_well(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dynconv")
    if command:
        for option in ("--data", "--model", "--epochs", "--temperature", "--resume", "--out"):
            assert option in text
    else:
        assert "compare" in text and "train" in text and "list" in text


def test_command_line_errors_are_one_clear_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynconv train: error: dataset folder") and "Traceback" not in err
    for option, value, message in (("--conv-type", "deform", "unknown conv type 'deform'"),
                                   ("--model", "resnet19", "unknown model 'resnet19'")):
        with pytest.raises(SystemExit) as exit_:  # argparse checks the value
            main(["train", option, value, "--out", str(tmp_path)])
        assert exit_.value.code == 2
        assert f"dynconv train: error: argument {option}: {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model-arg", "width"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "small_cnn" in capsys.readouterr().out


@pytest.mark.parametrize(("env", "expected"), [(None, True), ("1", True), ("0", False)])
def test_train_keeps_freed_memory_unless_told_not_to(tmp_path: Path, monkeypatch, env,
                                                     expected) -> None:
    from dynconv import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    if env is None:
        monkeypatch.delenv(cli.KEEP_MEMORY_ENV, raising=False)
    else:
        monkeypatch.setenv(cli.KEEP_MEMORY_ENV, env)
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert main(["list"]) == 0  # not a training command: never
    assert calls == ([True] if expected else [])


def test_format_table_lines(comparison) -> None:
    text = format_table(comparison.summaries)
    main_table, title, wide_table = text.split("\n\n")
    assert main_table.count("\n") == len(ROWS) + 1
    assert title.startswith("Against static-wide (width")
    assert wide_table.count("\n") == len(ROWS) - 2 + 1


class _Stop(Exception):
    pass


def _settings_of(monkeypatch, *argv: str) -> tuple[TrainConfig, tuple[int, ...]]:
    """The base config and seeds ``dynconv compare ARGV`` hands to compare(), not run."""
    import dynconv.training

    seen = {}

    def fake(base, out, rows, seeds, **kwargs):
        seen.update(base=base, seeds=tuple(seeds))
        raise _Stop

    monkeypatch.setattr(dynconv.training, "compare", fake)
    with pytest.raises(_Stop):
        main(["compare", *argv])
    return seen["base"], seen["seeds"]


def test_default_and_quick_sizes(monkeypatch) -> None:
    base, seeds = _settings_of(monkeypatch)
    assert (base.data, base.train_images, base.epochs, seeds) == ("mnist", 5000, 6, tuple(range(6)))
    assert (base.temperature_epochs, base.eval_every) == (1, 3)
    quick, seeds = _settings_of(monkeypatch, "--quick")  # seed 0 of the default comparison
    assert quick == base and seeds == (0,)
    base, seeds = _settings_of(monkeypatch, "--quick", "--epochs", "4", "--seeds", "5",
                               "--train-images", "300")
    assert (base.train_images, base.epochs, seeds) == (300, 4, (5,))
    base, _ = _settings_of(monkeypatch, "--data", "digits")  # other data: every training image
    assert (base.data, base.train_images, base.epochs) == ("digits", None, 6)


def test_curves_of_a_comparison_evaluated_every_few_epochs(tmp_path: Path) -> None:
    nan = float("nan")
    metrics = [{"row": row, "seed": seed, "epoch": epoch, "train_loss": 1.0 / epoch,
                "test_acc": 0.9 + 0.01 * epoch if epoch % 2 == 0 else nan,
                "test_loss": 0.5 / epoch if epoch % 2 == 0 else nan}
               for row in ("static", "dynamic") for seed in (0, 1) for epoch in (1, 2, 3, 4)]
    figure = plot_curves(metrics, tmp_path / "curves.png")
    assert "after epochs 2, 4" in figure._suptitle.get_text()
    accuracy = figure.axes[0].get_lines()[0]
    assert list(accuracy.get_xdata()) == [2, 4] and accuracy.get_marker() == "o"
    assert list(figure.axes[1].get_lines()[0].get_xdata()) == [1, 2, 3, 4]  # training: every


def test_compare_takes_kw_as_one_more_row(tmp_path: Path, capsys) -> None:
    """'kw' (not a default row): its run anneals the weight of the assigned cells from
    1 to 0 and evaluates at 0 while DY-Conv's temperature ends at 1, the settings say both, and
    its parameters count each shared warehouse once."""
    out = tmp_path / "out"
    assert "kw" not in DEFAULT_CONV_TYPES
    assert main(["compare", "--data", "digits", "--conv-types", "dynamic", "kw", "--seeds", "0",
                 "--epochs", "1", "--train-images", "40", "--batch-size", "20",
                 "--model-arg", "width=4", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    setting = ("temperature: linear, from 30 over 1 epoch; evaluation at 1; kw: linear (1 to 0 "
               "over 1 epoch, per iteration; evaluation at 0)")
    assert setting in printed and setting in (out / "table.md").read_text().replace("**", "")
    with (out / "metrics.csv").open() as f:
        assert {r["row"]: float(r["temperature"]) for r in csv.DictReader(f)} == {
            "dynamic": 1.0, "kw": 0.0}
    with (out / "table.csv").open() as f:
        parameters = {r["row"]: int(r["parameters"]) for r in csv.DictReader(f)}
    model = build_model(_base(conv_type="kw", model_args={"width": 4}), DIGITS)
    shared = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert parameters["kw"] == count_parameters(model) < shared
