"""ONNX export of any model holding dynconv layers, with a batch dimension that stays dynamic.

The public implementations fold the batch into the ``groups`` of one convolution, a constant of
the exported graph, so their ONNX files run at the batch size of the export only. While the model
is traced for export, :mod:`dynconv.functional` dispatches to formulations whose graph holds for
any batch (see :func:`dynconv.functional.is_exporting`), so the file exported here runs at any
batch size. ``onnx`` and ``onnxruntime`` come with the ``export`` extra:
``pip install 'dynconv[export]'``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.base import DynamicConvBase

__all__ = ["MIN_OPSET", "ExportResult", "check_onnx", "check_opset", "export_onnx",
           "fixed_batch_layers"]

_INPUT, _OUTPUT = "input", "output"
#: The lowest ONNX opset torch's exporter implements: it writes a lower one by converting the
#: file with onnx's version converter, which fails for many operators and then keeps the file
#: at this opset without an error.
MIN_OPSET = 18


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote.

    ``dynamic_batch``: whether the file takes any batch size (else only ``batch_size``);
    ``fixed_batch_layers``: the layers that forced a fixed batch; ``max_abs_diff``: batch size ->
    largest absolute difference between onnxruntime and PyTorch (filled by ``check``).
    """

    path: Path
    dynamic_batch: bool
    batch_size: int
    input_shape: list[int]
    fixed_batch_layers: list[str] = field(default_factory=list)
    max_abs_diff: dict[int, float] = field(default_factory=dict)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs the package {module!r}: pip install 'dynconv[export]' "
            "(onnx, onnxruntime, onnxscript)"
        ) from error


def check_opset(opset_version: object) -> int:
    """Return ``opset_version`` if torch's exporter writes it: an int from :data:`MIN_OPSET` to
    the newest opset of the installed ``onnx``; raise a ``ValueError`` saying the range."""
    try:
        import onnx
    except ImportError:
        newest = None  # export_onnx says how to install it
    else:
        newest = int(onnx.defs.onnx_opset_version())
    accepted = f"{MIN_OPSET} to {newest}" if newest else f">= {MIN_OPSET}"
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or not (
        MIN_OPSET <= opset_version <= (newest or opset_version)
    ):
        raise ValueError(f"the ONNX opset must be an integer from {accepted} (those torch's "
                         f"exporter writes), got {opset_version!r}")
    return opset_version


def fixed_batch_layers(model: nn.Module) -> list[str]:
    """Names of the dynconv layers of ``model`` that cannot be exported with a dynamic batch
    (``export_dynamic_batch = False`` on their class)."""
    return [
        name for name, m in model.named_modules()
        if isinstance(m, DynamicConvBase) and not m.export_dynamic_batch
    ]


def _check_arguments(model: Any, example_input: Any, batches: Sequence[int]) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(
            f"example_input must be a torch.Tensor [N, ...], got {type(example_input).__name__}"
        )
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError(
            f"example_input must have a batch dimension of at least 1, got shape "
            f"{list(example_input.shape)}"
        )
    bad = [b for b in batches if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad:
        raise ValueError(f"check batches must be ints >= 1, got {list(batches)}")


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: Tensor,
    dynamic_batch: bool = True,
    *,
    opset_version: int | None = None,
    check: bool = False,
    check_batches: Sequence[int] = (1, 3, 8),
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` to the ONNX file ``path`` with torch's exporter (``torch.export``-based).

    The model is exported in eval mode at its current temperature (its mode is restored after).
    The file has one input ``input`` [batch, ...] and one output ``output``.

    Args:
        model: any module; its dynconv layers export with a dynamic batch.
        path: the ``.onnx`` file to write (weights inside the file).
        example_input: an input [N, ...] of the shape the file will take (its batch size is the
            one used if the batch is fixed; with a dynamic batch, a batch of 1 is repeated to 2,
            as ``torch.export`` treats a size of 1 as a constant).
        dynamic_batch: export the batch dimension as dynamic. A model holding a layer that
            cannot (:func:`fixed_batch_layers`) is exported at the example's batch size, with a
            warning naming the layers.
        opset_version: the ONNX opset (default: the exporter's; see :func:`check_opset`).
        check: run the file in onnxruntime at the batch sizes ``check_batches`` (the export batch
            only, if fixed) on random inputs, record the largest absolute difference from PyTorch
            in ``max_abs_diff`` and raise a ``ValueError`` if one exceeds ``atol``.

    Returns:
        :class:`ExportResult`. The file always passes ``onnx.checker``.
    """
    _check_arguments(model, example_input, check_batches)
    onnx = _require("onnx")
    if opset_version is not None:
        check_opset(opset_version)
    fixed = fixed_batch_layers(model) if dynamic_batch else []
    if fixed:
        warnings.warn(
            f"{len(fixed)} layer(s) cannot be exported with a dynamic batch: "
            f"{', '.join(f'{n} ({type(model.get_submodule(n)).__name__})' for n in fixed)}; "
            f"exporting for batch size {example_input.shape[0]} only",
            stacklevel=2,
        )
        dynamic_batch = False
    x = example_input.detach()
    if dynamic_batch and x.shape[0] == 1:
        x = x.expand(2, *x.shape[1:]).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=[_INPUT], output_names=[_OUTPUT], opset_version=opset_version,
                external_data=False, verbose=False,
            )
    finally:
        model.train(training)
    onnx.checker.check_model(str(path), full_check=True)
    result = ExportResult(path, dynamic_batch, int(x.shape[0]), list(x.shape[1:]), fixed)
    if check:
        batches = list(check_batches) if dynamic_batch else [result.batch_size]
        result.max_abs_diff = check_onnx(model, path, result.input_shape, batches)
        worst = {b: d for b, d in result.max_abs_diff.items() if not d <= atol}
        if worst:
            raise ValueError(
                f"{path}: onnxruntime differs from PyTorch by more than atol={atol:g}: "
                f"max abs diff per batch size {worst}"
            )
    return result


def check_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    batches: Sequence[int] = (1, 3, 8),
    seed: int = 0,
) -> dict[int, float]:
    """Run the ONNX file ``path`` in onnxruntime (CPU) and ``model`` in eval mode on the same
    random inputs [b, *input_shape] for each b in ``batches``; return b -> max abs difference."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    parameter = next(model.parameters(), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    training = model.training
    model.eval()
    diffs: dict[int, float] = {}
    try:
        for b in batches:
            x = torch.randn(b, *input_shape, generator=generator, dtype=dtype)
            with torch.no_grad():
                expected = model(x.to(_device(model))).cpu()
            got = torch.from_numpy(session.run([_OUTPUT], {_INPUT: x.numpy()})[0])
            if list(got.shape) != list(expected.shape):
                raise ValueError(
                    f"{path}: onnxruntime returned shape {list(got.shape)} at batch {b}, "
                    f"PyTorch {list(expected.shape)}"
                )
            diffs[b] = (got.double() - expected.double()).abs().max().item()
    finally:
        model.train(training)
    return diffs


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device
