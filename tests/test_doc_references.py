"""Every dotted ``dynconv.…`` name that the README, docs/, the docstrings and the benchmarks
mention exists: a moved module or a renamed function cannot leave a stale reference behind."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "src" / "dynconv").rglob("*.py")),
         *sorted((ROOT / "benchmarks").glob("*.py"))]
# a dotted name, not part of a path or of a longer name; file names (yolo11n-dynconv.yaml) aside
NAME = re.compile(r"(?<![\w/.-])dynconv(?:\.[A-Za-z_]\w*)+(?![\w-])")
FILE_SUFFIXES = {"yaml", "md", "py", "pt", "onnx", "csv", "json", "png"}


def _references() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in FILES:
        for match in NAME.finditer(path.read_text()):
            name = match.group(0)
            if name.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_the_references_are_found() -> None:
    references = _references()
    assert "dynconv.tools.fold.register_fold_rule" in references  # docs/tools.md
    assert len(references) > 50


def test_every_reference_resolves() -> None:
    pytest.importorskip("ultralytics")  # docs name dynconv.integrations.ultralytics
    stale = {name: where for name, where in _references().items() if not _resolves(name)}
    assert stale == {}


def test_a_stale_reference_is_caught() -> None:
    assert not _resolves("dynconv.fold.register_fold_rule")  # dynconv.fold is the function
    assert not _resolves("dynconv.cost.count_macs")  # the module moved to dynconv.tools
    assert _resolves("dynconv.tools.cost.count_macs")
