"""Dataset loaders on tiny generated files in the real layouts, batches and augmentation."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynconv.training.data import Augmentation, augment, batch_indices, seeded_generator
from dynconv.training.safe_pickle import UnsafePickleError, load_data_pickle
from dynconv.training.sources import load_dataset, load_digits


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
    make_image_folder(tmp_path / "mixed", {"a": 1}, size=(8, 8))
    make_image_folder(tmp_path / "mixed", {"b": 1}, size=(9, 8))
    with pytest.raises(ValueError, match=r"different sizes.*--image-size"):
        load_dataset(str(tmp_path / "mixed"))
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "b").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
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
