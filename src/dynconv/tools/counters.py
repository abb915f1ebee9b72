"""Make the FLOP counters that users already run count the dynamic layers right.

thop (``ultralytics-thop``, what Ultralytics' ``model.info()`` calls) counts a module by a rule
looked up by its type, zero for a type it does not know, and does not see the ``F.conv2d`` that
a custom module calls: a dynamic layer would count only its attention branch.
:func:`thop_ops` gives rules for ``thop.profile(..., custom_ops=thop_ops())``, and
:func:`register_thop` (called by ``import dynconv``) puts them in thop's own table, so that a
plain ``thop.profile(model, inputs=...)`` counts them too. Each rule adds the analytic MACs that
the layer computes outside its child modules
(:meth:`~dynconv.DynamicConvBase.functional_macs`); thop counts
the children (ultralytics-thop >= 2.2 adds a module's rule to its children's counts). The
attentions pool with an ``nn.AdaptiveAvgPool2d`` module, which tells thop's size extrapolation
(Ultralytics' ``model.info()``) that part of the cost does not grow with the image.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

from torch import Tensor, nn

from ..layers.base import DynamicConvBase

__all__ = ["register_thop", "thop_ops"]


def _count_dynamic(module: DynamicConvBase, inputs: tuple, output: Tensor) -> None:
    """thop rule: add the MACs the layer computes outside its child modules
    (:meth:`~dynconv.DynamicConvBase.functional_macs`) for the whole batch to
    ``module.total_ops``; thop counts the child modules (the attention's convolutions) itself."""
    x = inputs[0]
    batch = 1 if x.dim() == 3 else x.shape[0]
    module.total_ops += batch * module.functional_macs(tuple(x.shape[-2:]))


def _counting_layer_types() -> list[type]:
    """Every subclass of :class:`~dynconv.DynamicConvBase` defined so far that counts its MACs
    (thop looks rules up by the exact type)."""
    found, stack = [], [DynamicConvBase]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.macs is not DynamicConvBase.macs:
            found.append(cls)
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def thop_ops() -> dict[type, Callable[[nn.Module, tuple, Tensor], None]]:
    """``custom_ops`` for ``thop.profile``: a rule for each dynamic layer type defined so far
    (the package's, and a user's subclass once its class exists)."""
    return dict.fromkeys(_counting_layer_types(), _count_dynamic)


def register_thop() -> bool:
    """Add the rules of :func:`thop_ops` to thop's type-to-rule table, if thop is installed.

    Idempotent, and keeps a rule a user registered before for the same type; call it again
    after defining a layer type of your own to count that one too. Returns whether
    the rules are in place (False when thop is not installed or cannot be imported).
    """
    if "thop" not in sys.modules and importlib.util.find_spec("thop") is None:
        return False
    try:
        import thop  # noqa: F401  (``thop.profile`` is rebound to the function by the package)

        table = sys.modules["thop.profile"].register_hooks
    except Exception:  # a broken or unexpected thop must not break dynconv
        return False
    for layer_type, rule in thop_ops().items():
        table.setdefault(layer_type, rule)
    return True
