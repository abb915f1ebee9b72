"""Read data pickles (CIFAR batches, the classic MNIST pickle) as data, never as code.

A pickle can name any Python callable and have it called while it loads: a data file that
does so would run its payload on ``pickle.load``. :func:`load_data_pickle` loads with an
unpickler that resolves only what data files hold: numpy arrays, dtypes and scalars (as numpy
1.x and 2.x, and Python 2's numpy, pickle them), and the bytes that Python 3 pickles with
protocols 0-2 as ``_codecs.encode(text, 'latin1')``. Dicts, lists, tuples, str, bytes and
numbers need no global at all. Anything else is refused, before it is called, with an
:class:`UnsafePickleError` that names the file and the global.
"""

from __future__ import annotations

import _compat_pickle
import functools
import pickle
from typing import IO, Any

__all__ = ["ALLOWED_GLOBALS", "UnsafePickleError", "load_data_pickle"]

#: The globals (module, name) a data pickle may name, after Python 2 names are mapped to
#: Python 3's (``__builtin__`` -> ``builtins``).
ALLOWED_GLOBALS = frozenset({
    # numpy arrays: protocols 0-4 (numpy 2: numpy._core, numpy 1.x and Python 2: numpy.core)
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # contiguous arrays at protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    # numpy scalars (e.g. a label stored as numpy.int64)
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    # Python 3's bytes at protocols 0-2 (checked: latin-1 only, see _latin1_encode)
    ("_codecs", "encode"),
    # the containers and strings themselves, should a pickle name them
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "str"),
    ("builtins", "bytes"),
})


class UnsafePickleError(ValueError):
    """A data pickle names a global that data files never need (it would run code on load)."""


def _latin1_encode(name: str, text: str, encoding: str = "utf-8") -> bytes:
    # what `_codecs.encode` does for the bytes that Python 3 pickles at protocols 0-2, and no
    # other codec (a codec's name is looked up and its module imported)
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"{name} is not a plain data pickle: it calls _codecs.encode with "
            f"{encoding!r:.40}; data pickles use it only to store bytes, as latin-1"
        )
    return text.encode("latin-1")


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], name: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        mapped = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if mapped not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.name} is not a plain data pickle: it names the global "
                f"{module}.{name}, which could run code, and was refused without running it "
                "(allowed: numpy arrays, dicts, lists, str, bytes and numbers)"
            )
        if mapped == ("_codecs", "encode"):
            return functools.partial(_latin1_encode, self.name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self.name} is not a plain data pickle: it holds a persistent reference "
            f"({str(pid)[:40]!r}), which data files never need"
        )


def load_data_pickle(file: IO[bytes], name: str, encoding: str = "bytes") -> Any:
    """Unpickle the data in the binary ``file`` (named ``name`` in errors, e.g. its path).

    ``encoding`` decodes Python 2 ``str`` objects (``'bytes'`` keeps them as bytes, as the CIFAR
    instructions do; ``'latin1'`` makes them str). Raises :class:`UnsafePickleError` for a pickle
    that names anything but numpy arrays, dtypes and scalars (see :data:`ALLOWED_GLOBALS`), and a
    ``ValueError`` naming ``name`` for a file that is not a whole pickle.
    """
    try:
        return _DataUnpickler(file, name, encoding).load()
    except (UnsafePickleError, MemoryError):
        raise
    except Exception as error:  # truncated, not a pickle, bad array state: all just "bad file"
        reason = str(error) or type(error).__name__
        raise ValueError(f"cannot read {name}: not a complete data pickle ({reason})") from None
