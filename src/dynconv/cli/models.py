"""The commands that act on one model, trained or not: ``profile``, ``fold``, ``inspect`` and
``export``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .options import (
    Command,
    add_conv_type,
    add_model_args,
    add_model_source,
    add_out,
    add_threads,
    blame,
    default_out,
    device,
    model_name,
    non_negative_float,
    opset,
    positive_float,
    positive_int,
)

__all__ = ["EXPORT", "FOLD", "INSPECT", "PROFILE", "load_model"]


def load_model(args: argparse.Namespace):
    """(model in eval mode, dataset, a name) from RUN_DIR or --model (:func:`add_model_source`)."""
    import torch

    from ..models import check_model_conv_type, create_model_for_data
    from ..training import load_dataset, load_run

    if (args.run is None) == (args.model is None):
        raise ValueError("give either RUN_DIR (a 'dynconv train' output folder) or --model NAME")
    if args.run is not None:
        if args.conv_type or args.model_args:
            raise ValueError("--conv-type and --model-arg build an untrained --model; a RUN_DIR "
                             "keeps its own")
        dataset = None if args.data is None else load_dataset(args.data)
        model, _, dataset = load_run(args.run, dataset)
        return model, dataset, Path(args.run).name
    with blame("--conv-type"):
        check_model_conv_type(args.model, args.conv_type)
    dataset = load_dataset(args.data or "digits")
    torch.manual_seed(args.seed)
    with blame("--model-arg" if args.model_args else None):
        model = create_model_for_data(args.model, args.conv_type, dataset.num_classes,
                                      dataset.in_channels, min(dataset.image_size),
                                      **dict(args.model_args))
    return model.eval(), dataset, f"{args.model}-{args.conv_type or 'default'}"


# -- profile -------------------------------------------------------------------------------------


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=model_name, metavar="MODEL",
                        help="a model of 'dynconv list'")
    add_conv_type(parser)
    add_model_args(parser)
    parser.add_argument("--input-size", type=positive_int, nargs=3, default=(3, 32, 32),
                        metavar=("C", "H", "W"), help="one image (default: 3 32 32)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=(1, 32),
                        metavar="N",
                        help="batch sizes for latency and memory (default: 1 32)")
    parser.add_argument("--device", type=device, default="cpu",
                        help="'cpu', 'cuda', 'cuda:N' or 'mps' (default: cpu)")
    parser.add_argument("--min-run-time", type=positive_float, default=0.5, metavar="S",
                        help="seconds of timed runs per model and batch size (default: 0.5)")
    parser.add_argument("--no-timing", dest="timing", action="store_false",
                        help="parameters and MACs only")
    add_threads(parser)


def _run_profile(args: argparse.Namespace) -> int:
    from ..models import check_model_conv_type
    from ..tools.profile import build_model, profile_model

    with blame("--conv-type"):
        check_model_conv_type(args.model, args.conv_type)
    with blame("--model-arg" if args.model_args else None):
        model = build_model(args.model, args.conv_type, dict(args.model_args), args.input_size)
    report = profile_model(model, args.input_size, args.batch_sizes, args.device,
                           args.min_run_time, args.timing)
    print(f"{args.model} ({args.conv_type or 'its own conv type'})")
    print(report)
    return 0


PROFILE = Command(
    "profile", "cost per layer and in total, beside the same model with static convs",
    "Parameters and MACs per layer (the per-sample convolution, the attention branch and the "
    "kernel aggregation; see docs/tools.md) and in total, latency (median after warm-up) and "
    "peak memory at each batch size, side by side with the same model built with nn.Conv2d of "
    "the same geometry.",
    _profile_arguments, _run_profile, sets_threads=True,
)


# -- fold ----------------------------------------------------------------------------------------


def _fold_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="output folder of 'dynconv train'")
    parser.add_argument("--calibration-size", type=positive_int, default=512, metavar="N",
                        help="training images used to calibrate (default: 512)")
    parser.add_argument("--tolerance", type=non_negative_float, default=0.1,
                        help="flag layers whose relative kernel spread exceeds this "
                             "(default: 0.1)")
    add_out(parser, "FILE", "where to save the folded state_dict (default: RUN_DIR/folded.pt)")
    add_threads(parser)


def _run_fold(args: argparse.Namespace) -> int:
    from ..tools.checkpoint import save_file
    from ..tools.fold import fold
    from ..training import load_run

    model, _, dataset = load_run(args.run)
    images = dataset.normalize(dataset.train.images[: args.calibration_size])
    calibration = images.split(256)
    test = list(zip(dataset.normalize(dataset.test.images).split(500),
                    dataset.test.labels.split(500)))
    report = fold(model, calibration, test, tolerance=args.tolerance)
    print(report)
    out = Path(args.out) if args.out else Path(args.run) / "folded.pt"
    save_file(report.model.state_dict(), out)
    print(f"saved the folded state_dict to {out} (load it into "
          "dynconv.tools.convert.static_twin(model))")
    return 0


FOLD = Command(
    "fold", "fold a trained run's dynamic layers into static convolutions",
    "Replace each dynamic layer of the model of a 'dynconv train' run by the nn.Conv2d whose "
    "kernel is the layer's effective kernel averaged over calibration images from the training "
    "split; report how much each layer's kernel varies, the test accuracy before and after and "
    "the speed-up, and save the folded state_dict. Trains nothing.",
    _fold_arguments, _run_fold, sets_threads=True,
)


# -- inspect -------------------------------------------------------------------------------------


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    add_out(parser, "DIR", "output folder (default: runs/inspect-<date>-<time>)")
    parser.add_argument("--batch-size", type=positive_int, default=256, metavar="N")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="use the first N test images only (default: all)")


def _run_inspect(args: argparse.Namespace) -> int:
    import torch

    from ..tools.inspection import (
        inspect_attention,
        plot_cell_attention,
        plot_kernel_attention,
        plot_region_maps,
        plot_spatial_attention,
        write_summary,
    )
    from ..training import iterate_test

    model, dataset, _ = load_model(args)
    test = dataset.test
    if args.limit is not None:
        test = type(test)(test.images[: args.limit], test.labels[: args.limit])
    batches = (dataset.normalize(images) for images, _ in iterate_test(test, args.batch_size))
    with torch.no_grad():
        layers = inspect_attention(model, batches)
    out = Path(args.out or default_out("inspect"))
    files = write_summary(layers, out)
    plots = {
        "kernel_attention.png": lambda p: plot_kernel_attention(layers, p),
        "spatial_attention.png": lambda p: plot_spatial_attention(layers, p),
        "region_maps.png": lambda p: plot_region_maps(layers, test.images, p),
        "cell_attention.png": lambda p: plot_cell_attention(layers, p),
    }
    files += [out / name for name, plot in plots.items() if plot(out / name)]
    for layer in layers.values():
        if layer.kernel is not None:
            k = layer.kernel.shape[1]
            print(f"  {layer.name:<32} {layer.layer_type:<14} K={k}  entropy "
                  f"{layer.entropy.mean().item():.3f} / {math.log(k):.3f} nats")
        elif layer.cell_usage is not None:
            m, n = layer.cell_share.shape
            own = layer.cell_share_by_layer().get(layer.name, float("nan"))
            top = ", ".join(f"{i} ({share:.0%})" for i, _, share in layer.top_cells(3))
            print(f"  {layer.name:<32} {layer.layer_type:<14} m={m} n={n}  entropy "
                  f"{layer.cell_entropy.mean().item():.3f} / {math.log(n):.3f} nats, own cells "
                  f"{own:.0%}, most used {top}")
    print(f"{len(layers)} dynamic layers over {len(test)} test images; wrote "
          f"{', '.join(f.name for f in files)} to {out}/")
    return 0


INSPECT = Command(
    "inspect", "plot the attentions of a model's dynamic layers over a dataset",
    "Run a model over the test images and record what each dynamic layer decides: kernel "
    "attention per sample and its entropy, ODConv's channel, filter and spatial attentions, "
    "region maps, KernelWarehouse's weights over its warehouse's cells. Writes PNG plots and "
    "attention_summary.csv/.json to --out.",
    _inspect_arguments, _run_inspect,
)


# -- export --------------------------------------------------------------------------------------


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    add_out(parser, "FILE", "the .onnx file (default: RUN_DIR/model.onnx, or "
                            "<model>-<conv type>.onnx)")
    parser.add_argument("--fixed-batch", type=positive_int, default=None, metavar="N",
                        help="export for batch size N only (default: a dynamic batch)")
    parser.add_argument("--opset", type=opset, default=None,
                        help="ONNX opset, from 18 (default: torch's)")
    parser.add_argument("--check", action="store_true",
                        help="run the file in onnxruntime at batch sizes 1, 3 and 8 and report "
                             "the largest absolute difference from PyTorch")


def _run_export(args: argparse.Namespace) -> int:
    from ..tools.export import export_onnx

    model, dataset, name = load_model(args)
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


EXPORT = Command(
    "export", "export a model to ONNX with a dynamic batch dimension",
    "Export a model to ONNX (torch's torch.export-based exporter), in eval mode at temperature "
    "1 for a trained run, with a dynamic batch dimension. Needs the 'export' extra: pip install "
    "'dynconv[export]'.",
    _export_arguments, _run_export,
)
