"""``compare`` on a reduced setting: a table with every type and finite numbers, files, plots,
resume; the command line around it."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynconv.cli import main
from dynconv.layers.factory import conv_types
from dynconv.training import DEFAULT_CONV_TYPES, TrainConfig, compare, format_table

TYPES = [t for t in DEFAULT_CONV_TYPES if t in conv_types()]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    base = TrainConfig(data="digits", model_args={"width": 4}, epochs=2, batch_size=64,
                       temperature_epochs=1, threads=1)
    return compare(base, out, seeds=SEEDS, progress=False, log=lambda message: None)


def test_table_has_every_type_and_finite_numbers(comparison) -> None:
    assert [s.conv_type for s in comparison.summaries] == TYPES
    assert {"static", "dynamic", "condconv"} <= set(TYPES)
    with (comparison.out / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["conv_type"] for r in rows] == TYPES
    for row in rows:
        numbers = {k: v for k, v in row.items() if k not in ("conv_type", "delta_vs_static")}
        assert all(math.isfinite(float(v)) and float(v) >= 0 for v in numbers.values()), row
        assert int(row["seeds"]) == len(SEEDS)
        assert float(row["test_acc_min"]) <= float(row["test_acc_mean"]) <= float(
            row["test_acc_max"])
    by_type = {s.conv_type: s for s in comparison.summaries}
    static = by_type["static"]
    assert static.delta_vs_static is None
    for s in comparison.summaries[1:]:
        # a dynamic layer holds more than one kernel and computes its attention on top
        assert s.parameters > static.parameters and s.macs > static.macs
        paired = statistics.fmean(a - b for a, b in zip(s.accuracies, static.accuracies))
        assert s.delta_vs_static == pytest.approx(paired)
    markdown = (comparison.out / "table.md").read_text()
    assert all(f"| {t} |" in markdown for t in TYPES)
    assert "± " in markdown and "seeds**: 0, 1" in markdown
    assert format_table(comparison.summaries).count("\n") == len(TYPES) + 1


def test_metrics_and_plots_are_written(comparison) -> None:
    with (comparison.out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(TYPES) * len(SEEDS) * 2
    assert {(r["conv_type"], int(r["seed"])) for r in rows} == {
        (t, s) for t in TYPES for s in SEEDS}
    assert all(math.isfinite(float(r["test_loss"])) for r in rows)
    for name in ("curves.png", "accuracy_vs_macs.png"):
        with Image.open(comparison.out / name) as image:
            assert image.format == "PNG" and image.width > 800 and image.height > 300
    assert set(comparison.files) >= {"table.csv", "table.md", "metrics.csv", "curves.png",
                                     "accuracy_vs_macs.png"}


def test_resume_keeps_finished_runs_and_refuses_to_overwrite(comparison) -> None:
    base = TrainConfig(data="digits", model_args={"width": 4}, epochs=2, batch_size=64,
                       temperature_epochs=1, threads=1)
    with pytest.raises(ValueError, match="already holds a comparison; resume it"):
        compare(base, comparison.out, seeds=SEEDS, progress=False, log=lambda m: None)
    # the same settings, resumed: nothing is trained again
    checkpoint = comparison.out / "runs" / "static-seed0" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    again = compare(base, comparison.out, conv_types_=["static"], seeds=SEEDS, resume=True,
                    progress=False, log=lambda m: None)
    assert checkpoint.stat().st_mtime_ns == before
    assert again.summaries[0].accuracies == comparison.summaries[0].accuracies
    with pytest.raises(ValueError, match="different run"):
        compare(TrainConfig(data="digits", model_args={"width": 4}, epochs=3, batch_size=64,
                            threads=1),
                comparison.out, conv_types_=["static"], seeds=SEEDS, resume=True,
                progress=False, log=lambda m: None)


def test_compare_errors(tmp_path: Path) -> None:
    base = TrainConfig(data="digits", epochs=1)
    with pytest.raises(ValueError, match="unknown conv type 'deform'"):
        compare(base, tmp_path, conv_types_=["static", "deform"])
    with pytest.raises(ValueError, match="listed twice"):
        compare(base, tmp_path, conv_types_=["static", "static"])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        compare(base, tmp_path, seeds=[1, 1])


def test_command_line_compare(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    status = main(["compare", "--data", "digits", "--conv-types", "static", "--seeds", "3",
                   "--epochs", "1",
                   "--model-arg", "width=4", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert "static" in printed and "test acc % (mean ± std)" in printed
    assert f"to {out}/" in printed
    assert torch.load(out / "runs" / "static-seed3" / "model.pt", weights_only=True)


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
