"""The package's shape: imports go one way, from the command line down to the shared helpers,
with no circle and no private name borrowed from another module.

Every import statement of src/dynconv is read (module level, inside functions and under
``TYPE_CHECKING`` alike: a soft circle is still a circle), so a change cannot quietly close one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dynconv"

#: The floors of the package, top to bottom (README, "Layout"): a unit may import the units on
#: lower floors only. A unit is a top-level module or subpackage of dynconv.
FLOORS: list[set[str]] = [
    {"__init__", "__main__"},  # the public face and ``python -m dynconv``
    {"cli"},  # the ``dynconv`` command
    {"training"},  # the main job
    {"tools"},  # what acts on any finished model
    {"integrations"},  # Ultralytics and YOLOv5
    {"models", "blocks", "testing"},  # networks, YOLO blocks, reference oracles
    {"layers"},  # the layers, their factory, temperature and BN folding
    {"functional"},  # the ops
    {"_conv_args", "allocator", "_io", "_version"},  # small shared helpers
]


def _modules(package: Path) -> dict[str, Path]:
    """Dotted module name (below the package, e.g. 'tools.fold', 'layers' for its __init__,
    '__init__' for the package's own) -> file."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _package_of(module: str, path: Path) -> list[str]:
    """The package a module's relative imports start from."""
    parts = [] if module == "__init__" else module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports(package: Path, name: str = "dynconv") -> list[tuple[str, str, list[str], int]]:
    """Every import of one module of ``package`` by another: (importer, imported module, the
    names taken from it, line)."""
    modules = _modules(package)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        base = _package_of(module, path)
        for node in ast.walk(tree):
            targets: list[tuple[list[str], list[str]]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name.split(".")[1:], []) for a in node.names
                           if a.name.split(".")[0] == name]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    start = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    where = start + (node.module.split(".") if node.module else [])
                elif node.module and node.module.split(".")[0] == name:
                    where = node.module.split(".")[1:]
                else:
                    continue
                names = [a.name for a in node.names]
                submodules = [n for n in names if ".".join([*where, n]) in modules]
                if submodules:
                    targets += [([*where, n], []) for n in submodules]
                others = [n for n in names if n not in submodules]
                if others or not submodules:
                    targets.append((where, others))
            for parts, names in targets:
                target = ".".join(parts) or "__init__"
                if target != module:
                    found.append((module, target, names, node.lineno))
    return found


def _unit(module: str) -> str:
    return module.split(".")[0]


def _floor(unit: str) -> int:
    for floor, units in enumerate(FLOORS):
        if unit in units:
            return floor
    raise AssertionError(f"the unit {unit!r} is on no floor of FLOORS: put it on one")


def upward_imports(package: Path) -> list[str]:
    """Imports of a unit on the same or a higher floor (other than the importer's own unit)."""
    bad = []
    for importer, imported, _, line in imports(package):
        a, b = _unit(importer), _unit(imported)
        if a != b and _floor(a) >= _floor(b):
            bad.append(f"{importer}:{line} imports {imported}")
    return bad


def circles(package: Path) -> list[list[str]]:
    """The import cycles between modules (each cycle once, as a path that returns to its
    start)."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in imports(package):
        graph.setdefault(importer, set()).add(imported)
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node):], node]
            if not any(set(cycle) == set(c) for c in found):
                found.append(cycle)
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def private_imports(package: Path) -> list[str]:
    """Names starting with one underscore taken from another module of the package."""
    return [f"{importer}:{line} takes {n} from {imported}"
            for importer, imported, names, line in imports(package)
            for n in names if n.startswith("_") and not n.startswith("__")]


def test_imports_go_down_the_floors() -> None:
    assert upward_imports(PACKAGE) == []


def test_no_import_circle() -> None:
    assert circles(PACKAGE) == []


def test_no_private_name_is_borrowed_from_another_module() -> None:
    assert private_imports(PACKAGE) == []


def test_every_unit_is_on_a_floor() -> None:
    units = {_unit(m) for m in _modules(PACKAGE)}
    assert all(_floor(u) >= 0 for u in units)
    assert {"cli", "training", "tools", "layers", "functional"} <= units


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A small package with one fault of each kind the tests above look for."""
    root = tmp_path / "dynconv"
    files = {
        "__init__.py": "from .layers import Layer\n",
        "_io.py": "",
        "layers/__init__.py": "from .base import Layer\n",
        "layers/base.py": "from .._io import x\n\n\ndef f():\n    from ..tools.cost import g\n",
        "tools/__init__.py": "",
        "tools/cost.py": "from dynconv._io import _helper\nfrom . import fold\n",
        "tools/fold.py": "import dynconv.tools.cost\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checks_find_what_they_look_for(toy: Path) -> None:
    assert upward_imports(toy) == ["layers.base:5 imports tools.cost"]
    assert circles(toy) == [["tools.cost", "tools.fold", "tools.cost"]]
    assert private_imports(toy) == ["tools.cost:1 takes _helper from _io"]
    relative = [(a, b, n) for a, b, n, _ in imports(toy)]
    assert ("__init__", "layers", ["Layer"]) in relative
    assert ("layers", "layers.base", ["Layer"]) in relative
    assert ("layers.base", "_io", ["x"]) in relative
