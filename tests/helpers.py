"""Shared test helpers: compare outputs and gradients of two computations."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch
from torch import Tensor

from dynconv.functional import mixture, per_sample

TOL = {"rtol": 1e-10, "atol": 1e-10}


def outputs_and_grads(
    fn: Callable[[], Tensor], inputs: Sequence[Tensor], upstream: Tensor | None = None
) -> tuple[Tensor, list[Tensor | None], Tensor]:
    """Run ``fn``, backpropagate a fixed random upstream gradient, return (out, grads, upstream)."""
    for t in inputs:
        t.grad = None
    out = fn()
    if upstream is None:
        upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    grads = [None if t.grad is None else t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return out.detach(), grads, upstream


def assert_same_outputs_and_grads(
    fn: Callable[[], Tensor], reference: Callable[[], Tensor], inputs: Sequence[Tensor], **tol
) -> None:
    """Assert ``fn`` and ``reference`` agree on the output and on the gradient of every input."""
    tol = {**TOL, **tol}
    ref_out, ref_grads, upstream = outputs_and_grads(reference, inputs)
    out, grads, _ = outputs_and_grads(fn, inputs, upstream)
    torch.testing.assert_close(out, ref_out, **tol)
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=False)):
        if g is None or rg is None:  # no gradient at all must mean a zero gradient
            other = rg if g is None else g
            assert other is None or not other.any(), f"input {i}: only one side has a gradient"
            continue
        torch.testing.assert_close(g, rg, **tol, msg=lambda m, i=i: f"input {i}: {m}")


def second_derivatives(fn: Callable[[], Tensor], inputs: Sequence[Tensor], seed: int = 0
                       ) -> tuple[Tensor, ...]:
    """The gradient of ``sum_i <grad_i, v_i>`` for the first gradients ``grad_i`` of
    ``<fn(), u>`` with respect to ``inputs``: fixed random ``u`` and ``v_i`` (``seed``), one
    double backward through ``fn``."""
    gen = torch.Generator().manual_seed(seed)
    out = fn()
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    firsts = torch.autograd.grad((out * upstream).sum(), inputs, create_graph=True)
    total = sum((g * torch.randn(g.shape, dtype=g.dtype, generator=gen)).sum() for g in firsts)
    return torch.autograd.grad(total, inputs)


def assert_same_second_derivatives(fn: Callable[[], Tensor], reference: Callable[[], Tensor],
                                   inputs: Sequence[Tensor], **tol) -> None:
    """Double backward through ``fn`` equals double backward through ``reference`` (float64:
    exact to rounding), for every input."""
    tol = {**TOL, **tol}
    got, want = second_derivatives(fn, inputs), second_derivatives(reference, inputs)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, i=i: f"input {i}: {m}")


@contextlib.contextmanager
def recomputing(chunk_bytes: int = 1) -> Iterator[None]:
    """Per-sample kernels (the aggregate method) and im2col buffers (the unfold method)
    recomputed in backward at any size; with gradients, the aggregate through 'grouped' or
    'unfold' runs in chunks of ``chunk_bytes`` of kernels (1: one sample a chunk)."""
    with mock.patch.object(per_sample, "_RECOMPUTE_MIN_BYTES", 0), \
            mock.patch.object(mixture, "_CHUNK_KERNEL_BYTES", chunk_bytes):
        yield


def saved_storages(fn: Callable[[], object]) -> dict[int, int]:
    """What autograd keeps for backward while ``fn()`` runs: bytes per distinct storage."""
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved
