"""The main job: train a model (:func:`train`, :func:`load_run`) and compare convolution types
on one data set (:func:`compare`), with resumable checkpoints, metrics, tables and plots.

Sits above :mod:`dynconv.tools`, :mod:`dynconv.models` and :mod:`dynconv.layers`; only
:mod:`dynconv.cli` imports it.
"""

from .compare import compare
from .loop import TrainConfig, TrainResult, load_run, train

__all__ = ["TrainConfig", "TrainResult", "compare", "load_run", "train"]
