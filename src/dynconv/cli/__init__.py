"""The ``dynconv`` command: ``compare``, ``train``, ``profile``, ``fold``, ``inspect``, ``export``
and ``list``.

Each command is a :class:`~dynconv.cli.options.Command` (parser spec beside its handler):
``compare``, ``train`` and ``list`` in :mod:`dynconv.cli.training`, the commands that act on
one model in :mod:`dynconv.cli.models`; the options they share are declared once, in
:mod:`dynconv.cli.options`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._version import __version__
from ..allocator import keep_freed_memory
from . import models, training

__all__ = ["KEEP_MEMORY_ENV", "main"]

# train and compare call keep_freed_memory() unless this is "0"
KEEP_MEMORY_ENV = "DYNCONV_KEEP_FREED_MEMORY"

#: The commands, in the order ``dynconv --help`` lists them.
COMMANDS = (training.COMPARE, training.TRAIN, models.PROFILE, models.FOLD, models.INSPECT,
            models.EXPORT, training.LIST)

_DESCRIPTION = """\
Dynamic convolutions for PyTorch: compare convolution types, train models.

  dynconv compare                 train a small network with every convolution type on MNIST
                                  (3 seeds) and print a table
  dynconv compare --data DIR      the same on CIFAR-10/100, an ImageFolder folder or 'digits'
  dynconv train --model resnet18 --conv-type odconv --data ~/data/cifar-10-batches-py
  dynconv train --out DIR --resume          continue a stopped run
  dynconv inspect RUN_DIR         plot what the dynamic layers of a trained model decide
  dynconv export RUN_DIR --check  ONNX file with a dynamic batch, checked in onnxruntime
  dynconv list                    models, convolution types, data sources, schedules
  dynconv profile resnet18 --conv-type dynamic --batch-sizes 1 32
                                  parameters, MACs, latency and memory beside static convs
  dynconv fold runs/train-...     fold a trained run's dynamic layers into static convs

Run 'dynconv COMMAND --help' for the options of each command."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynconv", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dynconv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help,
                                    description=command.description)
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a usage error, 130 if stopped by
    Ctrl-C after saving)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # as argparse does for a missing argument: usage, one line, 2
        parser.error(f"a command is required: one of {', '.join(c.name for c in COMMANDS)} "
                     "('dynconv --help' says what each does)")
    command = next(c for c in COMMANDS if c.name == args.command)
    if args.command in ("train", "compare") and os.environ.get(KEEP_MEMORY_ENV, "1") != "0":
        keep_freed_memory()  # a step's large tensors are reused, not page-faulted in again
    try:
        if command.sets_threads and args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        return command.run(args)
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
