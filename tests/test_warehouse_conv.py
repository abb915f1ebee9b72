"""warehouse_conv2d (KernelWarehouse's op) and mix_cells against a plain per-sample reference in
float64: the cells put in place by explicit loops, then one F.conv2d per sample; every
per-sample method, the whole batch's kernels and chunks of samples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynconv.functional import mix_cells, warehouse_conv2d
from dynconv.testing import reference_per_sample_conv2d

from helpers import (
    assert_same_outputs_and_grads,
    assert_same_second_derivatives,
    recomputing,
    saved_storages,
)

F64 = torch.float64


def placed_cells(attention, cells, kernel_shape):
    """The kernels [N, C_out, C_in/g, kH, kW] by the definition: cell j = (s, o, i) of the grid
    (positions, output channels, input channels; the official order) is the mixture
    ``attention[:, j] @ cells``, written at output block o, input block i and kernel position
    s (1x1 cells) or over the whole kernel (cells of the kernel's size)."""
    c_out, c_in_g, kh, kw = kernel_shape
    cell_out, cell_in, ckh, ckw = cells.shape[1:]
    spatial = kh * kw // (ckh * ckw)
    outs, ins = c_out // cell_out, c_in_g // cell_in
    rows = []
    for n in range(attention.shape[0]):
        kernel = attention.new_zeros(kernel_shape)
        for j in range(attention.shape[1]):
            s, rest = divmod(j, outs * ins)
            o, i = divmod(rest, ins)
            mixed = torch.einsum("k,koihw->oihw", attention[n, j], cells)
            block = (slice(o * cell_out, (o + 1) * cell_out), slice(i * cell_in, (i + 1) * cell_in))
            if spatial == 1:
                kernel[block] = mixed
            else:
                kernel[(*block, s // kw, s % kw)] = mixed[..., 0, 0]
        rows.append(kernel)
    return torch.stack(rows) if rows else attention.new_zeros(0, *kernel_shape)


@st.composite
def warehouse_calls(draw):
    batch = draw(st.sampled_from([0, 1, 2, 3, 5]))
    # the grid first: 1-3 cells along the output channels, 1-2 along the input channels
    outs, ins = draw(st.sampled_from([2, 3, 1])), draw(st.sampled_from([2, 1]))
    groups = draw(st.sampled_from([1, 2, "depthwise"]))
    if groups == "depthwise":  # C_in/g = 1: one cell along the input channels
        ins, cell_in, cell_out = 1, 1, draw(st.sampled_from([1, 2]))
        c_in = c_out = groups = outs * cell_out
    else:
        cell_in, cell_out = draw(st.sampled_from([1, 3])), groups * draw(st.sampled_from([1, 2]))
        c_in, c_out = groups * ins * cell_in, outs * cell_out
    c_in_g = c_in // groups
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (3, 2)]))
    spatial = draw(st.booleans())
    cell_size = (1, 1) if spatial else kernel
    m = (kernel[0] * kernel[1] // (cell_size[0] * cell_size[1])) * (c_out // cell_out) * (
        c_in_g // cell_in)
    return {
        "batch": batch, "c_in": c_in, "c_out": c_out, "groups": groups, "kernel": kernel,
        "cells": (draw(st.integers(1, 4)), cell_out, cell_in, *cell_size), "m": m,
        "stride": draw(st.integers(1, 2)), "padding": draw(st.integers(0, 1)),
        "dilation": draw(st.integers(1, 2)), "bias": draw(st.booleans()),
        "size": draw(st.integers(5, 7)), "chunk": draw(st.sampled_from([1, 10**9])),
    }


@settings(max_examples=50, deadline=None)
@given(call=warehouse_calls(), seed=st.integers(0, 2**31 - 1))
def test_warehouse_conv2d_matches_reference(call, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(call["batch"], call["c_in"], call["size"], call["size"], dtype=F64,
                    generator=gen, requires_grad=True)
    attention = torch.randn(call["batch"], call["m"], call["cells"][0], dtype=F64,
                            generator=gen, requires_grad=True)
    cells = torch.randn(*call["cells"], dtype=F64, generator=gen, requires_grad=True)
    bias = torch.randn(call["c_out"], dtype=F64, generator=gen, requires_grad=True) if (
        call["bias"]) else None
    conv = {"stride": call["stride"], "padding": call["padding"], "dilation": call["dilation"],
            "groups": call["groups"]}
    kernel_shape = (call["c_out"], call["c_in"] // call["groups"], *call["kernel"])
    inputs = [t for t in (x, attention, cells, bias) if t is not None]

    def reference():
        kernels = placed_cells(attention, cells, kernel_shape)
        biases = None if bias is None else bias.expand(call["batch"], -1)
        return reference_per_sample_conv2d(x, kernels, biases, **conv)

    torch.testing.assert_close(mix_cells(attention, cells, kernel_shape),
                               placed_cells(attention, cells, kernel_shape), rtol=0, atol=1e-12)
    methods = ["auto", "grouped", "unfold", "loop"] + (["direct"] if call["batch"] <= 1 else [])
    for method in methods:  # the whole batch's kernels, kept for backward
        assert_same_outputs_and_grads(
            lambda m=method: warehouse_conv2d(x, attention, cells, call["kernel"], bias, **conv,
                                              method=m), reference, inputs)
    # recomputed in backward: 'grouped' and 'unfold' in chunks of one sample (chunk 1) or of
    # the whole batch, 'loop' from a recipe
    with recomputing(call["chunk"]):
        for method in methods:
            assert_same_outputs_and_grads(
                lambda m=method: warehouse_conv2d(x, attention, cells, call["kernel"], bias,
                                                  **conv, method=m), reference, inputs)


def _layer_tensors(n=5, dtype=F64, spatial=True):
    """An input [n, 4, 7, 7], and for a 3x3 kernel [6, 4] cut into 1x1 (``spatial``) or 3x3
    cells [3, 2], its attention over 5 cells and the cells."""
    gen = torch.Generator().manual_seed(21)
    cell = (1, 1) if spatial else (3, 3)
    m = (9 if spatial else 1) * 2 * 2
    x = torch.randn(n, 4, 7, 7, dtype=dtype, generator=gen, requires_grad=True)
    attention = torch.randn(n, m, 5, dtype=dtype, generator=gen, requires_grad=True)
    cells = torch.randn(5, 3, 2, *cell, dtype=dtype, generator=gen, requires_grad=True)
    return x, attention, cells


@pytest.mark.parametrize("method", ["grouped", "unfold"])
@pytest.mark.parametrize("spatial", [False, True])
def test_chunked_cells_save_no_kernels(method, spatial):
    """With gradients and large kernels, only the input, the attention and the cells are kept
    for backward: the kernels exist a chunk of samples at a time."""
    x, attention, cells = _layer_tensors(8, torch.float32, spatial)
    with recomputing(chunk_bytes=2 * 6 * 4 * 9 * 4):  # two samples a chunk
        saved = saved_storages(lambda: warehouse_conv2d(x, attention, cells, 3, padding=1,
                                                        method=method))
    assert set(saved) == {t.untyped_storage().data_ptr() for t in (x, attention, cells)}, saved


@pytest.mark.parametrize("method", ["grouped", "unfold", "loop"])
def test_chunked_cells_double_backward(method):
    """Five samples in chunks of two (the kernels recomputed for 'loop'): the second derivatives
    equal the reference's."""
    x, attention, cells = _layer_tensors()
    with recomputing(chunk_bytes=2 * 6 * 4 * 9 * 8):
        assert_same_second_derivatives(
            lambda: warehouse_conv2d(x, attention, cells, 3, stride=2, padding=1, method=method),
            lambda: reference_per_sample_conv2d(
                x, placed_cells(attention, cells, (6, 4, 3, 3)), stride=2, padding=1),
            (x, attention, cells))


def test_warehouse_conv2d_errors():
    x, attention, cells = _layer_tensors(2)
    with pytest.raises(ValueError, match=r"cells must have shape \[K, c_out, c_in, ckH, ckW\]"):
        warehouse_conv2d(x, attention, cells[0], 3)
    with pytest.raises(ValueError, match=r"attention must have shape \[N, m, K\] with N = 2"):
        warehouse_conv2d(x, attention[:, :, :4], cells, 3)
    with pytest.raises(ValueError, match="attention's 35 cells a kernel"):
        warehouse_conv2d(x, attention[:, :35], cells, 3)
    with pytest.raises(ValueError, match=r"cannot partition a kernel"):
        warehouse_conv2d(x, attention[:, :4], cells.new_zeros(5, 3, 2, 2, 2), 3)
    with pytest.raises(ValueError, match=r"bias must have shape \[C_out\] = \[6\]"):
        warehouse_conv2d(x, attention, cells, 3, bias=torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="method must be one of"):
        warehouse_conv2d(x, attention, cells, 3, method="bogus")
    with pytest.raises(TypeError, match="warehouse_conv2d"):
        warehouse_conv2d(x.float(), attention, cells, 3)


@pytest.mark.parametrize("method", ["grouped", "unfold", "loop"])
def test_recomputed_cells_under_autocast(method):
    """Under autocast the cells are mixed in bfloat16; backward, which runs without autocast,
    recomputes the kernels the same way: with the whole batch a chunk (or a recipe, 'loop'),
    the kept kernels' outputs and gradients bit for bit; a sample a chunk, to bfloat16's
    rounding (the cells' gradient is then a float32 sum of per-chunk products)."""
    x, attention, cells = _layer_tensors(4, torch.float32)
    inputs = (x, attention, cells)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = warehouse_conv2d(x, attention, cells, 3, padding=1, method=method)
        return [out, *torch.autograd.grad(out.float().square().sum(), inputs)]

    kept = run()
    with recomputing(chunk_bytes=2**30):
        recomputed = run()
    for got, expected in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with recomputing():
        chunked = run()
    for got, expected in zip(chunked, kept, strict=True):
        assert got.dtype == expected.dtype
        assert (got.float() - expected.float()).norm() <= 1e-2 * expected.float().norm()
