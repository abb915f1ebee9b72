"""Teach a YOLO ``parse_model`` new block classes without editing its source file.

Ultralytics' and YOLOv5's ``parse_model`` decide a block's channel arguments, width scaling and
repeats by identity and membership tests on the block class ``m`` against sets built inside the
function (``m in base_modules``, ``m is C3k2``, ``m in {Conv, ...}``), so a new class gets none
of that. :func:`alias_parse_model` recompiles the function from its module's source with every
such test on ``m`` reading ``alias(m)`` instead, where ``alias`` maps a dynconv block to the
stock block it stands in for (``C2f_ODConv -> C2f``) and leaves every other class as it is: the
new block then gets exactly the stock block's arguments at every scale, built-in special cases
included, and the real class is still the one instantiated.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from types import FunctionType, ModuleType

__all__ = ["AliasTable", "alias_parse_model"]

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
) -> tuple[Callable, int]:
    """Compile ``module.<function>`` again with its class tests on ``variable`` aliased.

    The source is read from the module file (not from the function, whose source lookup is
    wrong once a patched copy is installed), and the new function shares the module's globals,
    where ``aliases`` is placed under :data:`ALIAS_FUNCTION`. Returns the new function (not yet
    installed; its ``__wrapped__`` is the original) and the number of tests rewritten; raises
    ``RuntimeError`` if the function is not found.
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
    return patched, rewriter.count
