"""Read and write checkpoint files, and load checkpoints as they are published.

:func:`load_file` reads a file by what its bytes hold, whatever its name (a ``torch.save`` zip
archive or legacy pickle, or safetensors), refuses anything else, a damaged file or one whose
checksum fails with one :class:`CheckpointError` that names the file and what is wrong, and
never runs code from a pickle unless told to (``weights_only=False``). :func:`save_file` writes
what dynconv saves (run checkpoints, ``model.pt``, ``folded.pt``) atomically, with a checksum of
its tensors, read back and verified before it replaces the old file.

:func:`load_checkpoint` loads a checkpoint into a model: wrapped in a training dict, prefixed by
DistributedDataParallel or ``torch.compile``, or saved as safetensors, with a clear report of the
keys that do not fit.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .._io import write_atomically

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "LoadResult",
    "checksum",
    "load_checkpoint",
    "load_file",
    "save_file",
]

# Keys under which training scripts store the model's state_dict (official ODConv: 'state_dict';
# ConvNeXt-style scripts and Ultralytics: 'model').
WRAPPER_KEYS = ("state_dict", "model")
# Prefixes left by nn.DataParallel / DistributedDataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LISTED_KEYS = 20

#: Where :func:`save_file` keeps the checksum: in a state_dict, in the root entry of its
#: ``_metadata`` (``state_dict._metadata['']``, beside the version numbers torch keeps there, so
#: that it stays a plain state_dict for ``load_state_dict``); in any other dict, under this key.
CHECKSUM_KEY = "dynconv_checksum"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_SAFETENSORS_HEADER_LIMIT = 100 << 20  # safetensors' own limit on its JSON header


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged, not a checkpoint, refused by a
    ``weights_only`` load, fails its checksum, or does not belong to the run that reads it."""


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_checkpoint` did.

    ``missing_keys``: in the model, absent from the checkpoint; ``unexpected_keys``: in the
    checkpoint, absent from the model; ``unwrapped``: the wrapper keys followed to reach the
    state_dict (e.g. ``('state_dict',)``); ``stripped_prefixes``: the key prefixes removed (e.g.
    ``('module.',)``).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    unwrapped: tuple[str, ...] = ()
    stripped_prefixes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """True when every key of the model was loaded and nothing was left over."""
        return not self.missing_keys and not self.unexpected_keys

    def __str__(self) -> str:
        return _describe(self.missing_keys, self.unexpected_keys, "\n") or "all keys matched"


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> LoadResult:
    """Load a checkpoint into ``model`` and report what did not fit.

    Args:
        model: any ``nn.Module`` (a single layer or a whole network).
        checkpoint: a path (read by :func:`load_file`: a ``torch.save`` file, or safetensors when
            the ``safetensors`` package is installed, told apart by their bytes) or an already
            loaded object: a state_dict, a training dict that holds it under ``'state_dict'`` or
            ``'model'`` (followed as deep as needed; a module found there gives its
            state_dict), with or without the ``module.`` prefix of DistributedDataParallel or the
            ``_orig_mod.`` prefix of ``torch.compile``.
        strict: raise a ``ValueError`` naming the missing and unexpected keys if there are
            any. As with ``load_state_dict``, the tensors that do fit are loaded before it is
            raised. With ``strict=False`` the returned result lists them.
        map_location: passed to ``torch.load``.
        weights_only: passed to ``torch.load``; set it to False only for files you trust that
            pickle Python objects (``argparse.Namespace`` arguments, whole modules).

    Returns:
        a :class:`LoadResult`.

    Raises:
        TypeError: ``model`` or ``checkpoint`` is of the wrong type.
        CheckpointError: (a ``ValueError``) a file that cannot be read (see :func:`load_file`).
        ValueError: no state_dict found in the checkpoint, a tensor of the wrong shape, or (in
            strict mode) missing or unexpected keys; one line, naming the file and the first
            key that does not fit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    source = "the checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = f"the checkpoint {os.fspath(checkpoint)!r}"
        checkpoint = load_file(checkpoint, map_location=map_location, weights_only=weights_only)
    state_dict, unwrapped = _unwrap(checkpoint)
    state_dict, stripped = _strip_prefixes(state_dict, model.state_dict().keys())
    name = type(model).__name__
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # size mismatches: torch lists them, one per tab-led line
        errors = [line.strip() for line in str(error).splitlines() if line.startswith("\t")]
        first = errors[0] if errors else str(error).splitlines()[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(f"{source} does not fit {name}: {first}{more}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        hint = ""
        if len(unexpected) == len(state_dict):
            hint = (
                f"; none of the checkpoint's {len(state_dict)} keys belongs to the model (first "
                f"checkpoint key: {next(iter(state_dict))!r}): is it the right model?"
            )
        raise ValueError(
            f"{source} does not match {name}: {_describe(missing, unexpected, '; ')}{hint} "
            "(load_checkpoint(..., strict=False) loads what fits)"
        )
    return LoadResult(missing, unexpected, unwrapped, stripped)


# -- files ---------------------------------------------------------------------------------------


def load_file(
    path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True
) -> Any:
    """Read a checkpoint file by what its bytes hold, whatever its name, and verify it.

    A ``torch.save`` zip archive (each record checked against the zip's CRC-32 first) or legacy
    pickle goes to ``torch.load(map_location=..., weights_only=...)``; a safetensors file to
    ``safetensors.torch.load_file`` (needs the optional ``safetensors`` package). If the object
    carries a checksum written by :func:`save_file`, its tensors must match it; it is removed
    from what is returned.

    Raises:
        CheckpointError: (a ``ValueError``) no such file, an empty, truncated or damaged file,
            something that is not a checkpoint (text, an image, random bytes), a pickle that
            ``weights_only=True`` refuses (nothing in it is run), or a checksum that fails. The
            message is one line naming the file and what is wrong.
        ImportError: a safetensors file without the ``safetensors`` package.
    """
    path = Path(path)
    fail = _failure(path)
    if not path.exists():
        raise fail("no such file")
    if not path.is_file():
        raise fail("it is a folder, not a file" if path.is_dir() else "not a regular file")
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(16)
    except OSError as error:
        raise fail(f"cannot read it ({error.strerror or error})") from None
    kind = _sniff(head, size)
    fail = _failure(path, _named_as(path, kind))
    if kind == "empty":
        raise fail("the file is empty (0 bytes)")
    if kind == "unknown":
        raise fail(
            "not a checkpoint: neither a torch.save file (zip archive or pickle) nor safetensors "
            f"(it starts with {head[:12]!r}, {size} bytes)"
        )
    if kind.startswith("safetensors"):
        obj = _load_safetensors(path, kind, size, fail)
    else:
        if kind == "zip":
            _check_zip(path, size, fail)
        obj = _torch_load(path, map_location, weights_only, fail)
    return _verified(obj, fail)


def save_file(obj: Mapping[str, Any], path: str | os.PathLike,
              previous: str | os.PathLike | None = None) -> None:
    """``torch.save`` the dict ``obj`` to ``path`` with a :func:`checksum` of its tensors, so
    that :func:`load_file` refuses the file if a byte of it changes.

    A state_dict (every value a tensor) stays one: the checksum goes into its ``_metadata`` (see
    :data:`CHECKSUM_KEY`), where ``load_state_dict`` ignores it. The file is written atomically and
    read back and verified before it replaces ``path``; with ``previous``, the file it replaces is
    kept there rather than deleted. ``obj`` itself is not modified.
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"save_file saves a dict, got {type(obj).__name__}")
    sealed = _with_checksum(obj)
    write_atomically(path, lambda file: torch.save(sealed, file),
                     verify=lambda written: load_file(written), previous=previous)


def checksum(obj: Any) -> str:
    """``'sha256:<hex>'`` of every tensor (dtype, shape and bytes) and plain value (``int``,
    ``float``, ``str``, ``bytes``, ``bool``, ``None``) in ``obj`` (dicts, lists and tuples,
    nested), each with the path of keys leading to it, in sorted path order: the same for the
    same content wherever it lies (CPU or GPU, any memory layout). Each record is hashed on its
    own (in threads: hashlib releases the GIL), then the list of their digests."""
    records: list[tuple[str, Any]] = []
    _collect(obj, "", records)
    records.sort(key=lambda record: record[0])
    workers = min(8, os.cpu_count() or 1, len(records))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(_record_digest, records))
    else:
        digests = [_record_digest(record) for record in records]
    return "sha256:" + hashlib.sha256(b"".join(digests)).hexdigest()


def _record_digest(record: tuple[str, Any]) -> bytes:
    where, value = record
    digest = hashlib.sha256()
    _update(digest, where.encode())
    if isinstance(value, Tensor):
        _update(digest, f"{value.dtype}{list(value.shape)}".encode())
        _update(digest, _tensor_bytes(value))
    else:
        _update(digest, f"{type(value).__name__}:{value!r}".encode())
    return digest.digest()


def _update(digest: Any, data: bytes | memoryview) -> None:
    """Length-prefixed, so that no two different sequences of fields hash alike."""
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _collect(obj: Any, where: str, records: list[tuple[str, Any]]) -> None:
    if isinstance(obj, Tensor):
        records.append((where, obj))
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _collect(value, f"{where}[{key!r}]", records)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _collect(value, f"{where}[{index}]", records)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        records.append((where, obj))
    else:  # another object: its type only (its repr may hold an address)
        records.append((where, type(obj).__qualname__))


def _tensor_bytes(tensor: Tensor) -> memoryview:
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    tensor = tensor.resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy())


def _checksum_place(obj: Mapping[str, Any]) -> tuple[dict | None, str | None]:
    """(the dict that holds ``obj``'s checksum, the checksum) or (None, None)."""
    metadata = getattr(obj, "_metadata", None)
    if isinstance(metadata, Mapping) and isinstance(metadata.get(""), dict) and isinstance(
        metadata[""].get(CHECKSUM_KEY), str
    ):
        return metadata[""], metadata[""][CHECKSUM_KEY]
    if isinstance(obj.get(CHECKSUM_KEY), str):
        return obj, obj[CHECKSUM_KEY]  # type: ignore[return-value]
    return None, None


def _with_checksum(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """A copy of ``obj`` carrying the checksum of its content (see :data:`CHECKSUM_KEY`)."""
    content = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    value = checksum(content)
    if hasattr(obj, "_metadata") or (
        content and all(isinstance(v, Tensor) for v in content.values())
    ):  # a state_dict
        sealed = OrderedDict(content)
        metadata = OrderedDict(getattr(obj, "_metadata", None) or {})
        metadata[""] = {**metadata.get("", {}), CHECKSUM_KEY: value}
        sealed._metadata = metadata  # type: ignore[attr-defined]
        return sealed
    return {**content, CHECKSUM_KEY: value}


def _verified(obj: Any, fail) -> Any:
    """``obj`` without its checksum, once its content matches it."""
    if not isinstance(obj, Mapping):
        return obj
    holder, stored = _checksum_place(obj)
    if holder is None:
        return obj
    if holder is obj:
        obj = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    else:
        del holder[CHECKSUM_KEY]
    if checksum(obj) != stored:
        raise fail(
            f"its content does not match the checksum written with it ({CHECKSUM_KEY}): the "
            "file is corrupt, or its tensors were changed after dynconv wrote it"
        )
    return obj


def _failure(path: Path, note: str = ""):
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"cannot load {str(path)!r}{note}: {what}")
    return fail


def _sniff(head: bytes, size: int) -> str:
    """What a file holds, from its first bytes: 'empty', 'zip', 'pickle', 'safetensors',
    'safetensors-truncated' or 'unknown'."""
    if size == 0:
        return "empty"
    if head[:4] in _ZIP_MAGIC:
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header = int.from_bytes(head[:8], "little")
        if 2 <= header <= _SAFETENSORS_HEADER_LIMIT:
            return "safetensors" if header <= size - 8 else "safetensors-truncated"
    return "unknown"


def _named_as(path: Path, kind: str) -> str:
    """A note when the file's name says another format than its bytes."""
    suffix = path.suffix.lower()
    if kind.startswith("safetensors") and suffix != ".safetensors":
        return f" (a safetensors file named {suffix or 'without a suffix'})"
    if kind in ("zip", "pickle") and suffix == ".safetensors":
        return " (a torch.save file named .safetensors)"
    return ""


def _check_zip(path: Path, size: int, fail) -> None:
    """Refuse a truncated archive, or one with a record that fails its CRC-32 (records written
    with ``compute_crc32`` off carry 0 and are not checked)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as record:  # zipfile checks the CRC-32 at the end
                    while record.read(1 << 22):
                        pass
    except zipfile.BadZipFile as error:
        if "CRC" in str(error):
            raise fail(f"the file is corrupt: a record fails the zip's CRC-32 check "
                       f"({error})") from None
        raise fail(f"the file is truncated or damaged: a zip archive without a readable "
                   f"directory ({size} bytes; {error})") from None
    except (OSError, EOFError, ValueError, NotImplementedError) as error:
        raise fail(f"the file is truncated or damaged ({type(error).__name__}: {error})") from None


def _torch_load(path: Path, map_location: Any, weights_only: bool, fail) -> Any:
    try:  # an open file: torch.load would hand a path named .safetensors to safetensors
        with path.open("rb") as file:
            return torch.load(file, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if weights_only and "weights only load failed" in str(error).lower():
            reason = _weights_only_reason(error)
            ours = (" (or, for dynconv's own modules, inside `with dynconv.safe_load_globals():`)"
                    if "dynconv." in reason else "")
            raise fail(
                "it holds Python objects besides tensors, which torch.load(weights_only=True) "
                f"refuses to build ({reason}); nothing in it was run: load it with "
                f"weights_only=False only if you trust the file{ours}"
            ) from None
        raise fail(f"the file is corrupt ({_first_line(error)})") from None
    except Exception as error:  # torch's reader: RuntimeError, EOFError, KeyError, ...
        raise fail(f"the file is corrupt or truncated ({_first_line(error)})") from None


def _weights_only_reason(error: Exception) -> str:
    """The line of torch's weights_only message that says what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line for line in lines if "GLOBAL" in line or "nsupported" in line),
                lines[-1] if lines else "no message")
    return line.removeprefix("WeightsUnpickler error: ").split(" Please use")[0].rstrip(".")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no message'}"


def _load_safetensors(path: Path, kind: str, size: int, fail) -> dict[str, Tensor]:
    if kind == "safetensors-truncated":
        raise fail(f"the file is truncated: a safetensors header announced longer than the "
                   f"file ({size} bytes)")
    try:
        from safetensors.torch import load_file as load_safetensors
    except ImportError as error:
        raise ImportError(
            f"{str(path)!r} is a safetensors file: install the optional package `safetensors` "
            "to read it (pip install safetensors)"
        ) from error
    try:
        return load_safetensors(str(path))
    except Exception as error:  # SafetensorError, or JSON errors in the header
        raise fail(f"a damaged safetensors file ({_first_line(error)})") from None


# -- state dicts ---------------------------------------------------------------------------------


def _unwrap(obj: Any) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """Follow the wrapper keys down to the state_dict; return it and the keys followed."""
    followed: list[str] = []
    while True:
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise TypeError(
                "checkpoint must be a path, a state_dict or a dict that holds one under "
                f"{WRAPPER_KEYS}, got {type(obj).__name__}"
            )
        key = next(
            (k for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None
        )
        if key is None:
            break
        followed.append(key)
        obj = obj[key]
    if not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"found no tensors in the checkpoint{_path(followed)}: expected a state_dict, or a "
            f"dict holding one under {WRAPPER_KEYS}; its keys are {sorted(map(str, obj))[:10]}"
        )
    return obj, tuple(followed)


def _path(keys: list[str]) -> str:
    return "".join(f"[{k!r}]" for k in keys)


def _strip_prefixes(
    state_dict: Mapping[str, Any], model_keys
) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """Remove the prefixes of DDP and torch.compile when every key has one and the model's
    keys do not (the BatchNorm version metadata follows the keys)."""
    model_keys = list(model_keys)
    stripped: list[str] = []
    copied = False
    while True:
        prefix = next(
            (
                p for p in WRAPPER_PREFIXES
                if state_dict and all(k.startswith(p) for k in state_dict)
                and not (model_keys and all(k.startswith(p) for k in model_keys))
            ),
            None,
        )
        if prefix is None:
            return state_dict, tuple(stripped)
        if not copied:
            metadata = getattr(state_dict, "_metadata", None)
            state_dict = OrderedDict(state_dict)
            if metadata is not None:
                state_dict._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
            copied = True
        consume_prefix_in_state_dict_if_present(state_dict, prefix)  # type: ignore[arg-type]
        stripped.append(prefix)


def _describe(missing: list[str], unexpected: list[str], separator: str) -> str:
    lines = []
    for title, keys in (
        ("missing from the checkpoint", missing),
        ("unexpected (in the checkpoint, not in the model)", unexpected),
    ):
        if keys:
            shown = ", ".join(keys[:_LISTED_KEYS])
            more = f", ... and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else ""
            lines.append(f"{len(keys)} key(s) {title}: {shown}{more}")
    return separator.join(lines)
