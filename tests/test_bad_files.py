"""Bad files: every reader refuses them in one line that names the file, every command exits 2
without a traceback, nothing in a pickle runs, and a checkpoint with one byte changed is refused
(checksum), with the previous checkpoint named when resuming."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import torch.utils.serialization

import dynconv
from dynconv import CheckpointError, DynamicConv2d, ODConv2d, load_checkpoint
from dynconv._io import write_atomically
from dynconv.cli import main
from dynconv.tools.checkpoint import CHECKSUM_KEY, checksum, load_file, save_file
from dynconv.training import TrainConfig, load_digits, load_run, train
from dynconv.training.checkpoints import read_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
DIGITS = load_digits()
RUN = {"data": "digits", "conv_type": "dynamic", "model_args": {"width": 8}, "batch_size": 32,
       "temperature_epochs": 1, "threads": 1, "quiet": True}


class _Marker:
    """Pickles as a call that creates a file: loading it must not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Calls:
    """Pickles as ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.call = (function, args)

    def __reduce__(self):
        return self.call


def _record(path: Path, name_part: str = "/data/") -> tuple[int, int]:
    """(offset, size) of the bytes of the largest tensor record of a torch.save zip archive:
    past its local header, so that changing them leaves the zip structure intact."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if name_part in i.filename),
                   key=lambda i: i.file_size)
    with path.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def _flip_a_tensor_byte(path: Path) -> None:
    offset, size = _record(path)
    content = bytearray(path.read_bytes())
    content[offset + size // 2] ^= 0x10
    path.write_bytes(bytes(content))


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dynconv {command}: error: "), err
    return lines[0]


# -- load_file and load_checkpoint on bad files --------------------------------------------------


def _state() -> dict:
    torch.manual_seed(0)
    return ODConv2d(4, 4, 3).state_dict()


def _bad_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (content, what the error must say)."""
    from safetensors.torch import save as safetensors_bytes

    torch.save(_state(), tmp_path / "good.pt")
    zipped = (tmp_path / "good.pt").read_bytes()
    safetensors = safetensors_bytes(_state())
    legacy = tmp_path / "legacy.pt"
    torch.save(_state(), legacy, _use_new_zipfile_serialization=False)
    return {
        "empty.pt": (b"", r"the file is empty \(0 bytes\)"),
        "text.pt": (b"epoch,loss\n1,0.5\n", r"not a checkpoint: .* starts with b'epoch,loss"),
        "random.pt": (bytes(range(7, 250)) * 4, "not a checkpoint: neither a torch.save file"),
        "truncated.pt": (zipped[: len(zipped) // 2], "truncated or damaged: a zip archive"),
        "truncated-zip.safetensors": (
            zipped[:200], r"\(a torch.save file named .safetensors\): the file is truncated"),
        "truncated-safetensors.pt": (
            safetensors[:60], r"\(a safetensors file named .pt\): the file is truncated"),
        "cut-safetensors.safetensors": (safetensors[:-8], "a damaged safetensors file"),
        "truncated-legacy.pt": (legacy.read_bytes()[:300], "corrupt or truncated"),
    }


def test_bad_files_give_one_error_type_that_names_the_file(tmp_path: Path) -> None:
    for name, (content, message) in _bad_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(content)
        for read in (load_file, lambda p: load_checkpoint(ODConv2d(4, 4, 3), p)):
            with pytest.raises(CheckpointError, match=message) as info:
                read(path)
            assert f"cannot load {str(path)!r}" in str(info.value), name
            assert "\n" not in str(info.value)
    for path, message in ((tmp_path / "missing.pt", "no such file"),
                          (tmp_path, "it is a folder, not a file")):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(ODConv2d(4, 4, 3), path)
    assert issubclass(CheckpointError, ValueError)
    assert dynconv.training.checkpoints.CheckpointError is CheckpointError


def test_the_format_comes_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file as save_safetensors

    state = _state()
    save_safetensors(state, str(tmp_path / "safetensors.pt"))
    torch.save(state, tmp_path / "zip.safetensors")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for name in ("safetensors.pt", "zip.safetensors", "legacy.bin"):
        layer = ODConv2d(4, 4, 3)
        assert load_checkpoint(layer, tmp_path / name).exact, name
        torch.testing.assert_close(layer.state_dict(), state)


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    torch.save({"fc.bias": torch.zeros(2), "x": _Marker(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refuses to build .*GLOBAL .*system.*nothing in "
                                              r"it was run"):
        load_checkpoint(ODConv2d(4, 4, 3), path)
    assert not marker.exists()


# -- the checksum --------------------------------------------------------------------------------


def test_saved_state_dicts_stay_plain_state_dicts_with_a_checksum(tmp_path: Path) -> None:
    state = _state()
    save_file(state, tmp_path / "model.pt")
    assert CHECKSUM_KEY not in state._metadata[""]  # the caller's dict is left as it was
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(loaded) == list(state)  # no extra key: load_state_dict takes it as it is
    assert loaded._metadata[""][CHECKSUM_KEY] == checksum(state)
    layer = ODConv2d(4, 4, 3)
    layer.load_state_dict(loaded)
    assert load_checkpoint(ODConv2d(4, 4, 3), tmp_path / "model.pt").exact
    # other dicts hold it under the key; load_file returns what was saved
    save_file({"model": state, "epoch": 3}, tmp_path / "other.pt")
    assert CHECKSUM_KEY in torch.load(tmp_path / "other.pt", weights_only=True)
    assert set(load_file(tmp_path / "other.pt")) == {"model", "epoch"}


def test_checksum_covers_values_dtypes_shapes_and_keys() -> None:
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": [1, 0.5, "x", None]}
    reference = checksum(state)
    assert checksum({"b": [1, 0.5, "x", None], "a": torch.arange(6.0).reshape(2, 3)}) == reference
    assert checksum({**state, "a": state["a"].t().contiguous().t()}) == reference  # layout
    one_ulp = state["a"].clone()
    one_ulp[0, 2] = torch.nextafter(one_ulp[0, 2], torch.tensor(9.0))  # the last bit of one value
    for changed in ({**state, "a": state["a"].reshape(3, 2)},
                    {**state, "a": state["a"].double()},
                    {**state, "a": one_ulp},
                    {"c": state["a"], "b": state["b"]},
                    {**state, "b": [1, 0.5, "y", None]}):
        assert checksum(changed) != reference


@pytest.mark.parametrize("crc", [True, False], ids=["zip-crc", "no-crc"])
def test_one_flipped_byte_in_the_tensor_data_is_refused(tmp_path: Path, crc: bool) -> None:
    # without the zip's CRC-32 (compute_crc32 off), only the checksum can tell
    path = tmp_path / "model.pt"
    with torch.utils.serialization.config.patch({"save.compute_crc32": crc}):
        save_file(_state(), path)
    _flip_a_tensor_byte(path)
    loaded = torch.load(path, weights_only=True)  # torch reads it without a word
    assert not all(torch.equal(loaded[k], v) for k, v in _state().items())
    reason = "fails the zip's CRC-32" if crc else "does not match the checksum"
    with pytest.raises(CheckpointError, match=f"cannot load {str(path)!r}: .*{reason}"):
        load_checkpoint(ODConv2d(4, 4, 3), path)


def test_a_state_dict_changed_and_saved_again_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_file(_state(), path)
    state = torch.load(path, weights_only=True)
    state["weight"][0, 0, 0, 0, 0] += 1
    torch.save(state, path)  # a consistent zip, with the checksum of the old tensors
    with pytest.raises(CheckpointError, match="tensors were changed after dynconv wrote it"):
        load_file(path)


def test_a_write_that_does_not_verify_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_file(_state(), path)
    before = path.read_bytes()

    def refuse(written: Path) -> None:
        raise CheckpointError(f"{written} refused")

    with pytest.raises(CheckpointError, match="refused"):
        write_atomically(path, lambda f: f.write(b"new"), verify=refuse,
                         previous=tmp_path / "previous.pt")
    assert path.read_bytes() == before and not (tmp_path / "previous.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links"])
def test_the_replaced_file_is_kept_as_the_previous_one(tmp_path: Path, monkeypatch,
                                                       links: bool) -> None:
    if not links:  # a file system without hard links: renamed instead
        monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError("no")))
    path, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    for content in (b"first", b"second", b"third"):
        write_atomically(path, lambda f, c=content: f.write(c), previous=previous)
    assert path.read_bytes() == b"third" and previous.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name, path.name]


# -- runs and commands ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-epoch run of the small CNN: model.pt, checkpoint.pt and checkpoint.prev.pt."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig(**RUN, epochs=2, out=str(out)), dataset=DIGITS)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_run_keeps_the_previous_checkpoint_and_checksums(finished_run: Path) -> None:
    latest = read_checkpoint(finished_run / "checkpoint.pt")
    previous = read_checkpoint(finished_run / "checkpoint.prev.pt")
    assert latest["position"] == {"epoch": 2, "batch": 0}
    assert previous["position"] == {"epoch": 1, "batch": 0}
    stored = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert stored[CHECKSUM_KEY].startswith("sha256:")
    assert CHECKSUM_KEY in torch.load(finished_run / "model.pt", weights_only=True)._metadata[""]


def _break(path: Path, how: str, marker: Path) -> str:
    """Make ``path`` (a model.pt) bad in the way ``how``; return what the error must say."""
    state = dict(torch.load(path, weights_only=True))  # without the metadata and its checksum
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        return "truncated or damaged"
    if how == "random":
        path.write_bytes(bytes(range(256)) * 8)
        return "not a checkpoint"
    if how == "flipped":
        _flip_a_tensor_byte(path)
        return "corrupt"
    if how == "malicious":
        torch.save({**state, "x": _Marker(marker)}, path)
        return "refuses to build"
    if how == "shapes":
        state["fc.bias"] = torch.zeros(5)
        torch.save(state, path)
        return "does not fit SmallCNN: size mismatch for fc.bias"
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    return r"does not match SmallCNN: 1 key\(s\) unexpected .*: extra.weight"


@pytest.mark.parametrize("how", ["truncated", "random", "flipped", "malicious", "shapes",
                                 "unknown_keys"])
def test_commands_on_a_bad_model_file_print_one_line_and_exit_2(
    finished_run: Path, tmp_path: Path, capsys, how: str
) -> None:
    run = _copy(finished_run, tmp_path)
    marker = tmp_path / "ran"
    message = _break(run / "model.pt", how, marker)
    for command in (["fold", str(run)], ["export", str(run)],
                    ["inspect", str(run), "--out", str(tmp_path / "inspect")]):
        assert main(command) == 2, command
        line = _one_line_error(capsys, command[0])
        assert str(run / "model.pt") in line and re.search(message, line), line
    assert not marker.exists()
    assert not (run / "folded.pt").exists() and not (run / "model.onnx").exists()
    with pytest.raises(ValueError, match=message):
        load_run(run, DIGITS)


def test_a_bad_checkpoint_of_a_stopped_run_is_named(finished_run: Path, tmp_path: Path,
                                                    capsys) -> None:
    run = _copy(finished_run, tmp_path)
    (run / "model.pt").unlink()  # as a stopped run: the weights come from the checkpoint
    (run / "checkpoint.prev.pt").unlink()
    _flip_a_tensor_byte(run / "checkpoint.pt")
    assert main(["fold", str(run)]) == 2
    line = _one_line_error(capsys, "fold")
    assert f"cannot load {str(run / 'checkpoint.pt')!r}: the file is corrupt" in line


def test_resume_from_a_corrupt_checkpoint_names_the_previous_one(finished_run: Path,
                                                                 tmp_path: Path,
                                                                 capsys) -> None:
    run = _copy(finished_run, tmp_path)
    _flip_a_tensor_byte(run / "checkpoint.pt")
    command = ["train", "--data", "digits", "--conv-type", "dynamic", "--model-arg", "width=8",
               "--epochs", "2",
               "--batch-size", "32", "--temperature-epochs", "1", "--threads", "1", "--quiet",
               "--out", str(run), "--resume"]
    assert main(command) == 2
    line = _one_line_error(capsys, "train")
    previous, latest = run / "checkpoint.prev.pt", run / "checkpoint.pt"
    assert f"cannot load {str(latest)!r}: the file is corrupt" in line
    assert (f"The previous checkpoint {str(previous)!r} is intact (epoch 1 of 2 done): to use "
            f"it instead, run  mv {previous} {latest}  and run the command again") in line
    # doing what it says resumes, and the run ends exactly as the uninterrupted one
    os.replace(previous, latest)
    assert main(command) == 0
    final = torch.load(finished_run / "model.pt", weights_only=True)
    again = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in final.items())
    # with both checkpoints unusable, it says so
    for path in (latest, run / "checkpoint.prev.pt"):
        path.write_bytes(b"")
    assert main(command) == 2
    assert (f"and the previous checkpoint {str(previous)!r} is unusable too: delete it to start "
            "again") in _one_line_error(capsys, "train")


def test_compare_resume_on_a_corrupt_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "compare"
    command = ["compare", "--data", "digits", "--conv-types", "static", "--seeds", "0",
               "--epochs", "1",
               "--model-arg", "width=8", "--batch-size", "32", "--threads", "1", "--quiet",
               "--out", str(out)]
    assert main(command) == 0
    capsys.readouterr()
    checkpoint = out / "runs" / "static-seed0" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    assert main([*command, "--resume"]) == 2
    line = _one_line_error(capsys, "compare")
    assert f"cannot load {str(checkpoint)!r}: the file is truncated" in line


def test_data_that_is_not_there_or_not_data(tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not data")
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in ("data_batch_1", "test_batch"):
        (cifar / name).write_bytes(b"\x80\x04garbage")
    for data in (tmp_path / "missing", text, cifar):
        for command in (["train", "--data", str(data), "--out", str(tmp_path / "t")],
                        ["compare", "--data", str(data), "--out", str(tmp_path / "c")]):
            assert main(command) == 2, command
            assert str(data) in _one_line_error(capsys, command[0])


# -- the weights_only allow-list -----------------------------------------------------------------


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_importing_dynconv_allows_nothing_more_in_a_weights_only_load(tmp_path: Path) -> None:
    crafted = tmp_path / "crafted.pt"
    torch.save({"layer": _Calls(DynamicConv2d, 0, 8, 3)}, crafted)
    out = _python(f"""
        import importlib.util
        import torch
        before = set(torch.serialization.get_safe_globals())
        import dynconv
        assert set(torch.serialization.get_safe_globals()) == before, "import dynconv"
        if importlib.util.find_spec("ultralytics"):
            import dynconv.integrations.ultralytics
            assert set(torch.serialization.get_safe_globals()) == before, "the integration"
        try:
            torch.load({str(crafted)!r}, weights_only=True)
        except Exception as error:
            print(str(error).replace(chr(10), " "))
    """)
    assert "Unsupported global: GLOBAL dynconv.layers.dynamic.DynamicConv2d" in out
    assert "in_channels" not in out  # the constructor was not called


def test_safe_load_globals_allows_them_inside_the_block_only(tmp_path: Path) -> None:
    path = tmp_path / "crafted.pt"
    torch.save({"layer": _Calls(DynamicConv2d, 2, 8, 3)}, path)
    before = set(torch.serialization.get_safe_globals())
    with dynconv.safe_load_globals():
        with dynconv.safe_load_globals():  # nested: still allowed after the inner block
            pass
        assert isinstance(torch.load(path, weights_only=True)["layer"], DynamicConv2d)
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(CheckpointError, match=r"DynamicConv2d .*safe_load_globals"):
        load_file(path)
    # a class the user allowed before the block stays allowed after it, and so do the classes
    # allowed by the global opt-in inside a block
    torch.serialization.add_safe_globals([DynamicConv2d])
    try:
        with dynconv.safe_load_globals():
            pass
        assert DynamicConv2d in torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        with dynconv.safe_load_globals():
            dynconv.allow_weights_only_load()
        assert isinstance(torch.load(path, weights_only=True)["layer"], DynamicConv2d)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(list(before))
