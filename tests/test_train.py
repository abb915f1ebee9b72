"""Training: every type learns the digits; seeds, checkpoints, kill-and-resume, Ctrl-C,
distributed (gloo, one process), mixed precision and clear errors."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dynconv
import dynconv.training.loop as train_module
from dynconv._io import write_atomically
from dynconv.cli import main
from dynconv.layers.factory import conv_types
from dynconv.layers.temperature import TemperatureSchedule
from dynconv.models import create_model_for_data
from dynconv.training import TrainConfig, load_digits, train
from dynconv.training.checkpoints import CheckpointError, read_checkpoint
from dynconv.training.predictions import (
    PREDICTIONS_NAME,
    Predictions,
    read_predictions,
    write_predictions,
)

SRC = Path(__file__).resolve().parents[1] / "src"
DIGITS = load_digits()


def _config(tmp_path: Path, name: str = "run", **kwargs) -> TrainConfig:
    settings = {"data": "digits", "conv_type": "dynamic", "model_args": {"width": 8}, "epochs": 1,
                "batch_size": 32, "temperature_epochs": 1, "threads": 1, "quiet": True,
                "out": str(tmp_path / name), **kwargs}
    return TrainConfig(**settings)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("conv_type", conv_types())
def test_every_type_learns_the_digits(tmp_path: Path, conv_type: str) -> None:
    result = train(_config(tmp_path, conv_type=conv_type, epochs=3), dataset=DIGITS)
    accuracy = result.metrics[-1]["test_acc"]
    losses = [r["train_loss"] for r in result.metrics]
    assert losses[-1] < losses[0], f"{conv_type}: training loss did not fall: {losses}"
    # DRConv starts slowly here (its generated kernels start nearly constant over their kH x kW
    # positions; docs/layers.md): 0.23-0.28 after 3 epochs (seeds 0, 1), against 0.84-0.97 for
    # the other types
    floor = 0.2 if conv_type == "drconv" else 0.6
    assert accuracy > floor, f"{conv_type}: {accuracy:.3f} after 3 epochs (chance is 0.1)"
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in result.metrics)


def test_outputs_and_temperature_follow_the_schedule(tmp_path: Path, monkeypatch) -> None:
    seen = []
    evaluate = train_module._evaluate

    def recording_evaluate(model, *args, **kwargs):
        seen.append(dynconv.get_temperature(model))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "_evaluate", recording_evaluate)
    config = _config(tmp_path, epochs=2, temperature_epochs=3)
    result = train(config, dataset=DIGITS)
    assert seen == [1.0, 1.0]  # evaluation always at the final temperature
    per_epoch = len(DIGITS.train) // 32
    schedule = TemperatureSchedule("linear", epochs=3)
    assert [r["temperature"] for r in result.metrics] == pytest.approx(
        [schedule.at(e, per_epoch - 1, per_epoch) for e in range(2)])
    assert dynconv.get_temperature(result.model) == 1.0
    out = tmp_path / "run"
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["test_acc"]) == pytest.approx(result.metrics[1]["test_acc"])
    assert json.loads((out / "config.json").read_text())["conv_type"] == "dynamic"
    fresh = create_model_for_data("small_cnn", "dynamic", 10, 1, 8, width=8)
    fresh.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["position"] == {"epoch": 2, "batch": 0}
    assert len(state["metrics"]) == 2


def test_seed_makes_runs_identical(tmp_path: Path) -> None:
    a = train(_config(tmp_path, "a"), dataset=DIGITS).model.state_dict()
    b = train(_config(tmp_path, "b"), dataset=DIGITS).model.state_dict()
    c = train(_config(tmp_path, "c", seed=1), dataset=DIGITS).model.state_dict()
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


KILL_TEST_EPOCHS = 3
KILL_TEST_FLAGS = {"data": "digits", "conv_type": "dynamic", "model_args": {"width": 8},
                   "epochs": KILL_TEST_EPOCHS, "batch_size": 16, "temperature_epochs": 1,
                   "threads": 1, "quiet": True}


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dynconv", "train", "--data", "digits", "--conv-type", "dynamic",
            "--model-arg", "width=8", "--epochs", str(KILL_TEST_EPOCHS), "--batch-size", "16",
            "--temperature-epochs", "1", "--threads", "1", "--quiet", "--out", str(out), *extra]


_ENV = {**os.environ, "PYTHONPATH": str(SRC)}


def _wait_for_first_epoch(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    metrics = out / "metrics.csv"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 1:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("the run did not finish its first epoch in time")


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    config = TrainConfig(**KILL_TEST_FLAGS, out=str(out / "run"))
    return train(config).model.state_dict()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_stopped_and_resumed_run_ends_with_the_same_weights(
    tmp_path: Path, how: str, uninterrupted_weights: dict
) -> None:
    out = tmp_path / "stopped"
    process = subprocess.Popen(_command(out), env=_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_first_epoch(process, out)
    time.sleep(0.3)  # into the second epoch
    assert process.poll() is None
    if how == "SIGKILL":
        process.kill()
        assert process.wait() == -signal.SIGKILL
    else:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, process.communicate()
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["position"]["epoch"] < KILL_TEST_EPOCHS
    if how == "SIGINT":  # saved where it stopped, within the second epoch
        assert state["position"]["epoch"] == 1 and state["position"]["batch"] > 0
        assert len(state["metrics"]) == 1
    assert not (out / "model.pt").exists()
    # after a kill, the whole command again with --resume; after Ctrl-C, the folder only
    command = (_command(out, "--resume") if how == "SIGKILL" else
               [sys.executable, "-m", "dynconv", "train", "--out", str(out), "--resume"])
    resumed = subprocess.run(command, env=_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    weights = torch.load(out / "model.pt", weights_only=True)
    assert _same_weights(weights, uninterrupted_weights)
    with (out / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    assert read_predictions(out / PREDICTIONS_NAME).epoch == KILL_TEST_EPOCHS


def test_resume_refuses_other_settings_from_the_command_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**{**KILL_TEST_FLAGS, "epochs": 1}, out=str(out)), dataset=DIGITS)
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.3"]) == 2
    assert "belongs to a different run (lr: checkpoint 0.1, now 0.3)" in capsys.readouterr().err
    assert main(["train", "--resume", "--quiet"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err


def test_a_checkpoint_without_the_settings_added_since_resumes(tmp_path: Path) -> None:
    """A checkpoint written before --train-images and --eval-on existed resumes: a setting it
    lacks has its default."""
    from dynconv.training.checkpoints import write_checkpoint

    config = _config(tmp_path)
    first = train(config, dataset=DIGITS)
    path = tmp_path / "run" / "checkpoint.pt"
    state = read_checkpoint(path)
    for key in ("train_images", "eval_on"):
        del state["config"][key]
    write_checkpoint(path, state)
    again = train(config, resume=True, dataset=DIGITS)
    assert again.metrics == first.metrics


def test_checkpoint_errors(tmp_path: Path) -> None:
    config = _config(tmp_path)
    train(config, dataset=DIGITS)
    with pytest.raises(CheckpointError, match=r"already holds a run.*--resume"):
        train(config, dataset=DIGITS)
    with pytest.raises(CheckpointError, match=r"different run \(lr: checkpoint 0.1, now 0.05"):
        train(_config(tmp_path, lr=0.05), resume=True, dataset=DIGITS)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(_config(tmp_path, "elsewhere"), resume=True, dataset=DIGITS)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    content = checkpoint.read_bytes()
    checkpoint.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or damaged.*it was not used: delete it"):
        train(config, resume=True, dataset=DIGITS)
    torch.save({"model": {}}, checkpoint)
    with pytest.raises(CheckpointError, match="not a dynconv training checkpoint"):
        train(config, resume=True, dataset=DIGITS)
    # a resumed finished run trains nothing and gives the stored metrics
    other = _config(tmp_path, "other")
    first = train(other, dataset=DIGITS)
    again = train(other, resume=True, dataset=DIGITS)
    assert again.metrics == first.metrics
    assert _same_weights(again.model.state_dict(), first.model.state_dict())


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"model": "resnet19"}, ValueError, r"unknown model 'resnet19'; expected one of"),
        ({"conv_type": "deform"}, ValueError, r"unknown conv type 'deform'; expected one of"),
        ({"batch_size": 5000}, ValueError, r"batch size 5000 is larger than the training set"),
        ({"batch_size": 1}, ValueError, r"a batch of 1 image per process cannot train "
                                        r"small_cnn: BatchNorm needs at least 2"),
        ({"batch_size": 0}, ValueError, "batch size must be >= 1, got 0"),
        ({"epochs": 0}, ValueError, "epochs must be >= 1, got 0"),
        ({"eval_every": 0}, ValueError, "eval every must be >= 1, got 0"),
        ({"lr": -1.0}, ValueError, "lr must be a finite number >= 0"),
        ({"lr_schedule": "multistep"}, ValueError, "multistep schedule needs milestones"),
        ({"lr_schedule": "poly"}, ValueError, "unknown learning-rate schedule 'poly'"),
        ({"temperature": "cosine"}, ValueError, "unknown temperature schedule 'cosine'"),
        ({"data": "/no/such/folder"}, ValueError, "dataset folder '/no/such/folder' does not "
                                                  "exist"),
        ({"device": "tpu:9"}, ValueError, "unknown device 'tpu:9'"),
        ({"model": "od_resnet18"}, ValueError, "built with conv type 'odconv' only"),
    ],
)
def test_clear_errors(tmp_path: Path, kwargs, error, message) -> None:
    dataset = None if "data" in kwargs else DIGITS
    with pytest.raises(error, match=message):
        train(_config(tmp_path, **kwargs), dataset=dataset)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_code_path_on_one_cpu_process(tmp_path: Path, monkeypatch) -> None:
    plain = train(_config(tmp_path, "plain"), dataset=DIGITS).model.state_dict()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    backends = []
    result = train(_config(tmp_path, "ddp"), dataset=DIGITS, on_epoch=lambda row: backends.append(
        torch.distributed.get_backend() if torch.distributed.is_initialized() else None))
    assert backends == ["gloo"]
    assert not torch.distributed.is_initialized()  # the run closed its process group
    assert _same_weights(result.model.state_dict(), plain)


def test_two_processes_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "dynconv", "train", "--data", "digits",
               "--conv-type", "dynamic",
               "--model-arg", "width=8", "--epochs", "1", "--batch-size", "32",
               "--temperature-epochs", "1", "--threads", "1", "--out", str(out),
               "--autotune", "--autotune-cache", str(tmp_path / "autotune.json")]
    done = subprocess.run(command, env=_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test accuracy") == 1  # process 0 reports, once
    # autotuned: rank 0 timed the shapes (the other process received its choices), reported once
    tuned = re.findall(r"^autotune: \d+ shapes: (\d+) timed in ", done.stdout, re.M)
    assert len(tuned) == 1 and int(tuned[0]) > 0, done.stdout
    assert json.loads((tmp_path / "autotune.json").read_text())["sections"]
    assert "2 processes" in done.stdout
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["position"] == {"epoch": 1, "batch": 0}
    row = state["metrics"][0]
    assert 0 < row["test_acc"] <= 1 and torch.isfinite(torch.tensor(row["train_loss"]))
    # the whole training set went through (44 global batches of 32), counted once
    assert row["images_per_s"] * row["train_time_s"] == pytest.approx(44 * 32)
    # every test image's prediction, each from the process that evaluated its batch
    predictions = read_predictions(out / PREDICTIONS_NAME)
    assert torch.equal(predictions.labels, DIGITS.test.labels)
    assert predictions.predicted.min() >= 0
    assert predictions.correct.double().mean().item() == pytest.approx(row["test_acc"])


def test_mixed_precision_path_on_cpu(tmp_path: Path) -> None:
    # three epochs: after one, the width-8 network's logits are nearly flat, and bfloat16 rounding
    # alone moved its test accuracy from 32% to 11% on one AMD CPU (bfloat16 kernels differ
    # between CPUs); after three, bfloat16 and float32 both reach about 94% on it
    result = train(_config(tmp_path, amp=True, epochs=3), dataset=DIGITS)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.metrics)
    assert result.metrics[-1]["test_acc"] > 0.5


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    write_atomically(target, lambda f: f.write(b"old"))

    def failing(file) -> None:
        file.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_final_epochs_predictions_are_kept_per_image(tmp_path: Path) -> None:
    config = _config(tmp_path, epochs=2)
    result = train(config, dataset=DIGITS)
    path = tmp_path / "run" / PREDICTIONS_NAME
    kept = read_predictions(path)
    assert kept.epoch == 2
    assert torch.equal(kept.labels, DIGITS.test.labels)
    assert kept.correct.double().mean().item() == pytest.approx(result.metrics[-1]["test_acc"])
    # the same predictions as the final model gives
    with torch.no_grad():
        logits = result.model(DIGITS.normalize(DIGITS.test.images))
    assert torch.equal(kept.predicted, logits.argmax(1))
    # a finished run resumed keeps them; one without them (older dynconv) evaluates once
    stamp = path.stat().st_mtime_ns
    train(config, resume=True, dataset=DIGITS)
    assert path.stat().st_mtime_ns == stamp
    path.unlink()
    train(config, resume=True, dataset=DIGITS)
    again = read_predictions(path)
    assert again.epoch == 2 and torch.equal(again.predicted, kept.predicted)


def test_eval_every_evaluates_every_n_epochs_and_after_the_last(tmp_path: Path,
                                                                  capsys) -> None:
    config = _config(tmp_path, epochs=5, eval_every=2, conv_type="static", quiet=False)
    every = _config(tmp_path, "every", epochs=5, conv_type="static")
    metrics = train(config, dataset=DIGITS).metrics
    evaluated = [int(m["epoch"]) for m in metrics if not math.isnan(m["test_acc"])]
    assert evaluated == [2, 4, 5]
    assert all(m["eval_time_s"] == 0 for m in metrics if int(m["epoch"]) in (1, 3))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert ["test loss" in line for line in lines] == [False, True, False, True, True]
    # skipping an evaluation changes nothing else: the same training as evaluating every epoch
    reference = train(every, dataset=DIGITS).metrics
    assert [m["train_loss"] for m in metrics] == [m["train_loss"] for m in reference]
    assert metrics[-1]["test_acc"] == reference[-1]["test_acc"]
    assert read_predictions(tmp_path / "run" / PREDICTIONS_NAME).epoch == 5
    assert [int(r["epoch"]) for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open())
            if r["test_acc"] not in ("nan", "")] == [2, 4, 5]


def test_predictions_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / PREDICTIONS_NAME
    with pytest.raises(ValueError, match=f"{PREDICTIONS_NAME}' is missing"):
        read_predictions(path)
    write_predictions(path, Predictions(3, torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])))
    read = read_predictions(path)
    assert read.epoch == 3 and read.correct.tolist() == [True, False, True]
    text = path.read_text()
    for bad, message in ((text.replace("predicted", "guess"), "not a file of per-image"),
                         (text.replace("3,2,3,3", "3,2,3,x"), "is damaged: every row"),
                         (text.replace("3,1,2,0", "2,1,2,0"), "expected one epoch"),
                         (text.replace("3,1,2,0", "3,5,2,0"), "images 0 to 2 in order")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            read_predictions(path)
    with pytest.raises(ValueError, match=r"two tensors \[N\]"):
        Predictions(1, torch.zeros(3), torch.zeros(2))


@pytest.mark.parametrize("conv_type", ["static", "dynamic"])
def test_a_static_run_shows_no_temperature(tmp_path: Path, capsys, conv_type: str) -> None:
    train(_config(tmp_path, conv_type=conv_type, quiet=False, epochs=2, temperature_epochs=2),
          dataset=DIGITS)
    printed = capsys.readouterr().out
    dynamic = conv_type != "static"
    assert ("temperature: linear (30 to 1 over 2 epochs" in printed) == dynamic
    assert ("temperature reaches 1 only at the end" in printed) == dynamic
    assert ("  T 1  train loss" in printed) == dynamic
    assert "epoch 2/2  lr 0.05  " in printed


def test_resuming_a_finished_run_says_it_is_finished(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(_config(tmp_path, quiet=False, epochs=2), dataset=DIGITS)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "at epoch 3, batch 1" not in printed
    assert (f"the run in {out} finished its 2 epochs: nothing to resume. To train longer, start "
            "a new run with a larger --epochs and another --out: a run's epochs cannot change "
            "(its cosine learning-rate schedule is laid out over them)") in printed
    assert "final test accuracy" in printed
    # what the message says: more epochs on the same folder is another run
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert "different run (epochs: checkpoint 2, now 3)" in capsys.readouterr().err


def test_kw_on_mnist_anneals_from_one_to_zero_evaluates_at_zero_and_resumes(
    tmp_path: Path, mnist: str, monkeypatch, capsys
) -> None:
    """KernelWarehouse from the command line: the weight of each cell's assigned warehouse cell
    goes from 1 to 0 per iteration (the batches, the epoch log's T, metrics.csv, the
    checkpoint), every evaluation runs at 0, and a run stopped by Ctrl-C within its second
    epoch resumes to the weights of the run never stopped."""
    trained: list[float] = []
    evaluated: list[float] = []
    stop_at: list[tuple[int, int]] = []
    anneal, evaluate = train_module.anneal_temperature, train_module._evaluate

    def recording_anneal(model, schedule, epoch, batch, per_epoch):
        value = anneal(model, schedule, epoch, batch, per_epoch)
        trained.append(value)
        if (epoch, batch) in stop_at:  # Ctrl-C while this batch trains
            os.kill(os.getpid(), signal.SIGINT)
        return value

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append(dynconv.get_temperature(model))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "anneal_temperature", recording_anneal)
    monkeypatch.setattr(train_module, "_evaluate", recording_evaluate)
    options = ["train", "--conv-type", "kw", "--epochs", "2", "--temperature-epochs", "2",
               "--train-images", "40", "--batch-size", "20", "--model-arg", "width=4",
               "--threads", "1"]
    full = tmp_path / "full"
    assert main([*options, "--out", str(full)]) == 0
    printed = capsys.readouterr().out
    # two batches per epoch: 1 - (i + 1) / 4, as the official get_temperature
    assert trained == [0.75, 0.5, 0.25, 0.0]
    assert evaluated == [0.0, 0.0]
    assert "temperature: linear (1 to 0 over 2 epochs, per iteration; evaluation at 0)" in printed
    assert "note: the temperature reaches 0 only at the end of epoch 2" in printed
    assert re.findall(r"  T (\S+)  train loss", printed) == ["0.5", "0"]
    with (full / "metrics.csv").open() as f:
        assert [float(r["temperature"]) for r in csv.DictReader(f)] == [0.5, 0.0]
    assert read_checkpoint(full / "checkpoint.pt")["temperature"] == 0.0
    model, _, _ = train_module.load_run(full)
    assert dynconv.get_temperature(model) == 0.0

    trained.clear()
    stop_at.append((1, 0))
    stopped = tmp_path / "stopped"
    assert main([*options, "--out", str(stopped)]) == 130
    state = read_checkpoint(stopped / "checkpoint.pt")
    assert state["position"]["epoch"] == 1 and state["position"]["batch"] == 1
    assert state["temperature"] == 0.25  # of the last batch trained
    stop_at.clear()
    assert main(["train", "--out", str(stopped), "--resume"]) == 0
    assert trained == [0.75, 0.5, 0.25, 0.0]
    assert _same_weights(torch.load(stopped / "model.pt", weights_only=True),
                         torch.load(full / "model.pt", weights_only=True))
