"""Where the data of a training run comes from (:func:`load_dataset`).

* ``'digits'``, the default: scikit-learn's handwritten digits (1,797 grey 8x8 images, 10
  classes), shipped inside the scikit-learn wheel, so nothing is downloaded.
* CIFAR-10 and CIFAR-100 in their python-pickle layout (``cifar-10-batches-py/data_batch_1``...,
  ``cifar-100-python/train``...) from a local folder.
* Any ImageFolder-style folder: ``root/<class>/<image>``, or ``root/train/<class>/...`` with
  ``root/test/`` (or ``root/val/``) beside it.

Each loader returns a :class:`~dynconv.training.data.Dataset` of uint8 images held in memory,
with a fixed train/test split (the same for every seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import Augmentation, Dataset, ImageSet
from .safe_pickle import load_data_pickle

__all__ = [
    "HOLDOUT_FRACTION",
    "IMAGE_EXTENSIONS",
    "SPLIT_SEED",
    "dataset_sources",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_image_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# A folder without train/ and test/ is split with this fraction held out for testing.
HOLDOUT_FRACTION = 0.2
# Fixed seed of every train/test split made here: the test set never depends on --seed.
SPLIT_SEED = 0


def dataset_sources() -> str:
    """What ``--data`` accepts, for help texts and errors."""
    return (
        "'digits' (scikit-learn's handwritten digits, shipped with the package: no download), "
        "a CIFAR-10 or CIFAR-100 python-pickle folder (e.g. cifar-10-batches-py/, or its parent), "
        "or an ImageFolder-style folder (<class>/<image>, optionally under train/ and test/); a "
        "folder may be prefixed with 'cifar10:', 'cifar100:' or 'folder:' to skip detection"
    )


def load_dataset(source: str, image_size: int | None = None) -> Dataset:
    """Load ``source``: ``'digits'``, a CIFAR folder or an ImageFolder folder (see the module).

    ``image_size`` resizes the images of an ImageFolder folder (shorter side, then a centre
    crop); the other sources keep their size.
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"the data source must be a non-empty str, got {source!r}")
    kind, _, rest = source.partition(":")
    if kind in ("cifar10", "cifar100", "folder") and rest:
        path = _existing_folder(rest)
        if kind == "folder":
            return load_image_folder(path, image_size)
        found = _find_cifar(path)
        if found is None or found[0] != kind:
            raise ValueError(
                f"{path} does not hold {kind.upper()} in its python-pickle layout (expected "
                + ("data_batch_1..5 and test_batch" if kind == "cifar10" else "train and test")
                + " files, or a cifar-10-batches-py / cifar-100-python folder)"
            )
        return load_cifar(found[1], image_size)
    if source == "digits":
        _refuse_resize("digits", image_size)
        return load_digits()
    path = _existing_folder(source)
    found = _find_cifar(path)
    if found is not None:
        return load_cifar(found[1], image_size)
    return load_image_folder(path, image_size)


def _existing_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"dataset folder {str(path)!r} does not exist; --data takes "
                         f"{dataset_sources()}")
    if not path.is_dir():
        raise ValueError(f"--data must name a folder or 'digits', got the file {str(path)!r}")
    return path


def _refuse_resize(name: str, image_size: int | None) -> None:
    if image_size is not None:
        raise ValueError(f"image_size applies to ImageFolder data only; {name} keeps its size")


def load_digits() -> Dataset:
    """scikit-learn's handwritten digits: 1,437 train / 360 test grey 8x8 images, 10 classes.

    The split is stratified and fixed (the same for every seed). Pixel values 0-16 are stored as
    uint8 0-255 (exactly, one level every 255/16).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=HOLDOUT_FRACTION, stratify=bunch.target,
        random_state=SPLIT_SEED,
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return Dataset(
        "digits",
        ImageSet(images[train_idx], labels[train_idx]),
        ImageSet(images[test_idx], labels[test_idx]),
        [str(d) for d in range(10)],
        # digits are not mirror-symmetric; one pixel of shift is an eighth of the image
        Augmentation(crop_padding=1, flip=False),
    )


# -- CIFAR ---------------------------------------------------------------------------------------

_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _find_cifar(path: Path) -> tuple[str, Path] | None:
    """('cifar10' | 'cifar100', folder of the pickle files) if ``path`` holds CIFAR."""
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return "cifar10", folder
        if (folder / "train").is_file() and (folder / "test").is_file():
            return "cifar100", folder
    return None


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle's dict, its keys as str, read as data only (:mod:`.safe_pickle`)."""
    if not path.is_file():
        raise ValueError(f"missing CIFAR file {str(path)!r}")
    name = f"CIFAR file {str(path)!r}"
    try:
        with path.open("rb") as f:
            content = load_data_pickle(f, name)
    except OSError as error:
        raise ValueError(f"cannot read {name}: {error.strerror or error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{name} is not a CIFAR batch: expected a pickled dict, found "
                         f"{type(content).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v
            for k, v in content.items()}


def _cifar_batch(path: Path, label_key: str) -> ImageSet:
    """One batch file: 'data' uint8 [N, 3072] (R, G, B planes of 32 x 32), labels [N]."""
    batch = _unpickle(path)
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise ValueError(f"CIFAR file {str(path)!r} lacks {missing}; it holds the keys "
                         f"{sorted(batch)} (a CIFAR-{'10' if label_key == 'labels' else '100'} "
                         f"batch holds 'data' and {label_key!r})")
    data = _integer_array(batch["data"])
    if data is None or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or (
        data.size and (data.min() < 0 or data.max() > 255)
    ):
        raise ValueError(
            f"CIFAR file {str(path)!r}: 'data' must be bytes 0-255 of shape [N, 3072] (uint8, as "
            f"the real files hold), found {_describe(batch['data'])}"
        )
    labels = _integer_array(batch[label_key])
    if labels is None or labels.shape != (data.shape[0],):
        raise ValueError(
            f"CIFAR file {str(path)!r}: {label_key!r} must be {data.shape[0]} integer labels, one "
            f"per image, found {_describe(batch[label_key])}"
        )
    images = torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32))
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)))


def _integer_array(value: object) -> np.ndarray | None:
    """``value`` as an integer numpy array (a list of ints included), or None if it is not."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return array if array.dtype.kind in "iu" else None


def _describe(value: object) -> str:
    """What a CIFAR entry holds, for errors: type, dtype, shape and value range."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return type(value).__name__
    if array.dtype.kind not in "biuf" or not array.size:
        return f"{type(value).__name__} of {array.dtype} {list(array.shape)}"
    return (f"{type(value).__name__} of {array.dtype} {list(array.shape)} with values "
            f"{array.min()} to {array.max()}")


def _cifar_set(files: list[Path], label_key: str, count: int) -> ImageSet:
    sets = [_cifar_batch(file, label_key) for file in files]
    for file, batch in zip(files, sets, strict=True):
        if len(batch) and (batch.labels.min() < 0 or batch.labels.max() >= count):
            raise ValueError(
                f"CIFAR file {str(file)!r}: {label_key!r} must lie in 0..{count - 1}, found "
                f"{batch.labels.min().item()} to {batch.labels.max().item()}"
            )
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def _names(meta_file: Path, key: str, count: int) -> list[str]:
    """The class names in the meta file; 0..count-1 if there is no meta file."""
    if not meta_file.is_file():
        return [str(i) for i in range(count)]
    names = _unpickle(meta_file).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != count or not all(
        isinstance(n, (bytes, str)) for n in names
    ):
        raise ValueError(f"CIFAR file {str(meta_file)!r}: {key!r} must list {count} class "
                         f"names, found {_describe(names)}")
    return [n.decode("latin-1") if isinstance(n, bytes) else n for n in names]


def load_cifar(folder: str | Path, image_size: int | None = None) -> Dataset:
    """CIFAR-10 (``data_batch_1``..``5``, ``test_batch``, ``batches.meta``) or CIFAR-100
    (``train``, ``test``, ``meta``, fine labels) from ``folder``, in the python-pickle layout."""
    path = _existing_folder(str(folder))
    found = _find_cifar(path)
    if found is None:
        raise ValueError(
            f"{str(path)!r} holds neither CIFAR-10 (data_batch_1..5, test_batch) nor CIFAR-100 "
            "(train, test) in the python-pickle layout"
        )
    kind, path = found
    _refuse_resize(kind, image_size)
    if kind == "cifar10":
        train = _cifar_set([path / n for n in _CIFAR10_TRAIN], "labels", 10)
        test = _cifar_set([path / "test_batch"], "labels", 10)
        names = _names(path / "batches.meta", "label_names", 10)
    else:
        train = _cifar_set([path / "train"], "fine_labels", 100)
        test = _cifar_set([path / "test"], "fine_labels", 100)
        names = _names(path / "meta", "fine_label_names", 100)
    return Dataset(kind.replace("cifar", "CIFAR-"), train, test, names,
                   Augmentation(crop_padding=4, flip=True))


# -- ImageFolder ----------------------------------------------------------------------------------


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _read_images(files: list[Path], image_size: int | None) -> Tensor:
    from PIL import Image

    arrays = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
                if image_size is not None:
                    image = _resize_and_crop(image, image_size)
                arrays.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
                              .reshape(image.height, image.width, 3))
        except (OSError, ImportError) as error:
            # ImportError: Ultralytics, once imported, patches Image.open to load an optional
            # HEIF plugin for files Pillow cannot identify, and fails when it is not installed
            raise ValueError(f"cannot read image {str(file)!r}: {error}") from None
    sizes = {tuple(a.shape[:2]) for a in arrays}
    if len(sizes) > 1:
        examples = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        raise ValueError(
            f"the images have different sizes ({examples}, ...); pass an image size (--image-size "
            "N) to resize them all to N x N"
        )
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()


def _resize_and_crop(image, size: int):
    from PIL import Image

    scale = size / min(image.width, image.height)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _folder_set(root: Path, classes: list[str], image_size: int | None) -> ImageSet:
    files, labels = [], []
    for index, name in enumerate(classes):
        folder = root / name
        found = _image_files(folder) if folder.is_dir() else []
        files += found
        labels += [index] * len(found)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    return ImageSet(_read_images(files, image_size), torch.tensor(labels, dtype=torch.int64))


def load_image_folder(folder: str | Path, image_size: int | None = None) -> Dataset:
    """An ImageFolder-style folder: one sub-folder of images per class.

    With ``train/`` and ``test/`` (or ``val/``) sub-folders, those are the splits; otherwise a
    fixed, stratified 20% of each class is held out for testing. Images are converted to RGB and,
    with ``image_size``, resized (shorter side) and centre-cropped to ``image_size`` squared; all
    are held in memory as uint8.
    """
    root = _existing_folder(str(folder))
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
    test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_root is not None:
        classes = [p.name for p in _class_folders(root / "train")]
        if not classes:
            raise ValueError(f"{str(root / 'train')!r} has no class sub-folders")
        unknown = sorted({p.name for p in _class_folders(test_root)} - set(classes))
        if unknown:
            raise ValueError(f"{str(test_root)!r} has classes missing from train/: {unknown}")
        train = _folder_set(root / "train", classes, image_size)
        test = _folder_set(test_root, classes, image_size)
    else:
        classes = [p.name for p in _class_folders(root)]
        if len(classes) < 2:
            raise ValueError(
                f"{str(root)!r} is not an ImageFolder-style folder: expected one sub-folder of "
                f"images per class (at least 2), found {len(classes)}; --data takes "
                f"{dataset_sources()}"
            )
        train, test = _split(_folder_set(root, classes, image_size))
    h, w = train.images.shape[2:]
    return Dataset(f"folder {root.name}", train, test, classes,
                   Augmentation(crop_padding=max(1, min(h, w) // 8), flip=True))


def _split(data: ImageSet) -> tuple[ImageSet, ImageSet]:
    """Hold out a fixed, stratified fraction of every class (at least one image each)."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    train_idx, test_idx = [], []
    for label in data.labels.unique().tolist():
        idx = (data.labels == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        if len(idx) < 2:
            raise ValueError(f"class {label} has {len(idx)} image; each class needs at least 2 "
                             "to hold one out for testing (or give train/ and test/ folders)")
        held = max(1, round(len(idx) * HOLDOUT_FRACTION))
        test_idx.append(idx[:held])
        train_idx.append(idx[held:])
    train, test = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return (ImageSet(data.images[train], data.labels[train]),
            ImageSet(data.images[test], data.labels[test]))
