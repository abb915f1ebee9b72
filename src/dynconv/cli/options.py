"""What every command of ``dynconv`` is made of: a :class:`Command` (its parser spec beside its
handler), and the options that several commands share, each declared in one place."""

from __future__ import annotations

import argparse
import ast
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = [
    "Command",
    "add_conv_type",
    "add_model_args",
    "add_model_source",
    "add_out",
    "add_threads",
    "add_training_options",
    "default_out",
    "key_value",
]

# an option left out of the namespace unless given (a resumed run tells what was given)
UNSET = argparse.SUPPRESS

# a parser or one of its argument groups (argparse names the group class privately)
if TYPE_CHECKING:
    Target = argparse.ArgumentParser | argparse._ArgumentGroup


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` carries it
    out and returns the exit status. With ``sets_threads``, ``main`` applies ``--threads``
    (``torch.set_num_threads``) before ``run``; train and compare hand it to the run's config."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    sets_threads: bool = False


# -- option values: argparse ``type=`` callables ---------------------------------------------------
# Each parses one value or raises ArgumentTypeError saying what the option accepts; argparse
# then prints "dynconv CMD: error: argument --OPTION: <that>" and exits with status 2.


def _number(parse: type, minimum: float, above: bool = False) -> Callable[[str], Any]:
    """A parser of ints or finite floats >= ``minimum`` (> with ``above``)."""
    kind = "an integer" if parse is int else "a finite number"
    accepts = f"{kind} {'>' if above else '>='} {minimum:g}"

    def number(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (
            value <= minimum if above else value < minimum
        ):
            raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}")
        return value

    return number


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0, above=True)
non_negative_float = _number(float, 0)


def checked(check: Callable[[Any], Any], parse: Callable[[str], Any] = str,
            kind: str = "a value") -> Callable[[str], Any]:
    """A parser that applies ``parse`` (``kind`` says what it takes), then the library's own
    ``check``, which raises a ``ValueError`` or ``TypeError`` saying what it accepts: each rule
    stays in one place."""
    def parse_and_check(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            check(value)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse_and_check


def _model(name: str) -> None:
    from ..models import check_model

    check_model(name)


def _conv_type(name: str) -> None:
    from ..layers.factory import check_conv_type

    check_conv_type(name)


def _compare_row(name: str) -> None:
    from ..training.compare import check_row

    check_row(name)


def _initial_temperature(value: float) -> None:
    from ..layers.temperature import TemperatureSchedule

    TemperatureSchedule("linear", value)


def _seed(value: int) -> None:
    from ..training.config import check_seed

    check_seed(value)


def _opset(value: int) -> None:
    from ..tools.export import check_opset

    check_opset(value)


model_name = checked(_model, kind="a model of 'dynconv list'")
conv_type = checked(_conv_type, kind="a conv type of 'dynconv list'")
compare_row = checked(_compare_row, kind="a conv type of 'dynconv list' or static-wide")
initial_temperature = checked(_initial_temperature, float, "a number >= 1")
opset = checked(_opset, int, "an integer")
seed = checked(_seed, int, "an integer from 0 to 2**64 - 1")


def device(text: str, auto: bool = False) -> str:
    """A device of this machine: 'cpu', 'cuda', 'cuda:N' (N below the number of GPUs), 'mps';
    with ``auto``, also 'auto'."""
    import torch

    accepts = ("'auto', " if auto else "") + "'cpu', 'cuda', 'cuda:N' or 'mps'"
    if auto and text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here (use "
                                             f"{'auto or ' if auto else ''}cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS (Apple GPUs) is not available here")
    return text


def autotune_cache(text: str) -> str:
    """A JSON file of autotuned choices: absent (it will be written), or a dynconv autotune
    cache."""
    from ..functional.tuning import check_cache

    try:
        check_cache(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def training_device(text: str) -> str:
    """:func:`device`, or 'auto' (CUDA if any, else the CPU)."""
    return device(text, auto=True)


def _creatable(path: Path) -> None:
    """Refuse a path whose nearest existing ancestor is not a writable folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(
                    f"{str(path)!r} cannot be created: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(
                    f"{str(path)!r} cannot be created: {str(parent)!r} is not writable")
            return


def out_folder(text: str) -> str:
    """A folder to write into: an existing folder, or one that can be created."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, got the file {text!r}")
    if not path.exists():
        _creatable(path)
    return str(path)


def out_file(text: str) -> str:
    """A file to write: a new one (its folder is created) or one to replace, not a folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file, got the folder {text!r}")
    if not path.exists():
        _creatable(path)
    return str(path)


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, the value as a Python literal, or as the string if it is none)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. width=32), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


@contextmanager
def blame(option: str | None) -> Iterator[None]:
    """Name ``option`` in a ``ValueError`` or ``TypeError`` of the block that stems from its
    value and that argparse cannot check (it depends on the model or the data): 'argument
    --OPTION: <error>'. ``None`` blames nothing."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if option is None:
            raise
        raise ValueError(f"argument {option}: {error}") from None


def default_out(command: str) -> str:
    """``runs/<command>-<date>-<time>``."""
    return str(Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def add_threads(target: Target, default: Any = None) -> None:
    target.add_argument("--threads", type=positive_int, default=default, metavar="N",
                        help="CPU threads for torch (default: torch's choice)")


def add_model_args(target: Target, default: Any = None,
                   help: str = "keyword for the model, repeatable") -> None:
    target.add_argument("--model-arg", dest="model_args", type=key_value, action="append",
                        default=[] if default is None else default, metavar="KEY=VALUE",
                        help=help)


def add_conv_type(target: Target, default: Any = None, note: str = "") -> None:
    target.add_argument("--conv-type", type=conv_type, default=default, metavar="TYPE",
                        help=f"convolution type (default: the model's own{note})")


def add_out(target: Target, metavar: str, help: str, default: Any = None) -> None:
    """``--out DIR`` (a folder, :func:`out_folder`) or ``--out FILE`` (:func:`out_file`)."""
    kind = {"DIR": out_folder, "FILE": out_file}[metavar]
    target.add_argument("--out", type=kind, default=default, metavar=metavar, help=help)


def add_training_options(parser: argparse.ArgumentParser, compare: bool) -> None:
    """The options shared by ``train`` and ``compare`` (defaults left out of the namespace, so
    that a resumed run can tell what was given)."""
    from ..training.data import EVAL_SPLITS

    S = UNSET
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=S, metavar="SOURCE",
                      help="'mnist' (default: MNIST, from the wheel the set-up fetched), "
                           "'digits' (scikit-learn's handwritten digits, no download), a "
                           "CIFAR-10/CIFAR-100 python-pickle folder, or an ImageFolder folder "
                           "(<class>/<image>, optionally in train/ and test/)")
    data.add_argument("--image-size", type=positive_int, default=S, metavar="N",
                      help="resize ImageFolder images to N x N (shorter side, centre crop)")
    data.add_argument("--train-images", type=positive_int, default=S, metavar="N",
                      help="train on a fixed, stratified subset of N training images, the same "
                           "for every seed" + (" and type" if compare else "")
                           + (" (default: 5,000 for MNIST, else all)" if compare else
                              " (default: all)"))
    data.add_argument("--eval-every", type=positive_int, default=S, metavar="N",
                      help="evaluate every N epochs and after the last (default: "
                           + ("3" if compare else "1") + "); the per-image predictions and "
                           "every reported accuracy are the last epoch's")
    data.add_argument("--eval-on", choices=EVAL_SPLITS, default=S,
                      help="evaluate on the test images (default) or on a validation split "
                           "(MNIST's own 10,000 images, else a fixed, stratified fifth of the "
                           "training images, then not trained on): choose recipes on 'val'")
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=model_name, default=S, metavar="NAME",
                       help="a model of 'dynconv list' (default: small_cnn)")
    add_model_args(model, S, "keyword for the model, repeatable (e.g. width=32, "
                             "conv_kwargs={'num_kernels': 2}, stem=imagenet)")
    recipe = parser.add_argument_group(
        "recipe", "defaults: seed 002's CIFAR recipe" + (
            "; compare trains 6 epochs" if compare else
            "; 200 epochs on CIFAR, 15 on MNIST, 30 on the digits, 100 otherwise"))
    recipe.add_argument("--epochs", type=positive_int, default=S, metavar="N")
    recipe.add_argument("--batch-size", type=positive_int, default=S, metavar="N",
                        help="global batch size (default: 128)")
    recipe.add_argument("--lr", type=positive_float, default=S,
                        help="SGD learning rate (default: 0.1)")
    recipe.add_argument("--momentum", type=non_negative_float, default=S, metavar="M",
                        help="(default: 0.9)")
    recipe.add_argument("--weight-decay", type=non_negative_float, default=S, metavar="WD",
                        help="(default: 5e-4)")
    recipe.add_argument("--lr-schedule", choices=("cosine", "multistep", "constant"), default=S,
                        help="per epoch (default: cosine)")
    recipe.add_argument("--lr-milestones", type=positive_int, nargs="+", default=S,
                        metavar="EPOCH",
                        help="epochs where multistep multiplies the lr by --lr-gamma")
    recipe.add_argument("--lr-gamma", type=non_negative_float, default=S, metavar="G",
                        help="(default: 0.1)")
    recipe.add_argument("--crop-padding", type=non_negative_int, default=S, metavar="PIXELS",
                        help="random crop after this much zero padding (default: 4 on CIFAR, "
                             "0 on MNIST, 1 on the digits, 1/8 of the size on folders; 0 turns "
                             "it off)")
    recipe.add_argument("--flip", action=argparse.BooleanOptionalAction, default=S,
                        help="random horizontal flip (default: on, off for MNIST and the "
                             "digits)")
    temperature = parser.add_argument_group("attention temperature")
    temperature.add_argument(
        "--temperature", choices=("linear", "step", "none"), default=S,
        help="annealing: 'linear' (ODConv: per iteration from 30 to 1 over the first "
             "--temperature-epochs), 'step' (DY-Conv: 34, minus 3 per epoch, down to 1), "
             "'none' (1). Evaluation always runs at 1 (default: linear)")
    temperature.add_argument("--temperature-init", dest="temperature_initial",
                             type=initial_temperature,
                             default=S, metavar="T", help="start (default: 30 linear, 34 step)")
    temperature.add_argument("--temperature-epochs", type=positive_int, default=S, metavar="N",
                             help="length of the linear annealing (default: "
                                  + ("a fifth of the epochs)" if compare else "10)"))
    run = parser.add_argument_group("run")
    add_out(run, "DIR", "output folder (default: runs/<command>-<date>-<time>)", S)
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its checkpoint"
                          + (" (finished runs are kept)" if compare else ""))
    run.add_argument("--device", type=training_device, default=S,
                     help="'auto' (default: CUDA if any), 'cpu', 'cuda:N'")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=S,
                     help="mixed precision (default: on CUDA only)")
    run.add_argument("--autotune", action="store_true", default=S,
                     help="time every exact formulation of each new layer shape once and keep "
                          "the fastest (as torch.backends.cudnn.benchmark); reported at the end")
    run.add_argument("--autotune-cache", type=autotune_cache, default=S, metavar="FILE",
                     help="autotune (implies --autotune), reading earlier choices from FILE "
                          "(JSON) and adding the new ones to it")
    add_threads(run, S)
    run.add_argument("--quiet", action="store_true", default=S,
                     help="no progress bar and no per-epoch line")


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR (a trained run) or an untrained ``--model``, and the data to run on."""
    parser.add_argument("run", nargs="?", default=None, metavar="RUN_DIR",
                        help="the output folder of 'dynconv train' (its model and data)")
    source = parser.add_argument_group(
        "untrained model", "instead of RUN_DIR: build a model, initialised with --seed")
    source.add_argument("--model", type=model_name, default=None, metavar="NAME",
                        help="a model of 'dynconv list'")
    add_conv_type(source)
    add_model_args(source)
    source.add_argument("--seed", type=seed, default=0, help="(default: 0)")
    parser.add_argument("--data", default=None, metavar="SOURCE",
                        help="images to run on and build the model for (default: the run's, "
                             "or 'digits')")
