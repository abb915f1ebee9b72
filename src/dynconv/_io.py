"""Small shared helpers for writing files: atomic writes and PNG figures."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_png", "write_atomically"]

#: Resolution of every figure the package writes.
DPI = 110


def write_atomically(path: str | Path, write: Any, *,
                     verify: Callable[[Path], Any] | None = None,
                     previous: str | Path | None = None) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: a reader sees the old file or the new one, never a partial one.

    ``verify(temporary_path)`` runs on the written file before the rename; if it raises, ``path``
    is left as it was. With ``previous``, the old ``path`` is kept there (replacing what
    ``previous`` held) instead of being overwritten; ``path`` exists throughout.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give the usual mode
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if verify is not None:
            verify(Path(temporary))
        if previous is not None and path.exists():
            _keep_as(path, Path(previous))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def _keep_as(path: Path, previous: Path) -> None:
    """Give ``path``'s file the second name ``previous`` (a hard link put in place with a rename,
    so that ``path`` never disappears), or rename it there where links are not supported."""
    link = previous.with_name(f".{previous.name}.{os.getpid()}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    os.replace(link, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(figure: Figure, path: str | Path) -> None:
    """Lay ``figure`` out tightly and write it as a PNG to ``path``, atomically."""
    figure.tight_layout()
    write_atomically(Path(path), lambda f: figure.savefig(f, format="png", dpi=DPI))
