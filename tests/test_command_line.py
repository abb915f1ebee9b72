"""Every bad invocation of ``dynconv``, over every option of every command (``dynconv COMMAND
--help``), ends as argparse ends a usage error: exit status 2, one line on stderr (after
argparse's usage) that names the option as typed and says what it accepts, no traceback.

Values are checked by the options' ``type=`` callables (``dynconv.cli.options``), so argparse
itself reports them; what only the run can tell (a batch larger than the data, a keyword the
model does not take) names the option the same way."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynconv.cli import COMMANDS, _build_parser, main, options

# (command line, what the error line must contain: the option as typed, and what it accepts).
# {file}: an existing file, {dir}: an existing folder, {missing}: a path that does not exist.
BAD: list[tuple[str, list[str]]] = [
    # the command itself
    ("", ["a command is required: one of compare, train, profile"]),
    ("--foo", ["unrecognized arguments: --foo"]),
    ("fit", ["argument COMMAND: invalid choice: 'fit'"]),
    # compare
    ("compare --conv-types nope", ["argument --conv-types: unknown conv type 'nope'; expected"]),
    ("compare --conv-types static static", ["argument --conv-types: a conv type is listed twice"]),
    ("compare --conv-types", ["argument --conv-types: expected at least one argument"]),
    ("compare --seeds -1", ["argument --seeds: seed must be >= 0, got -1"]),
    ("compare --seeds x", ["argument --seeds: expected an integer from 0 to 2**64 - 1, got "
                           "'x'"]),
    ("compare --seeds 1 1", ["argument --seeds: seeds must be distinct"]),
    ("compare --data {missing}", ["dataset folder", "does not exist; --data takes"]),
    ("compare --data {file}", ["--data must name a folder, 'mnist' or 'digits', got the file"]),
    ("compare --image-size 0", ["argument --image-size: expected an integer >= 1, got '0'"]),
    ("compare --image-size 8", ["argument --image-size: image_size applies to ImageFolder data"]),
    ("compare --train-images 0", ["argument --train-images: expected an integer >= 1, got '0'"]),
    ("compare --train-images 9", ["argument --train-images: train_images must be from 10 (one "
                                  "image of each class) to 1,437 (the training images of digits)"
                                  ", got 9"]),
    ("compare --eval-on train", ["argument --eval-on: invalid choice: 'train' (choose from"]),
    ("compare --model resnet19", ["argument --model: unknown model 'resnet19'; expected one of"]),
    ("compare --model-arg width", ["argument --model-arg: expected KEY=VALUE"]),
    ("compare --model-arg width=0", ["argument --model-arg: width must be an int >= 1"]),
    ("compare --epochs 0", ["argument --epochs: expected an integer >= 1, got '0'"]),
    ("compare --epochs 1.5", ["argument --epochs: expected an integer >= 1, got '1.5'"]),
    ("compare --batch-size 0", ["argument --batch-size: expected an integer >= 1, got '0'"]),
    ("compare --batch-size 100000", ["argument --batch-size: batch size 100000 is larger than "
                                     "the training set"]),
    ("compare --lr 0", ["argument --lr: expected a finite number > 0, got '0'"]),
    ("compare --lr nan", ["argument --lr: expected a finite number > 0, got 'nan'"]),
    ("compare --momentum -0.5", ["argument --momentum: expected a finite number >= 0"]),
    ("compare --weight-decay inf", ["argument --weight-decay: expected a finite number >= 0"]),
    ("compare --lr-schedule poly", ["argument --lr-schedule: invalid choice: 'poly' (choose from"]),
    ("compare --lr-milestones -5", ["argument --lr-milestones: expected an integer >= 1, got "
                                    "'-5'"]),
    ("compare --lr-schedule multistep", ["argument --lr-milestones: the multistep schedule needs "
                                         "milestones"]),
    ("compare --lr-gamma -1", ["argument --lr-gamma: expected a finite number >= 0, got '-1'"]),
    ("compare --crop-padding -1", ["argument --crop-padding: expected an integer >= 0"]),
    ("compare --flip=yes", ["argument --flip/--no-flip: ignored explicit argument 'yes'"]),
    ("compare --quick=yes", ["argument --quick: ignored explicit argument 'yes'"]),
    ("compare --eval-every 0", ["argument --eval-every:", "'0'"]),
    ("compare --temperature cosine", ["argument --temperature: invalid choice: 'cosine'"]),
    ("compare --temperature-init 0", ["argument --temperature-init: the initial temperature must "
                                      "be a finite number >= 1"]),
    ("compare --temperature-init x", ["argument --temperature-init: expected a number >= 1, got "
                                      "'x'"]),
    ("compare --temperature-epochs 0", ["argument --temperature-epochs: expected an integer >= 1"]),
    ("compare --out {file}", ["argument --out: expected a folder, got the file"]),
    ("compare --out {file}/sub", ["argument --out: ", "cannot be created: ", "is a file"]),
    ("compare --resume", ["--resume needs --out DIR"]),
    ("compare --device tpu", ["argument --device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or "
                              "'mps', got 'tpu'"]),
    ("compare --device cuda:99", ["argument --device: 'cuda:99': "]),
    ("compare --amp=1", ["argument --amp/--no-amp: ignored explicit argument '1'"]),
    ("compare --threads 0", ["argument --threads: expected an integer >= 1, got '0'"]),
    ("compare --autotune=yes", ["argument --autotune: ignored explicit argument 'yes'"]),
    ("compare --autotune-cache {file}", ["argument --autotune-cache: autotune cache {file}: not "
                                         "a JSON file"]),
    ("compare --quiet=1", ["argument --quiet: ignored explicit argument '1'"]),
    # train: its own options, and the shared ones once more
    ("train --conv-type deform", ["argument --conv-type: unknown conv type 'deform'; expected"]),
    ("train --model od_resnet18 --conv-type static", ["argument --conv-type: model 'od_resnet18' "
                                                      "is built with conv type 'odconv' only"]),
    ("train --seed -1", ["argument --seed: seed must be >= 0, got -1"]),
    ("train --seed 1e3", ["argument --seed: expected an integer from 0 to 2**64 - 1"]),
    ("train --train-images 2000", ["argument --train-images: train_images must be from 10 ",
                                   "to 1,437 (the training images of digits), got 2,000"]),
    ("train --eval-on val --train-images 1200", [
        "argument --train-images: ", "to 1,150 (the training images of digits left beside the "
        "validation split), got 1,200"]),
    ("train --eval-on", ["argument --eval-on: expected one argument"]),
    ("train --seed 18446744073709551616", ["argument --seed: seed must be <= 2**64 - 1 "
                                           "(torch's largest), got 18446744073709551616"]),
    ("train --data {missing}", ["dataset folder", "does not exist; --data takes"]),
    ("train --image-size -3", ["argument --image-size: expected an integer >= 1, got '-3'"]),
    ("train --model", ["argument --model: expected one argument"]),
    ("train --model-arg nope=3", ["argument --model-arg: ", "unexpected keyword argument 'nope'"]),
    ("train --model-arg 3=x", ["argument --model-arg: expected KEY=VALUE"]),
    ("train --epochs -2", ["argument --epochs: expected an integer >= 1, got '-2'"]),
    ("train --batch-size 1", ["argument --batch-size: a batch of 1 image per process cannot "
                              "train small_cnn"]),
    ("train --batch-size x", ["argument --batch-size: expected an integer >= 1, got 'x'"]),
    ("train --lr -1", ["argument --lr: expected a finite number > 0, got '-1'"]),
    ("train --lr inf", ["argument --lr: expected a finite number > 0, got 'inf'"]),
    ("train --momentum nan", ["argument --momentum: expected a finite number >= 0, got 'nan'"]),
    ("train --weight-decay -1", ["argument --weight-decay: expected a finite number >= 0"]),
    ("train --lr-schedule", ["argument --lr-schedule: expected one argument"]),
    ("train --lr-milestones 0", ["argument --lr-milestones: expected an integer >= 1, got '0'"]),
    ("train --lr-milestones 30 x", ["argument --lr-milestones: expected an integer >= 1"]),
    ("train --lr-gamma nan", ["argument --lr-gamma: expected a finite number >= 0, got 'nan'"]),
    ("train --crop-padding 2.5", ["argument --crop-padding: expected an integer >= 0"]),
    ("train --no-flip=1", ["argument --flip/--no-flip: ignored explicit argument '1'"]),
    ("train --eval-every x", ["argument --eval-every:", "'x'"]),
    ("train --temperature", ["argument --temperature: expected one argument"]),
    ("train --temperature-init 0.5", ["argument --temperature-init: the initial temperature must "
                                      "be a finite number >= 1"]),
    ("train --temperature-init nan", ["argument --temperature-init: the initial temperature"]),
    ("train --temperature-epochs 0", ["argument --temperature-epochs: expected an integer >= 1"]),
    ("train --out {file}", ["argument --out: expected a folder, got the file"]),
    ("train --out {file}/sub/run", ["argument --out: ", "cannot be created: ", "is a file"]),
    ("train --resume", ["--resume needs --out DIR"]),
    ("train --out {run_dir}", ["already holds a run", "--resume"]),
    ("train --device tpu", ["argument --device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or "
                            "'mps', got 'tpu'"]),
    ("train --device gpu:0", ["argument --device: expected 'auto', 'cpu', 'cuda'"]),
    ("train --device cuda:99", ["argument --device: 'cuda:99': "]),
    ("train --threads -1", ["argument --threads: expected an integer >= 1, got '-1'"]),
    ("train --threads two", ["argument --threads: expected an integer >= 1, got 'two'"]),
    ("train --quiet=yes", ["argument --quiet: ignored explicit argument 'yes'"]),
    ("train --amp=no", ["argument --amp/--no-amp: ignored explicit argument 'no'"]),
    ("train --autotune=1", ["argument --autotune: ignored explicit argument '1'"]),
    ("train --autotune-cache {dir}", ["argument --autotune-cache: autotune cache {dir}: "
                                      "expected a JSON file, got the folder"]),
    # profile
    ("profile", ["the following arguments are required: MODEL"]),
    ("profile resnet19", ["argument MODEL: unknown model 'resnet19'; expected one of"]),
    ("profile small_cnn --conv-type nope", ["argument --conv-type: unknown conv type 'nope'"]),
    ("profile od_resnet18 --conv-type dynamic", ["argument --conv-type: model 'od_resnet18' is "
                                                 "built with conv type 'odconv' only"]),
    ("profile small_cnn --model-arg width=0", ["argument --model-arg: width must be an int >= 1"]),
    ("profile small_cnn --model-arg nope=1", ["argument --model-arg: ", "'nope'"]),
    ("profile small_cnn --input-size 0 32 32", ["argument --input-size: expected an integer >= 1, "
                                                "got '0'"]),
    ("profile small_cnn --input-size 3 32", ["argument --input-size: expected 3 arguments"]),
    ("profile small_cnn --input-size 3 -1 8", ["argument --input-size: expected an integer >= 1"]),
    ("profile small_cnn --batch-sizes 0", ["argument --batch-sizes: expected an integer >= 1"]),
    ("profile small_cnn --batch-sizes", ["argument --batch-sizes: expected at least one argument"]),
    ("profile small_cnn --device tpu", ["argument --device: expected 'cpu', 'cuda', 'cuda:N' or "
                                        "'mps', got 'tpu'"]),
    ("profile small_cnn --device cuda:99", ["argument --device: 'cuda:99': "]),
    ("profile small_cnn --min-run-time -1", ["argument --min-run-time: expected a finite number > "
                                             "0, got '-1'"]),
    ("profile small_cnn --min-run-time nan", ["argument --min-run-time: expected a finite number"]),
    ("profile small_cnn --min-run-time 0", ["argument --min-run-time: expected a finite number > "
                                            "0, got '0'"]),
    ("profile small_cnn --no-timing=1", ["argument --no-timing: ignored explicit argument '1'"]),
    ("profile small_cnn --threads 0", ["argument --threads: expected an integer >= 1, got '0'"]),
    # fold
    ("fold", ["the following arguments are required: RUN_DIR"]),
    ("fold {dir} --calibration-size 0", ["argument --calibration-size: expected an integer >= 1"]),
    ("fold {dir} --tolerance nan", ["argument --tolerance: expected a finite number >= 0, got "
                                    "'nan'"]),
    ("fold {dir} --tolerance -0.1", ["argument --tolerance: expected a finite number >= 0"]),
    ("fold {dir} --out {dir}", ["argument --out: expected a file, got the folder"]),
    ("fold {dir} --out {file}/folded.pt", ["argument --out: ", "cannot be created: ",
                                           "is a file"]),
    ("fold {dir} --threads 0", ["argument --threads: expected an integer >= 1, got '0'"]),
    # inspect
    ("inspect", ["give either RUN_DIR", "or --model NAME"]),
    ("inspect {dir} --model small_cnn", ["give either RUN_DIR", "or --model NAME"]),
    ("inspect {dir} --conv-type dynamic", ["--conv-type and --model-arg build an untrained "
                                           "--model"]),
    ("inspect --model resnet19", ["argument --model: unknown model 'resnet19'"]),
    ("inspect --model small_cnn --conv-type nope", ["argument --conv-type: unknown conv type"]),
    ("inspect --model small_cnn --model-arg nope=1", ["argument --model-arg: ", "'nope'"]),
    ("inspect --model small_cnn --seed -1", ["argument --seed: seed must be >= 0, got -1"]),
    ("inspect --model small_cnn --data {missing}", ["dataset folder", "--data takes"]),
    ("inspect --model small_cnn --out {file}", ["argument --out: expected a folder, got the "
                                                "file"]),
    ("inspect --model small_cnn --batch-size 0", ["argument --batch-size: expected an integer "
                                                  ">= 1, got '0'"]),
    ("inspect --model small_cnn --limit 0", ["argument --limit: expected an integer >= 1"]),
    ("inspect --model small_cnn --limit all", ["argument --limit: expected an integer >= 1"]),
    # export
    ("export", ["give either RUN_DIR", "or --model NAME"]),
    ("export {dir} --model-arg width=4", ["--conv-type and --model-arg build an untrained "
                                          "--model; a RUN_DIR keeps its own"]),
    ("export --model resnet19", ["argument --model: unknown model 'resnet19'"]),
    ("export --model small_cnn --conv-type nope", ["argument --conv-type: unknown conv type"]),
    ("export --model small_cnn --model-arg width=-1", ["argument --model-arg: width must be"]),
    ("export --model small_cnn --seed 2e64", ["argument --seed: expected an integer from 0"]),
    ("export --model small_cnn --data {file}", ["--data must name a folder, 'mnist' or "
                                                "'digits'"]),
    ("export --model small_cnn --out {dir}", ["argument --out: expected a file, got the folder"]),
    ("export --model small_cnn --out {file}/m.onnx", ["argument --out: ", "is a file"]),
    ("export --model small_cnn --fixed-batch 0", ["argument --fixed-batch: expected an integer "
                                                  ">= 1, got '0'"]),
    ("export --model small_cnn --opset 3", ["argument --opset: the ONNX opset must be an integer "
                                            "from 18 to "]),
    ("export --model small_cnn --opset 17", ["argument --opset: the ONNX opset must be an integer "
                                             "from 18"]),
    ("export --model small_cnn --opset 999", ["argument --opset: the ONNX opset must be"]),
    ("export --model small_cnn --opset x", ["argument --opset: expected an integer, got 'x'"]),
    ("export --model small_cnn --check=1", ["argument --check: ignored explicit argument '1'"]),
    # list
    ("list --all", ["unrecognized arguments: --all"]),
]
if not torch.cuda.is_available():
    BAD += [
        ("train --device cuda", ["argument --device: 'cuda': no CUDA GPU is available here "
                                 "(use auto or cpu)"]),
        ("profile small_cnn --device cuda", ["argument --device: 'cuda': no CUDA GPU is "
                                             "available here (use cpu)"]),
    ]

# Cheap settings put before a training command's own options (which come later and win), so
# that an invocation that was wrongly accepted trains for seconds, not minutes (on the digits:
# MNIST may not be fetched here; tests/test_mnist.py tests the default).
_CHEAP = {"train": ["--data", "digits", "--epochs", "1", "--model-arg", "width=4", "--quiet"],
          "compare": ["--data", "digits", "--epochs", "1", "--model-arg", "width=4",
                      "--conv-types", "static", "--seeds", "0", "--quiet"]}


def _argv(line: str, paths: dict[str, Path]) -> list[str]:
    argv = line.format(**{k: str(v) for k, v in paths.items()}).split()
    if argv and argv[0] in _CHEAP:
        given = "--out" in argv or "--resume" in argv
        out = [] if given else ["--out", str(paths["dir"] / f"out-{len(line)}")]
        argv = [argv[0], *_CHEAP[argv[0]], *out, *argv[1:]]
    return argv


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")  # a folder that holds a run
    return {"file": tmp_path / "a-file", "dir": tmp_path, "missing": tmp_path / "nowhere",
            "run_dir": tmp_path / "run"}


@pytest.mark.parametrize(("line", "expected"), BAD, ids=[line or "(none)" for line, _ in BAD])
def test_every_bad_invocation_is_one_line_and_status_2(paths, capsys, line: str,
                                                       expected: list[str]) -> None:
    argv = _argv(line, paths)
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse: usage, then the error line
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    usage = [n for n, text in enumerate(err.splitlines()) if text.startswith("usage: ")]
    lines = err.splitlines()[usage[0] + 1:] if usage else err.splitlines()
    lines = [text for text in lines if not text.startswith(" ")]  # usage's continuation lines
    assert len(lines) == 1, err
    command = argv[0] if argv and argv[0] in {c.name for c in COMMANDS} else None
    if "unrecognized arguments" in err:
        command = None  # argparse's top-level parser reports those
    assert lines[0].startswith(f"dynconv {command}: error: " if command else "dynconv: error: ")
    for text in expected:
        assert text.format(**{k: str(v) for k, v in paths.items()}) in lines[0], lines[0]


def _options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Every option and positional of every command, as ``dynconv COMMAND --help`` lists it."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for name, command in sub.choices.items():
        found[name] = {
            action.option_strings[0] if action.option_strings else action.metavar
            for action in command._actions if not isinstance(action, argparse._HelpAction)
        }
    return found


def test_the_table_covers_every_option_of_every_command() -> None:
    tried: dict[str, set[str]] = {}
    for line, expected in BAD:
        words = line.split()
        if words:
            # --no-flip tries --flip/--no-flip (but --no-timing is an option of its own)
            tried.setdefault(words[0], set()).update(
                w.split("=")[0].replace("--no-flip", "--flip") for w in words[1:])
            tried[words[0]].update(t for t in ("MODEL", "RUN_DIR") if t in " ".join(expected))
    missing = {command: sorted(wanted - tried.get(command, set()))
               for command, wanted in _options(_build_parser()).items()}
    assert {command: names for command, names in missing.items() if names} == {}


def test_a_path_that_cannot_be_written_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(options.os, "access", lambda path, mode: False)
    with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
        options.out_folder(str(tmp_path / "new"))


def test_no_command_prints_the_usage_to_stderr_and_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "dynconv"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("usage: dynconv")
    assert done.stderr.splitlines()[-1].startswith("dynconv: error: a command is required")


def test_good_values_pass_the_option_types(tmp_path: Path) -> None:
    assert options.positive_int("3") == 3 and options.non_negative_int("0") == 0
    assert options.positive_float("1e-3") == 1e-3 and options.non_negative_float("0") == 0.0
    assert options.initial_temperature("1") == 1.0
    assert options.opset("18") == 18
    assert options.device("cpu") == "cpu" and options.training_device("auto") == "auto"
    assert options.out_folder(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert options.out_file(str(tmp_path / "model.onnx")) == str(tmp_path / "model.onnx")
    (tmp_path / "old.pt").write_bytes(b"")
    assert options.out_file(str(tmp_path / "old.pt"))  # a file to replace
    assert options.model_name("resnet18") == "resnet18"
    assert options.conv_type("odconv") == "odconv"
