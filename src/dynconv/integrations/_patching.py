"""Teach a YOLO ``parse_model`` new block classes without editing its source file.

Ultralytics' and YOLOv5's ``parse_model`` decide a block's channel arguments, width scaling and
repeats by identity and membership tests on the block class ``m`` against sets built inside the
function (``m in base_modules``, ``m is C3k2``, ``m in {Conv, ...}``), so a new class gets none
of that. :func:`alias_parse_model` recompiles the function from its module's source with every
such test on ``m`` reading ``alias(m)`` instead, where ``alias`` maps a dynconv block to the
stock block it stands in for (``C2f_ODConv -> C2f``) and leaves every other class as it is: the
new block then gets exactly the stock block's arguments at every scale, built-in special cases
included, and the real class is still the one instantiated.

The rest is what the integrations (:mod:`~dynconv.integrations.ultralytics`,
:mod:`~dynconv.integrations.yolov5`) share: the version gate (:func:`check_version`), the alias
table built from a framework's stock classes (:func:`stock_aliases`), the ``fuse`` wrapper that
folds BatchNorm into the dynamic blocks first (:func:`fuse_blocks_first`) and the record of
what was patched, so that ``unregister()`` puts every attribute back (:class:`Patches`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from types import FunctionType, ModuleType
from typing import Any

__all__ = [
    "AliasTable",
    "Patches",
    "alias_parse_model",
    "check_version",
    "fuse_blocks_first",
    "parse_version",
    "stock_aliases",
]

ALIAS_FUNCTION = "_dynconv_stock_class"
"""Name under which the alias lookup is placed in the patched module's namespace."""


class AliasTable(dict):
    """Maps a block class to the stock class it stands in for; ``table(m)`` is ``m`` otherwise."""

    def __call__(self, m: object) -> object:
        try:
            return self.get(m, m)
        except TypeError:  # unhashable YAML oddities: leave them to parse_model's own errors
            return m


class _AliasTests(ast.NodeTransformer):
    """Rewrite ``m is X`` / ``m in S`` (and their negations) into ``alias(m) is X`` / ..."""

    def __init__(self, variable: str) -> None:
        self.variable = variable
        self.count = 0

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        tested = isinstance(node.left, ast.Name) and node.left.id == self.variable
        identity = (ast.Is, ast.IsNot, ast.In, ast.NotIn)
        if tested and all(isinstance(op, identity) for op in node.ops):
            call = ast.Call(func=ast.Name(ALIAS_FUNCTION, ast.Load()), args=[node.left],
                            keywords=[])
            node.left = ast.copy_location(call, node.left)
            self.count += 1
        return node


def alias_parse_model(
    module: ModuleType, aliases: AliasTable, function: str = "parse_model", variable: str = "m"
) -> Callable:
    """Compile ``module.<function>`` again with its class tests on ``variable`` aliased.

    The source is read from the module file (not from the function, whose source lookup is
    wrong once a patched copy is installed), and the new function shares the module's globals,
    where ``aliases`` is placed under :data:`ALIAS_FUNCTION`. Returns the new function (not yet
    installed; its ``__wrapped__`` is the original); raises ``RuntimeError`` if the function is not
    found or has no such test (a layout this was not written for), before changing anything.
    """
    tree = ast.parse(inspect.getsource(module))
    found = [node for node in tree.body
             if isinstance(node, ast.FunctionDef) and node.name == function]
    if not found:
        raise RuntimeError(f"{module.__name__} has no top-level function {function!r}")
    definition = found[0]
    definition.decorator_list = []
    rewriter = _AliasTests(variable)
    rewriter.visit(definition)
    if rewriter.count == 0:
        raise RuntimeError(
            f"{module.__name__}.{function} has no class tests on {variable!r} to alias: not a "
            "version dynconv supports (see the integration's SUPPORTED_VERSIONS)"
        )
    code = compile(ast.fix_missing_locations(ast.Module([definition], type_ignores=[])),
                   filename=inspect.getsourcefile(module) or module.__name__, mode="exec")
    namespace = vars(module)
    namespace[ALIAS_FUNCTION] = aliases
    original = namespace[function]
    local: dict[str, object] = {}
    exec(code, namespace, local)  # the module's own source, with the tests aliased
    patched = local[function]
    assert isinstance(patched, FunctionType)
    patched.__wrapped__ = getattr(original, "__wrapped__", original)
    patched.__doc__ = original.__doc__
    return patched


def stock_aliases(
    blocks: Iterable[type], stock_names: Mapping[type, str], *stock_modules: ModuleType
) -> AliasTable:
    """The alias table for ``blocks``: each maps to the framework class named
    ``stock_names[base]`` for its first base (in MRO order) found in ``stock_names``, looked up
    in ``stock_modules`` in order. Raises ``RuntimeError`` if a name is in none of them."""
    table = AliasTable()
    for block in blocks:
        base = next(base for base in block.__mro__ if base in stock_names)
        name = stock_names[base]
        found = [vars(module)[name] for module in stock_modules if name in vars(module)]
        if not found:
            modules = ", ".join(module.__name__ for module in stock_modules)
            raise RuntimeError(f"no class {name!r} (for {block.__name__}) in {modules}")
        table[block] = found[0]
    return table


def parse_version(text: str) -> tuple[int, ...]:
    """``'8.4.190'`` -> ``(8, 4, 190)`` (the first three numbers; suffixes ignored)."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_version(
    package: str, version: str, supported: tuple[tuple[int, int], tuple[int, int]], tested: str
) -> None:
    """Raise ``RuntimeError`` naming the tested range and the pip command for it unless
    ``supported[0] <= version < supported[1]``, compared on (major, minor)."""
    (lo_major, lo_minor), (hi_major, hi_minor) = supported
    if not supported[0] <= parse_version(version)[:2] < supported[1]:
        spec = f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"
        raise RuntimeError(
            f"dynconv.integrations.{package} supports {package} {spec} (tested with {tested}), "
            f"found {version}; install a tested version: pip install '{package}{spec}'"
        )


def fuse_blocks_first(fuse: Callable) -> Callable:
    """Wrap a framework's ``Model.fuse`` so that it first folds BatchNorm into every dynconv
    block (:func:`dynconv.blocks.yolo.fuse_blocks`), which the framework's own ``fuse`` skips.
    Skipped when the model says it is fused already (``is_fused()``, where it has one)."""
    from ..blocks.yolo import fuse_blocks

    @functools.wraps(fuse)
    def wrapper(self, *args, **kwargs):
        is_fused = getattr(self, "is_fused", None)
        if is_fused is None or not is_fused():
            fuse_blocks(self)
        return fuse(self, *args, **kwargs)

    wrapper.__dynconv_original__ = fuse
    return wrapper


_MISSING = object()


class Patches:
    """What an integration changed, so that :meth:`undo` restores it exactly.

    ``patches.set(target, name, value)`` sets an attribute of a module or class and remembers
    the value it replaced (or that there was none), once per (target, name): setting the same
    attribute again keeps the first original. :meth:`undo` restores in reverse order.
    """

    def __init__(self) -> None:
        self._saved: dict[tuple[int, str], tuple[Any, str, Any]] = {}

    def set(self, target: Any, name: str, value: Any) -> None:
        key = (id(target), name)
        if key not in self._saved:
            self._saved[key] = (target, name, vars(target).get(name, _MISSING))
        setattr(target, name, value)

    def update(self, target: Any, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            self.set(target, name, value)

    def original(self, target: Any, name: str) -> Any:
        """The value ``target.name`` had before it was first set here (``getattr`` if unset)."""
        saved = self._saved.get((id(target), name))
        if saved is None:
            return getattr(target, name)
        if saved[2] is _MISSING:
            raise AttributeError(f"{target!r} had no attribute {name!r}")
        return saved[2]

    def undo(self) -> None:
        for target, name, old in reversed(list(self._saved.values())):
            if old is _MISSING:
                if name in vars(target):
                    delattr(target, name)
            else:
                setattr(target, name, old)
        self._saved.clear()

    def __bool__(self) -> bool:
        return bool(self._saved)
