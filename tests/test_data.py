"""Dataset loaders on tiny generated files in the real layouts, batches and augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynconv.training.data import Augmentation, augment, batch_indices, seeded_generator
from dynconv.training.sources import load_dataset, load_digits


def _write_pickle(path: Path, content: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(content, f)


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
