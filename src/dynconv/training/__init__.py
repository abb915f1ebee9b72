"""The main job: train a model (:func:`train`, :func:`load_run`) and compare convolution types
on one data set (:func:`compare`), with resumable checkpoints, metrics, tables and plots.

Sits above :mod:`dynconv.tools`, :mod:`dynconv.models` and :mod:`dynconv.layers`; only
:mod:`dynconv.cli` imports it.
"""

from .compare import COMPARE_EPOCHS, compare, format_table
from .data import dataset_sources, iterate_test, load_dataset
from .loop import TrainConfig, TrainResult, config_for_resume, load_run, train

__all__ = [
    "COMPARE_EPOCHS",
    "TrainConfig",
    "TrainResult",
    "compare",
    "config_for_resume",
    "dataset_sources",
    "format_table",
    "iterate_test",
    "load_dataset",
    "load_run",
    "train",
]
