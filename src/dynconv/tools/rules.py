"""Per-type rules of the tools, for layers that do not carry their own knowledge.

A dynamic layer knows its own per-sample kernels and MACs (methods of
:class:`~dynconv.DynamicConvBase`); a foreign class (``nn.Conv2d``, a user's layer) is given a
rule here instead, with the same call signature ``rule(layer, argument)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..layers.base import DynamicConvBase

__all__ = ["RuleTable"]


class RuleTable:
    """Rules keyed by layer type, beside the method ``method`` of the dynamic layers.

    :meth:`lookup` walks the layer's class hierarchy from the class itself up: the first class
    with a registered rule, or (for a subclass of :class:`~dynconv.DynamicConvBase`) that
    defines ``method`` itself, gives the rule; so a rule registered for a type overrides the
    type's own method, and a subclass inherits what its base knows.
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self._rules: dict[type, Callable[[nn.Module, Any], Any]] = {}

    def register(self, layer_type: type, rule: Callable[[nn.Module, Any], Any]) -> None:
        """Use ``rule(layer, argument)`` for layers of ``layer_type`` and its subclasses."""
        if not isinstance(layer_type, type) or not callable(rule):
            raise TypeError(f"expected a class and a callable, got {layer_type!r} and {rule!r}")
        self._rules[layer_type] = rule

    def lookup(self, layer: nn.Module) -> Callable[[nn.Module, Any], Any] | None:
        """The rule for ``layer``, or None if neither a rule nor the layer's type gives one."""
        for cls in type(layer).__mro__:
            if cls in self._rules:
                return self._rules[cls]
            if cls is DynamicConvBase:  # its default raises: the type knows nothing
                return None
            if issubclass(cls, DynamicConvBase) and self.method in vars(cls):
                return getattr(cls, self.method)
        return None

    def registered(self) -> list[str]:
        """The names of the types with a registered rule, sorted."""
        return sorted(t.__name__ for t in self._rules)
