"""The ``dynconv`` command: ``compare``, ``train``, ``profile``, ``fold``, ``inspect``, ``export``
and ``list``."""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..allocator import keep_freed_memory

__all__ = ["KEEP_MEMORY_ENV", "main"]

# train and compare call keep_freed_memory() unless this is "0"
KEEP_MEMORY_ENV = "DYNCONV_KEEP_FREED_MEMORY"

_DESCRIPTION = """\
Dynamic convolutions for PyTorch: compare convolution types, train models.

  dynconv compare                 train a small network with every convolution type on the
                                  digits shipped with scikit-learn (3 seeds) and print a table
  dynconv compare --data DIR      the same on CIFAR-10/100 or an ImageFolder folder
  dynconv train --model resnet18 --conv-type odconv --data ~/data/cifar-10-batches-py
  dynconv train --out DIR --resume          continue a stopped run
  dynconv inspect RUN_DIR         plot what the dynamic layers of a trained model decide
  dynconv export RUN_DIR --check  ONNX file with a dynamic batch, checked in onnxruntime
  dynconv list                    models, convolution types, data sources, schedules
  dynconv profile resnet18 --conv-type dynamic --batch-sizes 1 32
                                  parameters, MACs, latency and memory beside static convs
  dynconv fold runs/train-...     fold a trained run's dynamic layers into static convs

Run 'dynconv COMMAND --help' for the options of each command."""


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. width=32), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_training_options(parser: argparse.ArgumentParser, compare: bool) -> None:
    """The options shared by ``train`` and ``compare`` (defaults left out of the namespace, so
    that a resumed run can tell what was given)."""
    S = argparse.SUPPRESS
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=S, metavar="SOURCE",
                      help="'digits' (default: scikit-learn's handwritten digits, no download), "
                           "a CIFAR-10/CIFAR-100 python-pickle folder, or an ImageFolder folder "
                           "(<class>/<image>, optionally in train/ and test/)")
    data.add_argument("--image-size", type=int, default=S, metavar="N",
                      help="resize ImageFolder images to N x N (shorter side, centre crop)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=S, metavar="NAME",
                       help="a model of 'dynconv list' (default: small_cnn)")
    model.add_argument("--model-arg", dest="model_args", type=_key_value, action="append",
                       default=S, metavar="KEY=VALUE",
                       help="keyword for the model, repeatable (e.g. width=32, "
                            "conv_kwargs={'num_kernels': 2}, stem=imagenet)")
    recipe = parser.add_argument_group(
        "recipe", "defaults: seed 002's CIFAR recipe" + (
            "; compare trains 15 epochs" if compare else
            "; 200 epochs on CIFAR, 30 on the digits, 100 otherwise"))
    recipe.add_argument("--epochs", type=int, default=S, metavar="N")
    recipe.add_argument("--batch-size", type=int, default=S, metavar="N",
                        help="global batch size (default: 128)")
    recipe.add_argument("--lr", type=float, default=S, help="SGD learning rate (default: 0.1)")
    recipe.add_argument("--momentum", type=float, default=S, metavar="M",
                        help="(default: 0.9)")
    recipe.add_argument("--weight-decay", type=float, default=S, metavar="WD",
                        help="(default: 5e-4)")
    recipe.add_argument("--lr-schedule", choices=("cosine", "multistep", "constant"), default=S,
                        help="per epoch (default: cosine)")
    recipe.add_argument("--lr-milestones", type=int, nargs="+", default=S, metavar="EPOCH",
                        help="epochs where multistep multiplies the lr by --lr-gamma")
    recipe.add_argument("--lr-gamma", type=float, default=S, metavar="G",
                        help="(default: 0.1)")
    recipe.add_argument("--crop-padding", type=int, default=S, metavar="PIXELS",
                        help="random crop after this much zero padding (default: 4 on CIFAR, "
                             "1 on the digits, 1/8 of the size on folders; 0 turns it off)")
    recipe.add_argument("--flip", action=argparse.BooleanOptionalAction, default=S,
                        help="random horizontal flip (default: on, off for the digits)")
    temperature = parser.add_argument_group("attention temperature")
    temperature.add_argument(
        "--temperature", choices=("linear", "step", "none"), default=S,
        help="annealing: 'linear' (ODConv: per iteration from 30 to 1 over the first "
             "--temperature-epochs), 'step' (DY-Conv: 34, minus 3 per epoch, down to 1), "
             "'none' (1). Evaluation always runs at 1 (default: linear)")
    temperature.add_argument("--temperature-init", dest="temperature_initial", type=float,
                             default=S, metavar="T", help="start (default: 30 linear, 34 step)")
    temperature.add_argument("--temperature-epochs", type=int, default=S, metavar="N",
                             help="length of the linear annealing (default: "
                                  + ("a fifth of the epochs)" if compare else "10)"))
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=S, metavar="DIR",
                     help="output folder (default: runs/<command>-<date>-<time>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its checkpoint"
                          + (" (finished runs are kept)" if compare else ""))
    run.add_argument("--device", default=S, help="'auto' (default: CUDA if any), 'cpu', 'cuda:N'")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=S,
                     help="mixed precision (default: on CUDA only)")
    run.add_argument("--threads", type=int, default=S, metavar="N",
                     help="CPU threads for torch (default: torch's choice)")
    run.add_argument("--quiet", action="store_true", default=S,
                     help="no progress bar and no per-epoch line")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynconv", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dynconv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    compare = commands.add_parser(
        "compare", help="train one network with each convolution type and compare them",
        description="Train the same network with each convolution type and several seeds, then "
                    "print and save a table (parameters, MACs, training time per epoch, latency "
                    "at batch 1 and 64, test accuracy mean ± std over the seeds), the "
                    "per-epoch metrics and plots. Offline; a few minutes on a laptop CPU.")
    compare.add_argument("--conv-types", nargs="+", default=argparse.SUPPRESS, metavar="TYPE",
                         help="types to compare (default: static dynamic condconv odconv "
                              "drconv, those registered)")
    compare.add_argument("--seeds", type=int, nargs="+", default=argparse.SUPPRESS,
                         metavar="SEED", help="(default: 0 1 2)")
    _add_training_options(compare, compare=True)

    train = commands.add_parser(
        "train", help="train one model with one convolution type",
        description="Train one model on the digits, CIFAR-10/100 or an ImageFolder folder, "
                    "with a checkpoint after every epoch and on Ctrl-C. Multi-GPU: torchrun "
                    "--nproc-per-node N -m dynconv train ... (see docs/training.md).")
    train.add_argument("--conv-type", default=argparse.SUPPRESS, metavar="TYPE",
                       help="convolution type (default: the model's own, static for most)")
    train.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                       help="seed of the initialisation, data order and augmentation "
                            "(default: 0)")
    _add_training_options(train, compare=False)

    profile = commands.add_parser(
        "profile", help="cost per layer and in total, beside the same model with static convs",
        description="Parameters and MACs per layer (the per-sample convolution, the attention "
                    "branch and the kernel aggregation; see docs/tools.md) and in total, "
                    "latency (median after warm-up) and peak memory at each batch size, side by "
                    "side with the same model built with nn.Conv2d of the same geometry.")
    profile.add_argument("model", metavar="MODEL", help="a model of 'dynconv list'")
    profile.add_argument("--conv-type", default=None, metavar="TYPE",
                         help="convolution type (default: the model's own)")
    profile.add_argument("--model-arg", dest="model_args", type=_key_value, action="append",
                         default=[], metavar="KEY=VALUE", help="keyword for the model, repeatable")
    profile.add_argument("--input-size", type=int, nargs=3, default=(3, 32, 32),
                         metavar=("C", "H", "W"), help="one image (default: 3 32 32)")
    profile.add_argument("--batch-sizes", type=int, nargs="+", default=(1, 32), metavar="N",
                         help="batch sizes for latency and memory (default: 1 32)")
    profile.add_argument("--device", default="cpu", help="(default: cpu)")
    profile.add_argument("--min-run-time", type=float, default=0.5, metavar="S",
                         help="seconds of timed runs per model and batch size (default: 0.5)")
    profile.add_argument("--no-timing", dest="timing", action="store_false",
                         help="parameters and MACs only")
    profile.add_argument("--threads", type=int, default=None, metavar="N",
                         help="CPU threads for torch (default: torch's choice)")

    fold = commands.add_parser(
        "fold", help="fold a trained run's dynamic layers into static convolutions",
        description="Replace each dynamic layer of the model of a 'dynconv train' run by the "
                    "nn.Conv2d whose kernel is the layer's effective kernel averaged over "
                    "calibration images from the training split; report how much each layer's "
                    "kernel varies, the test accuracy before and after and the speed-up, and "
                    "save the folded state_dict. Trains nothing.")
    fold.add_argument("run", metavar="RUN_DIR", help="output folder of 'dynconv train'")
    fold.add_argument("--calibration-size", type=int, default=512, metavar="N",
                      help="training images used to calibrate (default: 512)")
    fold.add_argument("--tolerance", type=float, default=0.1,
                      help="flag layers whose relative kernel spread exceeds this (default: 0.1)")
    fold.add_argument("--out", default=None, metavar="FILE",
                      help="where to save the folded state_dict (default: RUN_DIR/folded.pt)")
    fold.add_argument("--threads", type=int, default=None, metavar="N",
                      help="CPU threads for torch (default: torch's choice)")

    inspect = commands.add_parser(
        "inspect", help="plot the attentions of a model's dynamic layers over a dataset",
        description="Run a model over the test images and record what each dynamic layer "
                    "decides: kernel attention per sample and its entropy, ODConv's channel, "
                    "filter and spatial attentions, region maps. Writes PNG plots and "
                    "attention_summary.csv/.json to --out.")
    _add_model_source(inspect)
    inspect.add_argument("--out", default=None, metavar="DIR",
                         help="output folder (default: runs/inspect-<date>-<time>)")
    inspect.add_argument("--batch-size", type=int, default=256, metavar="N")
    inspect.add_argument("--limit", type=int, default=None, metavar="N",
                         help="use the first N test images only (default: all)")

    export = commands.add_parser(
        "export", help="export a model to ONNX with a dynamic batch dimension",
        description="Export a model to ONNX (torch's torch.export-based exporter), in eval "
                    "mode at temperature 1 for a trained run, with a dynamic batch dimension. "
                    "Needs the 'export' extra: pip install 'dynconv[export]'.")
    _add_model_source(export)
    export.add_argument("--out", default=None, metavar="FILE",
                        help="the .onnx file (default: RUN_DIR/model.onnx, or "
                             "<model>-<conv type>.onnx)")
    export.add_argument("--fixed-batch", type=int, default=None, metavar="N",
                        help="export for batch size N only (default: a dynamic batch)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    export.add_argument("--check", action="store_true",
                        help="run the file in onnxruntime at batch sizes 1, 3 and 8 and report "
                             "the largest absolute difference from PyTorch")

    commands.add_parser("list", help="models, convolution types, data sources and schedules",
                        description="List what the other commands accept.")
    return parser


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", default=None, metavar="RUN_DIR",
                        help="the output folder of 'dynconv train' (its model and data)")
    source = parser.add_argument_group(
        "untrained model", "instead of RUN_DIR: build a model, initialised with --seed")
    source.add_argument("--model", default=None, metavar="NAME",
                        help="a model of 'dynconv list'")
    source.add_argument("--conv-type", default=None, metavar="TYPE",
                        help="convolution type (default: the model's own)")
    source.add_argument("--model-arg", dest="model_args", type=_key_value, action="append",
                        default=[], metavar="KEY=VALUE", help="keyword for the model, repeatable")
    source.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--data", default=None, metavar="SOURCE",
                        help="images to run on and build the model for (default: the run's, "
                             "or 'digits')")


def _load_model(args: argparse.Namespace):
    """(model in eval mode, dataset, a name) from RUN_DIR or --model."""
    import torch

    from ..models import create_model_for_data
    from ..training.data import load_dataset
    from ..training.loop import load_run

    if (args.run is None) == (args.model is None):
        raise ValueError("give either RUN_DIR (a 'dynconv train' output folder) or --model NAME")
    if args.run is not None:
        if args.conv_type or args.model_args:
            raise ValueError("--conv-type and --model-arg build an untrained --model; a RUN_DIR "
                             "keeps its own")
        dataset = None if args.data is None else load_dataset(args.data)
        model, _, dataset = load_run(args.run, dataset)
        return model, dataset, Path(args.run).name
    dataset = load_dataset(args.data or "digits")
    torch.manual_seed(args.seed)
    model = create_model_for_data(args.model, args.conv_type, dataset.num_classes,
                                  dataset.in_channels, min(dataset.image_size),
                                  **dict(args.model_args))
    return model.eval(), dataset, f"{args.model}-{args.conv_type or 'default'}"


def _run_inspect(args: argparse.Namespace) -> int:
    import torch

    from ..tools.inspection import (
        inspect_attention,
        plot_kernel_attention,
        plot_region_maps,
        plot_spatial_attention,
        write_summary,
    )
    from ..training.data import iterate_test

    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    model, dataset, _ = _load_model(args)
    test = dataset.test
    if args.limit is not None:
        test = type(test)(test.images[: args.limit], test.labels[: args.limit])
    batches = (dataset.normalize(images) for images, _ in iterate_test(test, args.batch_size))
    with torch.no_grad():
        layers = inspect_attention(model, batches)
    out = Path(args.out or _default_out("inspect"))
    files = write_summary(layers, out)
    plots = {
        "kernel_attention.png": lambda p: plot_kernel_attention(layers, p),
        "spatial_attention.png": lambda p: plot_spatial_attention(layers, p),
        "region_maps.png": lambda p: plot_region_maps(layers, test.images, p),
    }
    files += [out / name for name, plot in plots.items() if plot(out / name)]
    for layer in layers.values():
        if layer.kernel is not None:
            k = layer.kernel.shape[1]
            print(f"  {layer.name:<32} {layer.layer_type:<14} K={k}  entropy "
                  f"{layer.entropy.mean().item():.3f} / {math.log(k):.3f} nats")
    print(f"{len(layers)} dynamic layers over {len(test)} test images; wrote "
          f"{', '.join(f.name for f in files)} to {out}/")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from ..tools.export import export_onnx

    if args.fixed_batch is not None and args.fixed_batch < 1:
        raise ValueError(f"--fixed-batch must be >= 1, got {args.fixed_batch}")
    model, dataset, name = _load_model(args)
    default = Path(args.run) / "model.onnx" if args.run else Path(f"{name}.onnx")
    path = Path(args.out) if args.out else default
    batch = args.fixed_batch or 2
    example = dataset.normalize(dataset.test.images[:1]).expand(batch, -1, -1, -1)
    result = export_onnx(model, path, example, dynamic_batch=args.fixed_batch is None,
                         opset_version=args.opset, check=args.check)
    shape = ["batch" if result.dynamic_batch else result.batch_size, *result.input_shape]
    print(f"wrote {result.path} (input {shape}; passes onnx.checker)")
    for batch_size, diff in result.max_abs_diff.items():
        print(f"  onnxruntime vs PyTorch, batch {batch_size}: max abs diff {diff:.3g}")
    return 0


def _training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "resume", "conv_types", "seeds"}
    values = {k: v for k, v in vars(args).items() if k not in skip}
    if "model_args" in values:
        values["model_args"] = dict(values["model_args"])
    return values


def _default_out(command: str) -> str:
    return str(Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _run_train(args: argparse.Namespace) -> int:
    from ..training.loop import TrainConfig, config_for_resume, train

    overrides = _training_overrides(args)
    if args.resume:
        if "out" not in overrides:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        config = config_for_resume(overrides["out"], overrides)
    else:
        config = TrainConfig.from_dict({"out": _default_out("train"), **overrides})
    result = train(config, resume=args.resume)
    if not result.main_process:  # under torchrun, process 0 reports
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted; continue with: dynconv train --out {result.out} --resume")
        return 130
    last = result.metrics[-1]
    print(f"final test accuracy {100 * last['test_acc']:.2f}% (loss {last['test_loss']:.4f}) "
          f"after {int(last['epoch'])} epochs; results in {result.out}/ (metrics.csv, "
          "model.pt, checkpoint.pt)")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from ..training.compare import COMPARE_EPOCHS, compare, format_table
    from ..training.loop import TrainConfig

    overrides = _training_overrides(args)
    if args.resume and "out" not in overrides:
        raise ValueError("--resume needs --out DIR, the folder of the comparison to continue")
    out = overrides.pop("out", None) or _default_out("compare")
    overrides.setdefault("epochs", COMPARE_EPOCHS)
    overrides.setdefault("temperature_epochs", max(1, overrides["epochs"] // 5))
    quiet = overrides.pop("quiet", False)
    base = TrainConfig.from_dict(overrides)
    result = compare(base, out, getattr(args, "conv_types", None),
                     getattr(args, "seeds", (0, 1, 2)), resume=args.resume,
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


def _run_list() -> int:
    from ..layers.factory import conv_types
    from ..layers.temperature import TEMPERATURE_SCHEDULES
    from ..models import list_models
    from ..training.data import dataset_sources

    print("models:       " + ", ".join(list_models()))
    print("conv types:   " + ", ".join(conv_types()))
    print("data:         " + dataset_sources())
    print("temperature:  " + ", ".join(TEMPERATURE_SCHEDULES))
    return 0


def _run_profile(args: argparse.Namespace) -> int:
    import torch

    from ..tools.profile import build_model, profile_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.conv_type, dict(args.model_args), args.input_size)
    report = profile_model(model, args.input_size, args.batch_sizes, args.device,
                           args.min_run_time, args.timing)
    print(f"{args.model} ({args.conv_type or 'its own conv type'})")
    print(report)
    return 0


def _run_fold(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .._io import write_atomically
    from ..tools.fold import fold
    from ..training.loop import load_run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, _, dataset = load_run(args.run)
    if args.calibration_size < 1:
        raise ValueError(f"--calibration-size must be >= 1, got {args.calibration_size}")
    images = dataset.normalize(dataset.train.images[: args.calibration_size])
    calibration = images.split(256)
    test = list(zip(dataset.normalize(dataset.test.images).split(500),
                    dataset.test.labels.split(500)))
    report = fold(model, calibration, test, tolerance=args.tolerance)
    print(report)
    out = Path(args.out) if args.out else Path(args.run) / "folded.pt"
    write_atomically(out, lambda f: torch.save(report.model.state_dict(), f))
    print(f"saved the folded state_dict to {out} (load it into "
          "dynconv.tools.convert.static_twin(model))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a usage error, 130 if stopped by
    Ctrl-C after saving)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("train", "compare") and os.environ.get(KEEP_MEMORY_ENV, "1") != "0":
        keep_freed_memory()  # a step's large tensors are reused, not page-faulted in again
    try:
        if args.command == "list":
            return _run_list()
        if args.command == "train":
            return _run_train(args)
        if args.command == "profile":
            return _run_profile(args)
        if args.command == "fold":
            return _run_fold(args)
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command == "export":
            return _run_export(args)
        return _run_compare(args)
    except (ValueError, TypeError) as error:
        print(f"dynconv {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (FloatingPointError, ImportError) as error:
        print(f"dynconv {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = ("the finished runs are kept; continue with --out DIR --resume"
                 if args.command == "compare" else
                 "the checkpoint of the last finished epoch is kept")
        print(f"dynconv {args.command}: interrupted at once: {saved}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
