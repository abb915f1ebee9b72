"""The main job: train a model (:func:`train`, :func:`load_run`) and compare convolution types
on one data set (:func:`compare`), with resumable checkpoints, metrics, tables and plots.

Sits above :mod:`dynconv.tools`, :mod:`dynconv.models` and :mod:`dynconv.layers`; only
:mod:`dynconv.cli` imports it.
"""

from .compare import COMPARE_EPOCHS, DEFAULT_CONV_TYPES, WIDE_STATIC, compare
from .config import SettingError, TrainConfig, TrainResult, config_for_resume
from .data import iterate_test
from .loop import load_run, train
from .sources import dataset_sources, load_dataset, load_digits, load_mnist
from .summary import format_table

__all__ = [
    "COMPARE_EPOCHS",
    "DEFAULT_CONV_TYPES",
    "WIDE_STATIC",
    "SettingError",
    "TrainConfig",
    "TrainResult",
    "compare",
    "config_for_resume",
    "dataset_sources",
    "format_table",
    "iterate_test",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_run",
    "train",
]
