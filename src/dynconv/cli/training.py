"""The commands of the main job: ``compare``, ``train`` and ``list``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .options import (
    UNSET,
    Command,
    add_conv_type,
    add_training_options,
    compare_row,
    default_out,
    seed,
)

__all__ = ["COMPARE", "LIST", "TRAIN"]


#: The settings whose option is not ``--`` and the setting's name with dashes.
_OPTIONS = {"temperature_initial": "--temperature-init", "model_args": "--model-arg"}


@contextmanager
def _settings_named() -> Iterator[None]:
    """A setting that cannot work names its option: 'argument --batch-size: ...'."""
    from ..training import SettingError

    try:
        yield
    except SettingError as error:
        option = _OPTIONS.get(error.setting, "--" + error.setting.replace("_", "-"))
        raise ValueError(f"argument {option}: {error}") from None


def _training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "resume", "conv_types", "seeds", "quick"}
    values = {k: v for k, v in vars(args).items() if k not in skip}
    if "model_args" in values:
        values["model_args"] = dict(values["model_args"])
    return values


# -- compare -------------------------------------------------------------------------------------


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conv-types", type=compare_row,
                        nargs="+", default=UNSET, metavar="TYPE",
                        help="rows to compare: conv types, and static-wide, the static network "
                             "widened to the parameters of dynamic (default: static static-wide "
                             "dynamic condconv odconv drconv, those registered)")
    parser.add_argument("--seeds", type=seed, nargs="+", default=UNSET,
                        metavar="SEED", help="(default: 0 1 2 3 4 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a first look in under 2 minutes: seed 0 of the default comparison "
                             "(its intervals cover the test images only)")
    add_training_options(parser, compare=True)


def _run_compare(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, compare, format_table
    from ..training.compare import (
        COMPARE_EPOCHS,
        COMPARE_EVAL_EVERY,
        COMPARE_SEEDS,
        COMPARE_TRAIN_IMAGES,
        QUICK_SEEDS,
    )

    overrides = _training_overrides(args)
    if args.resume and "out" not in overrides:
        raise ValueError("--resume needs --out DIR, the folder of the comparison to continue")
    out = overrides.pop("out", None) or default_out("compare")
    seeds = getattr(args, "seeds", QUICK_SEEDS if getattr(args, "quick", False) else COMPARE_SEEDS)
    overrides.setdefault("epochs", COMPARE_EPOCHS)
    overrides.setdefault("eval_every", COMPARE_EVAL_EVERY)
    data = overrides.get("data", "mnist")
    if data in COMPARE_TRAIN_IMAGES:
        overrides.setdefault("train_images", COMPARE_TRAIN_IMAGES[data])
    overrides.setdefault("temperature_epochs", max(1, overrides["epochs"] // 5))
    quiet = overrides.pop("quiet", False)
    base = TrainConfig.from_dict(overrides)
    with _settings_named():
        result = compare(base, out, getattr(args, "conv_types", None),
                         seeds, resume=args.resume,
                         progress=not quiet and sys.stderr.isatty(),
                         log=(lambda message: None) if quiet else print)
    print()
    if result.summaries:
        print(format_table(result.summaries))
    for key, value in result.settings.items():
        print(f"  {key}: {value}")
    print(f"\nwrote {', '.join(result.files)} to {result.out}/")
    if "interrupted" in result.settings:
        print(f"interrupted; continue with: dynconv compare --out {result.out} --resume")
        return 130
    return 0


COMPARE = Command(
    "compare", "train one network with each convolution type and compare them",
    "Train the same network with each convolution type (and the static network widened to the "
    "parameters of DY-Conv) and several seeds, then print and save a table (parameters, MACs, "
    "training time per epoch, latency at batch 1 and 64, test accuracy mean ± std over the "
    "seeds, the difference to static with its paired 95% interval and conclusion), the "
    "per-epoch metrics and plots. Offline; a few minutes on a laptop CPU.",
    _compare_arguments, _run_compare,
)


# -- train ---------------------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    add_conv_type(parser, UNSET, ", static for most")
    parser.add_argument("--seed", type=seed, default=UNSET,
                        help="seed of the initialisation, data order and augmentation "
                             "(default: 0)")
    add_training_options(parser, compare=False)


def _run_train(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, config_for_resume, train

    overrides = _training_overrides(args)
    if args.resume:
        if "out" not in overrides:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        config = config_for_resume(overrides["out"], overrides)
    else:
        config = TrainConfig.from_dict({"out": default_out("train"), **overrides})
    with _settings_named():
        result = train(config, resume=args.resume)
    if not result.main_process:  # under torchrun, process 0 reports
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted; continue with: dynconv train --out {result.out} --resume")
        return 130
    last = result.metrics[-1]
    split = "validation" if result.dataset.eval_on == "val" else "test"
    print(f"final {split} accuracy {100 * last['test_acc']:.2f}% (loss {last['test_loss']:.4f}) "
          f"after {int(last['epoch'])} epochs; results in {result.out}/ (metrics.csv, "
          "model.pt, checkpoint.pt)")
    return 0


TRAIN = Command(
    "train", "train one model with one convolution type",
    "Train one model on MNIST (the default), the digits, CIFAR-10/100 or an ImageFolder folder, "
    "with a checkpoint "
    "after every epoch and on Ctrl-C. Multi-GPU: torchrun --nproc-per-node N -m dynconv train "
    "... (see docs/training.md).",
    _train_arguments, _run_train,
)


# -- list ----------------------------------------------------------------------------------------


def _run_list(args: argparse.Namespace) -> int:
    from ..layers.factory import conv_types
    from ..layers.temperature import TEMPERATURE_SCHEDULES
    from ..models import list_models
    from ..training import dataset_sources

    print("models:       " + ", ".join(list_models()))
    print("conv types:   " + ", ".join(conv_types()))
    print("data:         " + dataset_sources())
    print("temperature:  " + ", ".join(TEMPERATURE_SCHEDULES))
    return 0


LIST = Command(
    "list", "models, convolution types, data sources and schedules",
    "List what the other commands accept.", lambda parser: None, _run_list,
)
