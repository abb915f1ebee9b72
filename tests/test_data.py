"""Dataset loaders on tiny generated files in the real layouts, batches and augmentation; the
fixed, stratified subsets and validation splits that --train-images and --eval-on val make."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynconv.cli import main
from dynconv.training import TrainConfig, train
from dynconv.training.data import (
    Augmentation,
    ImageSet,
    augment,
    batch_indices,
    seeded_generator,
    stratified_split,
    stratified_subset,
)
from dynconv.training.safe_pickle import UnsafePickleError, load_data_pickle
from dynconv.training.sources import load_dataset, load_digits, read_rgb_image


def python2_pickle(obj: object) -> bytes:
    """``obj`` as Python 2's cPickle (protocol 2) with numpy 1.x wrote the real CIFAR files:
    str (bytes here) as SHORT_BINSTRING/BINSTRING, ints as BININT, uint8 arrays rebuilt by
    ``numpy.core.multiarray._reconstruct`` from a raw-bytes state."""
    out = [b"\x80\x02"]

    def put(o: object) -> None:
        if isinstance(o, dict):
            out.append(b"}(")  # EMPTY_DICT MARK ... SETITEMS
            for key, value in o.items():
                put(key)
                put(value)
            out.append(b"u")
        elif isinstance(o, list):
            out.append(b"](")  # EMPTY_LIST MARK ... APPENDS
            for value in o:
                put(value)
            out.append(b"e")
        elif isinstance(o, int):
            out.append(b"J" + struct.pack("<i", o))
        elif isinstance(o, bytes):
            out.append(b"U" + bytes([len(o)]) + o if len(o) < 256
                       else b"T" + struct.pack("<I", len(o)) + o)
        elif isinstance(o, np.ndarray) and o.dtype == np.uint8:
            # _reconstruct(ndarray, (0,), 'b'), then BUILD with
            # (1, shape, dtype('u1') with its state, fortran=False, raw bytes)
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            put(b"b")
            out.append(b"\x87R(K\x01(")
            for size in o.shape:
                put(size)
            out.append(b"tcnumpy\ndtype\n")
            put(b"u1")
            out.append(b"K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            put(np.ascontiguousarray(o).tobytes())
            out.append(b"tb")
        else:
            raise TypeError(f"python2_pickle does not write {type(o).__name__}")

    put(obj)
    return b"".join([*out, b"."])


def _write_pickle(path: Path, content: dict) -> None:
    path.write_bytes(python2_pickle(content))


def make_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    """A CIFAR-10 folder (byte keys, as the real files): returns the first batch's data."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        first = first or (data, labels)
        _write_pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels,
                                      b"data": data, b"filenames": [b"x.png"] * per_batch})
    _write_pickle(folder / "batches.meta", {
        b"label_names": [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer",
                                               "dog", "frog", "horse", "ship", "truck"]],
        b"num_vis": 3072, b"num_cases_per_batch": per_batch})
    return first


def make_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", 6), ("test", 3)):
        _write_pickle(folder / name, {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(x) for x in rng.integers(0, 100, n)],
            b"coarse_labels": [int(x) for x in rng.integers(0, 20, n)]})
    _write_pickle(folder / "meta", {
        b"fine_label_names": [f"class{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})


def make_image_folder(root: Path, classes: dict[str, int], size=(12, 10), mode="RGB") -> None:
    rng = np.random.default_rng(2)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            channels = 3 if mode == "RGB" else 1
            pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
            image.save(root / name / f"{i}.png")


def test_digits_is_the_real_embedded_dataset() -> None:
    data = load_digits()
    assert (len(data.train), len(data.test)) == (1437, 360)
    assert data.train.images.shape[1:] == (1, 8, 8) and data.train.images.dtype == torch.uint8
    assert data.num_classes == 10 and data.in_channels == 1
    # stratified: every class is in both splits in its share
    assert data.test.labels.bincount().min() >= 35 and data.train.labels.bincount().min() >= 139
    # 17 grey levels (0..16 in scikit-learn) stored exactly
    assert len(data.train.images.unique()) == 17
    # the split never depends on anything: the same images every time
    again = load_digits()
    assert torch.equal(again.test.images, data.test.images)
    assert not data.augmentation.flip


def test_cifar10_pickle_folder(tmp_path: Path) -> None:
    data_0, labels_0 = make_cifar10(tmp_path)
    for source in (str(tmp_path), str(tmp_path / "cifar-10-batches-py"),
                   "cifar10:" + str(tmp_path)):
        data = load_dataset(source)
        assert data.name == "CIFAR-10"
        assert (len(data.train), len(data.test)) == (20, 4)
        assert data.train.images.shape[1:] == (3, 32, 32)
        assert data.classes[0] == "airplane" and data.num_classes == 10
        # row-major [3072] = R plane, G plane, B plane of 32 x 32
        assert torch.equal(data.train.images[0], torch.from_numpy(data_0[0]).view(3, 32, 32))
        assert data.train.labels[:4].tolist() == labels_0
        assert data.augmentation == Augmentation(crop_padding=4, flip=True)


def test_cifar100_pickle_folder(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    data = load_dataset(str(tmp_path))
    assert data.name == "CIFAR-100" and data.num_classes == 100
    assert (len(data.train), len(data.test)) == (6, 3)
    assert data.classes[5] == "class5"
    with pytest.raises(ValueError, match="does not hold CIFAR10"):
        load_dataset("cifar10:" + str(tmp_path))


def test_cifar_files_of_every_pickle_protocol_load(tmp_path: Path) -> None:
    # the real files are Python 2 pickles (make_cifar10); a batch pickled again by Python 3 with
    # numpy 2 at any protocol (arrays, numpy scalars as labels) loads the same
    data_0, labels_0 = make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        batch = {b"data": data_0, b"labels": [np.int64(x) for x in labels_0]}
        (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
        data = load_dataset(str(tmp_path))
        assert torch.equal(data.train.images[:4].flatten(1), torch.from_numpy(data_0))
        assert data.train.labels[:4].tolist() == labels_0


def test_numpy_pickles_round_trip_through_the_data_unpickler() -> None:
    values = [np.arange(6, dtype=np.uint8).reshape(2, 3), np.asfortranarray(np.eye(3)),
              np.zeros(3, ">u2"), np.ones(2, dtype=[("a", "u1"), ("b", "f4")]),
              np.array([b"a", 1], dtype=object), np.float32(0.5), np.arange(8)[::2],
              {"k": [1, 2.5, "s", b"b", (3,)]}]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for value in values:
            pickled = pickle.dumps(value, protocol)
            loaded = load_data_pickle(io.BytesIO(pickled), "x")
            expected = pickle.loads(pickled, encoding="bytes")  # what a plain load gives
            assert type(loaded) is type(expected)
            if isinstance(value, np.ndarray):
                assert loaded.dtype == expected.dtype and np.array_equal(loaded, value)
            else:
                assert loaded == expected == value


class _Payload:
    """Pickles as ``callable(*args)``: what a hostile file runs on a plain ``pickle.load``."""

    def __init__(self, callable_, *args) -> None:
        self.call = (callable_, args)

    def __reduce__(self):
        return self.call


def _hostile_batches(marker: Path) -> dict[str, bytes]:
    """Pickled CIFAR batches whose loading would write ``marker``, each by another route."""
    code = f"open({str(marker)!r}, 'w').write('ran')"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    return {
        "builtins.exec": pickle.dumps({**batch, b"x": _Payload(exec, code)}),
        "builtins.eval": pickle.dumps({**batch, b"labels": _Payload(eval, f"[0, {code}][:1]")}),
        "posix.system": pickle.dumps(
            {**batch, b"x": _Payload(os.system, f"printf ran > {marker}")}),
        "pathlib.Path.write_text": pickle.dumps(
            {**batch, b"x": _Payload(Path.write_text, marker, "ran")}),
        # Python 2's name of builtins, as an old hostile file would spell it
        "__builtin__.eval": pickle.dumps({**batch, b"x": _Payload(eval, code)}, protocol=2)
        .replace(b"cbuiltins\neval", b"c__builtin__\neval"),
    }


@pytest.mark.parametrize("route", ["builtins.exec", "builtins.eval", "posix.system",
                                   "pathlib.Path.write_text", "__builtin__.eval"])
def test_a_hostile_cifar_batch_is_refused_without_running(tmp_path: Path, route: str) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "marker"
    hostile = _hostile_batches(marker)[route]
    # the payload is live: a plain pickle.load runs it
    pickle.loads(hostile)
    assert marker.read_text() == "ran"
    marker.unlink()
    file = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    file.write_bytes(hostile)
    expected = (rf"CIFAR file '{re.escape(str(file))}' is not a plain data pickle: it names the "
                rf"global {re.escape(route)}, which could run code, and was refused")
    with pytest.raises(UnsafePickleError, match=expected):
        load_dataset(str(tmp_path))
    assert not marker.exists()


def test_the_data_unpickler_allows_no_other_codec_and_no_persistent_id() -> None:
    # _codecs.encode is allowed for the latin-1 bytes of protocols 0-2 only
    rot13 = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(rot13) == "n"
    with pytest.raises(UnsafePickleError, match=r"x\.pkl is not a plain data pickle: it "
                                                r"calls _codecs\.encode with 'rot13'"):
        load_data_pickle(io.BytesIO(rot13), "x.pkl")
    with pytest.raises(UnsafePickleError, match="persistent reference"):
        load_data_pickle(io.BytesIO(b"\x80\x02X\x01\x00\x00\x00aQ."), "x.pkl")
    with pytest.raises(ValueError, match=r"cannot read x.pkl: not a complete data pickle"):
        load_data_pickle(io.BytesIO(pickle.dumps(np.zeros(3))[:-5]), "x.pkl")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"data": np.zeros((4, 3072), np.float32) + 0.5, b"labels": [0] * 4},
         r"'data' must be bytes 0-255 of shape \[N, 3072\] \(uint8, as the real files hold\), "
         r"found ndarray of float32 \[4, 3072\] with values 0.5 to 0.5"),
        ({b"data": np.full((4, 3072), 299, np.int64), b"labels": [0] * 4},
         r"found ndarray of int64 \[4, 3072\] with values 299 to 299"),
        ({b"data": np.zeros((4, 3, 32, 32), np.uint8), b"labels": [0] * 4},
         r"found ndarray of uint8 \[4, 3, 32, 32\]"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3},
         r"'labels' must be 4 integer labels, one per image, found list of int64 \[3\]"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0.5] * 4},
         r"'labels' must be 4 integer labels.*float64"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]},
         r"'labels' must lie in 0..9, found 0 to 10"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0] * 4},
         r"lacks \['labels'\]; it holds the keys \['data', 'fine_labels'\]"),
        ([np.zeros((4, 3072), np.uint8)], r"is not a CIFAR batch: expected a pickled dict, found "
                                          r"list"),
    ],
)
def test_cifar_data_that_is_not_bytes_is_refused(tmp_path: Path, batch, message) -> None:
    make_cifar10(tmp_path)
    file = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    file.write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=rf"CIFAR file '{re.escape(str(file))}'.*{message}"):
        load_dataset(str(tmp_path))


def test_cifar_meta_files_must_name_every_class(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    meta = tmp_path / "cifar-100-python" / "meta"
    meta.write_bytes(python2_pickle({b"fine_label_names": [b"a", b"b"]}))
    expected = (rf"CIFAR file '{re.escape(str(meta))}': 'fine_label_names' must list 100 class "
                r"names, found list of \S+ \[2\]")
    with pytest.raises(ValueError, match=expected):
        load_dataset(str(tmp_path))
    meta.unlink()  # without a meta file, the classes are numbered
    assert load_dataset(str(tmp_path)).classes[:3] == ["0", "1", "2"]


def test_image_folder_with_train_and_test(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    make_image_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    data = load_dataset(str(tmp_path))
    assert data.classes == ["cat", "dog"]
    assert (len(data.train), len(data.test)) == (5, 2)
    assert data.train.images.shape[1:] == (3, 10, 12)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1]
    first = np.array(Image.open(tmp_path / "train" / "cat" / "0.png"))
    assert torch.equal(data.train.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_image_folder_without_split_holds_out_a_fixed_fifth(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 10, "b": 5, "c": 2}, mode="L")
    data = load_dataset("folder:" + str(tmp_path), image_size=6)
    assert data.test.labels.bincount().tolist() == [2, 1, 1]
    assert data.train.labels.bincount().tolist() == [8, 4, 1]
    assert data.train.images.shape[1:] == (3, 6, 6)  # grey converted to RGB, resized
    again = load_dataset(str(tmp_path), image_size=6)
    assert torch.equal(again.test.images, data.test.images)


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset folder '.*nowhere' does not exist; --data"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not an ImageFolder-style folder.*found 0"):
        load_dataset(str(tmp_path / "empty"))
    make_image_folder(tmp_path / "mixed", {"a": 2}, size=(8, 8))
    make_image_folder(tmp_path / "mixed", {"b": 2}, size=(9, 8))
    with pytest.raises(ValueError, match=r"different sizes.*--image-size"):
        load_dataset(str(tmp_path / "mixed"))
    make_image_folder(tmp_path / "bad", {"a": 2, "b": 2})
    (tmp_path / "bad" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*0\.png'"):
        load_dataset(str(tmp_path / "bad"))
    folder = tmp_path / "broken" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read CIFAR file"):
        load_dataset(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match="image_size applies to ImageFolder data only"):
        load_dataset("digits", image_size=32)
    with pytest.raises(TypeError, match="non-empty str"):
        load_dataset(None)


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of ``pixels`` [H, W, 3] (Pillow reads these, but cannot write them)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putpixel((1, 0), 1)
    if transparent:  # per-entry alpha: half-transparent red, transparent green
        image.info["transparency"] = bytes([128, 0])
    return image


def _write_image(path: Path, kind: str) -> Path:
    """One image of each kind a folder may hold, a row of pixels whose 8-bit RGB is known."""
    row = lambda values, dtype: np.array([values], dtype)  # noqa: E731
    file = path / f"{kind.replace(';', '_')}.{'tif' if kind in _TIFF else 'png'}"
    if kind == "RGB":
        Image.fromarray(row([[10, 20, 30], [200, 100, 0]], np.uint8)).save(file)
    elif kind == "L":
        Image.fromarray(row([0, 77, 255], np.uint8)).save(file)
    elif kind == "1":
        Image.fromarray(row([False, True], bool)).save(file)
    elif kind in ("P", "P+transparency"):
        _palette_image(kind != "P").save(file)
    elif kind == "RGBA":
        Image.fromarray(row([[10, 20, 30, 0], [40, 50, 60, 255]], np.uint8)).save(file)
    elif kind == "LA":
        Image.fromarray(row([[100, 0], [7, 255]], np.uint8), "LA").save(file)
    elif kind == "CMYK":
        Image.frombytes("CMYK", (3, 1), bytes([0, 255, 0, 0, 0, 0, 0, 255, 0, 0, 0, 0])).save(file)
    elif kind in ("I;16", "I;16B"):
        dtype = "<u2" if kind == "I;16" else ">u2"
        Image.fromarray(row([0, 32896, 65535, 1000, 255], dtype)).save(file)
    elif kind == "I":
        Image.fromarray(row([0, 2**23, 2**31 - 1, 5 * 2**23], np.int32)).save(file)
    elif kind == "F":
        Image.fromarray(row([0, 0.5, 1, 0.25], np.float32)).save(file)
    elif kind == "PGM 12-bit":
        file = path / "grey12.pgm"
        file.write_bytes(b"P5\n3 1\n4095\n" + np.array([0, 4095, 2048], ">u2").tobytes())
    elif kind == "RGB 16-bit":
        file.write_bytes(_png_rgb16(row([[0, 32896, 65535], [65535, 255, 256]], np.uint16)))
    return file


_TIFF = ("CMYK", "I;16B", "I", "F")
_GREY = lambda *values: [[v, v, v] for v in values]  # noqa: E731


@pytest.mark.parametrize(
    ("kind", "mode", "expected"),
    [
        ("RGB", "RGB", [[10, 20, 30], [200, 100, 0]]),
        ("L", "L", _GREY(0, 77, 255)),
        ("1", "1", _GREY(0, 255)),
        ("P", "P", [[255, 0, 0], [0, 255, 0]]),
        # alpha dropped: the colour channels as stored, as torchvision's ImageFolder reads them
        ("P+transparency", "P", [[255, 0, 0], [0, 255, 0]]),
        ("RGBA", "RGBA", [[10, 20, 30], [40, 50, 60]]),
        ("LA", "LA", _GREY(100, 7)),
        ("CMYK", "CMYK", [[255, 0, 255], [0, 0, 0], [255, 255, 255]]),
        # by the bit depth: the top 8 of 16 bits (convert('RGB') makes all but 0 white)
        ("I;16", "I;16", _GREY(0, 128, 255, 3, 0)),
        ("I;16B", "I;16B", _GREY(0, 128, 255, 3, 0)),
        ("I", "I", _GREY(0, 1, 255, 5)),  # int32: the top 8 of 31 value bits
        ("F", "F", _GREY(0, 127, 255, 63)),  # 0-1, torchvision's v * 255.999
        ("PGM 12-bit", "I", _GREY(0, 255, 128)),  # Pillow scales 0-4095 to 16 bits
        ("RGB 16-bit", "RGB", [[0, 128, 255], [255, 0, 1]]),  # Pillow's own top 8 bits
    ],
)
def test_every_image_mode_trains_as_the_file_holds_it(tmp_path: Path, kind, mode,
                                                      expected) -> None:
    file = _write_image(tmp_path, kind)
    with Image.open(file) as image:
        assert image.mode == mode  # the mode the case is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's warning on a palette's transparency
        rgb = read_rgb_image(file)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb).reshape(-1, 3).tolist() == expected


def test_a_folder_of_16_bit_images_trains_on_their_values(tmp_path: Path) -> None:
    for name, value in (("dark", 4096), ("bright", 61440)):
        (tmp_path / name).mkdir()
        for i in range(2):
            pixels = np.full((4, 4), value + i, np.uint16)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = load_dataset(str(tmp_path))
    images = torch.cat([data.train.images, data.test.images])
    labels = torch.cat([data.train.labels, data.test.labels])
    assert data.classes == ["bright", "dark"]
    assert set(images[labels == 0].unique().tolist()) == {240}
    assert set(images[labels == 1].unique().tolist()) == {16}


@pytest.mark.parametrize(
    ("values", "dtype", "message"),
    [
        ([0, 2, 0.5], np.float32, "is a floating-point image with values 0 to 2; float images "
                                  "must hold 0-1"),
        ([0, float("nan")], np.float32, r"is a floating-point image with non-finite values \(NaN"),
        ([-5, 3], np.int32, r"stores 31-bit samples \(mode I, I;32S\) but holds values -5 to 3"),
    ],
)
def test_image_values_the_mode_cannot_hold_are_refused(tmp_path: Path, values, dtype,
                                                       message) -> None:
    file = tmp_path / "odd.tif"
    Image.fromarray(np.array([values], dtype)).save(file)
    with pytest.raises(ValueError, match=rf"image '{re.escape(str(file))}' {message}"):
        read_rgb_image(file)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_truncated_or_unreadable_image_is_named(tmp_path: Path, suffix: str) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 2}, size=(40, 30))
    good = tmp_path / "b" / "1.png"
    file = tmp_path / "b" / f"1{suffix}"
    Image.open(good).save(file)
    good.unlink() if file != good else None
    content = file.read_bytes()
    for broken in (content[: len(content) // 2], content[:20], b"", b"text, not an image"):
        file.write_bytes(broken)
        with pytest.raises(ValueError, match=rf"^cannot read image '{re.escape(str(file))}': "):
            load_dataset(str(tmp_path))


def test_a_class_folder_without_images_is_refused(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "emu").mkdir()
    (tmp_path / "owl").mkdir()
    (tmp_path / "owl" / "notes.txt").write_text("no image here")
    expected = (r"found no image \(\.png, .*\) in the class folders "
                rf"'{re.escape(str(tmp_path / 'emu'))}' \(empty\), "
                rf"'{re.escape(str(tmp_path / 'owl'))}' \(holds only notes\.txt\); every class "
                "folder needs at least one image, as in torchvision's ImageFolder")
    with pytest.raises(ValueError, match=expected):
        load_dataset(str(tmp_path))
    # the same in the train/ and test/ layout, in either split
    make_image_folder(tmp_path / "split" / "train", {"cat": 1, "dog": 1})
    make_image_folder(tmp_path / "split" / "test", {"cat": 1, "dog": 1})
    assert load_dataset(str(tmp_path / "split")).classes == ["cat", "dog"]
    (tmp_path / "split" / "train" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"no image .* in the class folder '.*train/emu' \(empty"):
        load_dataset(str(tmp_path / "split"))
    (tmp_path / "split" / "train" / "emu").rmdir()
    (tmp_path / "split" / "test" / "dog" / "0.png").unlink()
    with pytest.raises(ValueError, match=r"no image .* in the class folder '.*test/dog' \(empty"):
        load_dataset(str(tmp_path / "split"))


def test_a_folder_without_class_folders_says_what_it_holds(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "0.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "1.png")
    with pytest.raises(ValueError, match=r"not an ImageFolder-style folder: expected one "
                                         r"sub-folder of images per class \(at least 2\), found "
                                         r"0 and 2 images directly in it \(put each class's"):
        load_dataset(str(tmp_path))
    make_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"found 1 \(a train/ folder, but no test/ or val/"):
        load_dataset(str(tmp_path))
    make_image_folder(tmp_path / "one", {"a": 2, "b": 1})
    with pytest.raises(ValueError, match=r"the class folder '.*one/b' has 1 image; each class "
                                         "needs at least 2"):
        load_dataset(str(tmp_path / "one"))


def test_batches_are_seeded_per_epoch_and_shard_the_global_batch() -> None:
    a = batch_indices(103, 10, seed=3, epoch=2)
    assert len(a) == 10  # the incomplete last batch is dropped
    assert torch.equal(torch.cat(a), torch.cat(batch_indices(103, 10, seed=3, epoch=2)))
    assert not torch.equal(torch.cat(a), torch.cat(batch_indices(103, 10, seed=3, epoch=3)))
    assert not torch.equal(torch.cat(a), torch.cat(batch_indices(103, 10, seed=4, epoch=2)))
    assert len(set(torch.cat(a).tolist())) == 100
    shards = [batch_indices(103, 10, 3, 2, rank=r, world_size=2) for r in range(2)]
    for batch, first, second in zip(a, *shards):
        assert torch.equal(torch.cat([first, second]), batch)


def test_augment_crops_and_flips() -> None:
    images = torch.arange(2 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5).repeat(50, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    flipped = augment(images, Augmentation(flip=True), g)
    is_flipped = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(is_flipped, flipped, images))
    assert 20 < sum(is_flipped) < 80
    cropped = augment(images, Augmentation(crop_padding=1), g)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for out, pad in zip(cropped, padded):  # every crop is a 5x5 window of the padded image
        windows = pad.unfold(1, 5, 1).unfold(2, 5, 1).reshape(1, 9, 5, 5).transpose(0, 1)
        assert any(torch.equal(out, w) for w in windows)
    assert not torch.equal(cropped, images)
    again = augment(images, Augmentation(crop_padding=1), torch.Generator().manual_seed(0))
    assert not torch.equal(again, cropped)  # the generator state moved on


def test_a_share_of_a_batch_is_augmented_as_in_the_whole_batch() -> None:
    images = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    both = Augmentation(crop_padding=2, flip=True)
    whole = augment(images, both, seeded_generator(1, 2, 3))
    halves = [augment(images[i : i + 4], both, seeded_generator(1, 2, 3), start=i, total=8)
              for i in (0, 4)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(whole, augment(images, both, seeded_generator(1, 2, 4)))
    with pytest.raises(ValueError, match="not within a batch of 8"):
        augment(images[:4], both, seeded_generator(0), start=6, total=8)


# -- subsets and validation splits ---------------------------------------------------------------


def _numbered(counts: list[int]) -> ImageSet:
    """Images that hold their own index (two bytes), labels shuffled with ``counts`` of each."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    index = torch.arange(len(labels))
    images = torch.stack([index // 256, index % 256], 1).to(torch.uint8).view(-1, 1, 1, 2)
    return ImageSet(images, labels)


def _indices(data: ImageSet) -> list[int]:
    return (data.images.view(-1, 2).long() @ torch.tensor([256, 1])).tolist()


def test_a_stratified_subset_keeps_every_class_share_and_is_fixed() -> None:
    counts = [50, 30, 15, 4, 1]
    data = _numbered(counts)
    for n in (5, 20, 37, 99, 100):
        subset = stratified_subset(data, n)
        taken = _indices(subset)
        assert len(taken) == n and taken == sorted(set(taken))  # distinct, in their order
        assert torch.equal(subset.labels, data.labels[taken])
        shares = torch.bincount(subset.labels, minlength=5).tolist()
        # one of each class, the rest in proportion to what each class has beyond its first
        exact = [1 + (n - 5) * (c - 1) / 95 for c in counts]
        assert min(shares) >= 1 and all(abs(a - b) < 1 for a, b in zip(shares, exact))
        assert _indices(stratified_subset(data, n)) == taken
    assert _indices(stratified_subset(data, 20, seed=1)) != _indices(stratified_subset(data, 20))
    for n in (4, 101):
        with pytest.raises(ValueError, match=f"a stratified subset takes 5 to 100 images "
                                             rf"\(at least one of each class\), got {n}"):
            stratified_subset(data, n)


def test_a_stratified_split_holds_out_a_fifth_of_every_class() -> None:
    data = _numbered([10, 5, 2, 1])
    kept, held = stratified_split(data)
    assert torch.bincount(held.labels, minlength=4).tolist() == [2, 1, 1, 0]  # never the last
    assert torch.bincount(kept.labels, minlength=4).tolist() == [8, 4, 1, 1]
    assert sorted(_indices(kept) + _indices(held)) == list(range(18))
    assert _indices(stratified_split(data)[1]) == _indices(held)


def test_eval_on_val_holds_out_a_fixed_fifth_of_the_training_images() -> None:
    digits = load_digits()
    assert digits.prepared() is digits and digits.val is None
    val = digits.prepared(eval_on="val")
    kept, held = stratified_split(digits.train)
    assert torch.equal(val.train.images, kept.images) and torch.equal(val.test.images,
                                                                      held.images)
    assert (len(val.train), len(val.test)) == (1150, 287)
    assert val.describe() == ("digits: 1,150 train / 287 validation images (a fixed, stratified "
                              "20% of the training images), 1x8x8, 10 classes")
    # normalised by the statistics of the images it trains on
    assert torch.allclose(val.mean, kept.images.double().div(255).mean().float().view(1))
    assert val.prepared(eval_on="val") is val
    with pytest.raises(ValueError, match=r"already prepared \(evaluated on its validation "):
        val.prepared(100, "val")
    with pytest.raises(ValueError, match=r"eval_on must be one of \('test', 'val'\), got 'tra"):
        digits.prepared(eval_on="train")


def test_train_images_is_fixed_stratified_and_the_same_for_every_seed_and_type(
    tmp_path: Path, capsys
) -> None:
    runs = [train(TrainConfig(data="digits", train_images=100, conv_type=conv_type, seed=seed,
                              epochs=1, batch_size=25, model_args={"width": 4}, threads=1,
                              quiet=True, out=str(tmp_path / f"{conv_type}-{seed}")))
            for conv_type, seed in (("static", 0), ("static", 1), ("dynamic", 2))]
    expected = stratified_subset(load_digits().train, 100)
    for run in runs:
        assert torch.equal(run.dataset.train.images, expected.images)
        assert torch.equal(run.dataset.train.labels, expected.labels)
        assert run.dataset.describe() == ("digits: 100 train (a fixed, stratified subset of "
                                          "1,437) / 360 test images, 1x8x8, 10 classes")
    assert torch.bincount(expected.labels).tolist() == [10] * 10  # the digits are balanced
    out = tmp_path / "static-0"
    assert '"train_images": 100' in (out / "config.json").read_text()
    # resumed with the stored subset; another is another run
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--train-images", "200"]) == 2
    assert "train_images: checkpoint 100, now 200" in capsys.readouterr().err


def test_train_and_compare_evaluate_on_the_validation_split(tmp_path: Path, capsys) -> None:
    quick = ["--data", "digits", "--eval-on", "val", "--epochs", "1", "--batch-size", "50",
             "--model-arg", "width=4", "--quiet"]
    assert main(["train", *quick, "--out", str(tmp_path / "train")]) == 0
    assert "final validation accuracy" in capsys.readouterr().out
    assert '"eval_on": "val"' in (tmp_path / "train" / "config.json").read_text()
    assert main(["compare", *quick, "--train-images", "300", "--conv-types", "static",
                 "--seeds", "0", "--out", str(tmp_path / "compare")]) == 0
    assert ("data: digits: 300 train (a fixed, stratified subset of 1,150) / 287 validation "
            "images") in capsys.readouterr().out
    run = train(TrainConfig(data="digits", eval_on="val", epochs=1, batch_size=50,
                            model_args={"width": 4}, threads=1, quiet=True,
                            out=str(tmp_path / "api")))
    assert torch.equal(run.dataset.test.images, stratified_split(load_digits().train)[1].images)
