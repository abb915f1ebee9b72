"""The core op against one F.conv2d per sample, every formulation forced in turn."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dynconv.functional import (
    MIXTURE_METHODS,
    PER_SAMPLE_METHODS,
    adaptive_avg_pool2d_matmul,
    mix_kernels,
    mixture,
    mixture_conv2d,
    per_sample_conv2d,
)
from dynconv.functional.mixture import _choose_mixture_method
from dynconv.functional.per_sample import _choose_per_sample_method
from dynconv.testing import reference_per_sample_conv2d

from helpers import (
    assert_same_outputs_and_grads,
    assert_same_second_derivatives,
    recomputing,
    saved_storages,
)
from strategies import EMPTY_BATCH, ConvConfig, conv_configs

F64 = torch.float64


def _tensors(cfg: ConvConfig, generator: torch.Generator, num_kernels: int | None = None):
    n, c_in, c_out = cfg.batch, cfg.in_channels, cfg.out_channels
    lead = (n,) if num_kernels is None else (num_kernels,)
    x = torch.randn(n, c_in, cfg.height, cfg.width, dtype=F64, generator=generator)
    w = torch.randn(*lead, c_out, c_in // cfg.groups, *cfg.kernel_size, dtype=F64,
                    generator=generator)
    b = torch.randn(*lead, c_out, dtype=F64, generator=generator) if cfg.bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b)]


def _methods(batch: int) -> list[str]:
    """Every method that runs at this batch size: all of them on an empty batch."""
    return [m for m in PER_SAMPLE_METHODS if m != "direct" or batch <= 1]


@settings(max_examples=200)
@given(cfg=conv_configs(padding_modes=("zeros",)), seed=st.integers(0, 2**31 - 1))
@example(cfg=EMPTY_BATCH, seed=0)
def test_per_sample_conv2d_matches_reference(cfg: ConvConfig, seed: int) -> None:
    x, w, b = _tensors(cfg, torch.Generator().manual_seed(seed))
    inputs = [t for t in (x, w, b) if t is not None]
    kw = cfg.conv_kwargs()
    for method in _methods(cfg.batch):
        assert_same_outputs_and_grads(
            lambda m=method: per_sample_conv2d(x, w, b, **kw, method=m),
            lambda: reference_per_sample_conv2d(x, w, b, **kw),
            inputs,
        )
    with recomputing():  # the im2col buffer unfolded again in backward
        assert_same_outputs_and_grads(
            lambda: per_sample_conv2d(x, w, b, **kw, method="unfold"),
            lambda: reference_per_sample_conv2d(x, w, b, **kw),
            inputs,
        )


@settings(max_examples=200)
@given(
    cfg=conv_configs(padding_modes=("zeros",)),
    num_kernels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    chunked=st.sampled_from(["auto", "grouped", "unfold"]),
)
@example(cfg=EMPTY_BATCH, num_kernels=3, seed=0, chunked="unfold")
def test_mixture_conv2d_matches_reference(cfg: ConvConfig, num_kernels: int, seed: int,
                                          chunked: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, bank, bias_bank = _tensors(cfg, gen, num_kernels)
    coeffs = torch.randn(cfg.batch, num_kernels, dtype=F64, generator=gen).requires_grad_()
    inputs = [t for t in (x, coeffs, bank, bias_bank) if t is not None]
    kw = cfg.conv_kwargs()

    def reference():
        weight = torch.einsum("nk,koihw->noihw", coeffs, bank)
        bias = None if bias_bank is None else coeffs @ bias_bank
        return reference_per_sample_conv2d(x, weight, bias, **kw)

    _check_every_mixture_method(lambda **m: mixture_conv2d(x, coeffs, bank, bias_bank, **kw, **m),
                                reference, inputs, chunked)


def _check_every_mixture_method(mixture, reference, inputs, chunked: str = "auto") -> None:
    """``mixture(method=...)`` against ``reference`` for every method, and with the per-sample
    kernels and im2col buffers recomputed in backward: the aggregate through per-sample method
    ``chunked``, one sample a chunk where it is 'grouped' or 'unfold'."""
    for method in MIXTURE_METHODS:
        assert_same_outputs_and_grads(lambda m=method: mixture(method=m), reference, inputs)
    with recomputing():
        assert_same_outputs_and_grads(
            lambda: mixture(method="aggregate", per_sample_method=chunked), reference, inputs)


def test_mix_kernels_is_the_weighted_sum_of_the_bank() -> None:
    gen = torch.Generator().manual_seed(0)
    coeffs = torch.randn(3, 4, dtype=F64, generator=gen)
    bank = torch.randn(4, 6, 2, 3, 3, dtype=F64, generator=gen)
    biases = torch.randn(4, 6, dtype=F64, generator=gen)
    kernels = mix_kernels(coeffs, bank)
    assert kernels.shape == (3, 6, 2, 3, 3)
    torch.testing.assert_close(kernels, torch.einsum("nk,koihw->noihw", coeffs, bank))
    torch.testing.assert_close(mix_kernels(coeffs, biases), coeffs @ biases)


def test_gradcheck_small_cases() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 4, dtype=F64, generator=gen, requires_grad=True)
    w = torch.randn(2, 6, 2, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    b = torch.randn(2, 6, dtype=F64, generator=gen, requires_grad=True)
    for method in ("grouped", "loop", "unfold"):
        assert torch.autograd.gradcheck(
            lambda x, w, b, m=method: per_sample_conv2d(
                x, w, b, stride=(1, 2), padding=1, dilation=(2, 1),
                groups=2, method=m,
            ),
            (x, w, b),
        )
    coeffs = torch.randn(2, 3, dtype=F64, generator=gen, requires_grad=True)
    bank = torch.randn(3, 6, 4, 3, 3, dtype=F64, generator=gen, requires_grad=True)
    for method in MIXTURE_METHODS[1:]:
        assert torch.autograd.gradcheck(
            lambda x, c, k, m=method: mixture_conv2d(x, c, k, padding="same", method=m),
            (x, coeffs, bank),
        )


@pytest.mark.parametrize("method", ["auto", "grouped", "loop", "unfold"])
def test_channels_last_inputs_and_weights(method: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 9, 7, generator=gen, dtype=F64)
    w = torch.randn(3, 4, 8, 3, 3, generator=gen, dtype=F64)
    expected = reference_per_sample_conv2d(x, w, None, padding=1)
    x_cl = x.to(memory_format=torch.channels_last)
    # A per-sample weight in channels_last strides (as it comes from a channels_last bank).
    w_cl = w.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert not w_cl.is_contiguous()
    out = per_sample_conv2d(x_cl, w_cl, None, padding=1, method=method)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_batch_one_uses_a_plain_convolution() -> None:
    x = torch.randn(1, 3, 8, 8, dtype=F64)
    w = torch.randn(1, 5, 3, 3, 3, dtype=F64)
    torch.testing.assert_close(
        per_sample_conv2d(x, w, padding=1), torch.nn.functional.conv2d(x, w[0], padding=1)
    )


@pytest.mark.parametrize("kept", [False, True])
def test_mixture_dispatch_rule(kept: bool, monkeypatch) -> None:
    from dynconv import allocator
    from dynconv._conv_args import parse_geometry

    monkeypatch.setattr(allocator, "freed_memory_is_kept", lambda: kept)

    def choose(n, c, size, groups=1, grad=False, spatial=False):
        x = torch.zeros(n, c, size, size, requires_grad=grad)
        bank = torch.zeros(4, c, c // groups, 3, 3)
        return _choose_mixture_method(x, bank, parse_geometry(3, 1, 1, 1, groups), spatial)

    assert choose(32, 512, 4) == "mixout"  # wide, tiny maps: the per-sample kernels are huge
    assert choose(8, 16, 4, grad=True) == "mixout"  # training on tiny maps
    assert choose(8, 16, 4) == "aggregate"
    assert choose(32, 256, 8, grad=True) == "aggregate"  # training, 8x8: kernels + im2col
    assert choose(32, 256, 8, grad=True, spatial=True) == "aggregate"  # ODConv too
    # inference: the batch's kernels are 75 MB, page-faulted in on every call unless kept
    assert choose(32, 256, 8) == ("aggregate" if kept else "mixout")
    assert choose(32, 64, 32) == "aggregate"  # large maps: grouped is near nn.Conv2d
    assert choose(32, 512, 4, groups=512) == "aggregate"  # depthwise
    assert choose(1, 512, 4) == "aggregate"  # batch 1: one plain convolution


@pytest.mark.parametrize("kept", [False, True])
def test_per_sample_dispatch_rule(kept: bool, monkeypatch) -> None:
    from dynconv import allocator
    from dynconv._conv_args import parse_geometry

    monkeypatch.setattr(allocator, "freed_memory_is_kept", lambda: kept)

    def choose(batch, pixels, grad, kernel=3, stride=1, padding=1):
        geometry = parse_geometry(kernel, stride, padding, 1, 1)
        return _choose_per_sample_method(batch, pixels, grad, geometry)

    assert choose(1, 16, True) == "direct"  # batch 1: one plain convolution
    assert choose(8, 64, True) == "unfold"  # training on small maps
    assert choose(8, 64, False) == ("unfold" if kept else "grouped")  # a large im2col buffer
    assert choose(8, 256, True) == "grouped"  # large maps: near nn.Conv2d
    # 1x1 kernels without padding: a batched matrix product on the input, at any batch
    assert choose(8, 1600, False, kernel=1, padding=0) == "unfold"
    assert choose(1, 1600, True, kernel=1, stride=2, padding=0) == "unfold"
    assert choose(8, 1600, False, kernel=1, padding=1) == "grouped"  # padded: no shortcut


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("stride", "groups"), [(1, 1), (2, 2), ((1, 2), 3)])
def test_pointwise_unfold_reads_the_input_itself(stride, groups, channels_last) -> None:
    """A 1x1 kernel's im2col is the strided input: checked on odd sizes, with groups, against
    one convolution per sample, with gradients."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 7, 9, dtype=F64, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 12, 6 // groups, 1, 1, dtype=F64, generator=gen)
    b = torch.randn(3, 12, dtype=F64, generator=gen)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    for method in ("unfold", "auto"):
        assert_same_outputs_and_grads(
            lambda m=method: per_sample_conv2d(x, w, b, stride, 0, 1, groups, method=m),
            lambda: reference_per_sample_conv2d(x, w, b, stride, 0, 1, groups),
            [x, w, b],
        )


def test_torch_compile_small_case() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, generator=gen)
    w = torch.randn(2, 4, 4, 3, 3, generator=gen)
    compiled = torch.compile(per_sample_conv2d, backend="eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(x, w, None, 1, 1), reference_per_sample_conv2d(x, w, None, 1, 1),
        rtol=1e-4, atol=1e-4,
    )


@settings(max_examples=100)
@given(
    cfg=conv_configs(padding_modes=("zeros",)),
    num_kernels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    attentions=st.tuples(st.booleans(), st.booleans()),
    chunked=st.sampled_from(["auto", "grouped", "unfold"]),
)
@example(cfg=EMPTY_BATCH, num_kernels=3, seed=0, attentions=(True, True), chunked="grouped")
def test_mixture_conv2d_with_spatial_weight_matches_reference(
    cfg: ConvConfig, num_kernels: int, seed: int, attentions: tuple[bool, bool], chunked: str
) -> None:
    """With ODConv's spatial weight, and its channel and filter weights when drawn (on the
    kernels or on the activations, by the maps' sizes), against the definition."""
    gen = torch.Generator().manual_seed(seed)
    x, bank, bias_bank = _tensors(cfg, gen, num_kernels)
    n, c_in, c_out = cfg.batch, cfg.in_channels, cfg.out_channels
    coeffs = torch.randn(n, num_kernels, dtype=F64, generator=gen).requires_grad_()
    spatial = torch.randn(n, *cfg.kernel_size, dtype=F64, generator=gen).requires_grad_()
    channel, filter_ = (torch.randn(n, c, dtype=F64, generator=gen).requires_grad_() if drawn
                        else None for c, drawn in zip((c_in, c_out), attentions, strict=True))
    inputs = [t for t in (x, coeffs, bank, bias_bank, spatial, channel, filter_) if t is not None]
    kw = cfg.conv_kwargs()

    def reference():
        weight = torch.einsum("nk,koihw->noihw", coeffs, bank) * spatial[:, None, None]
        bias = None if bias_bank is None else coeffs @ bias_bank
        xc = x if channel is None else x * channel[:, :, None, None]
        out = reference_per_sample_conv2d(xc, weight, None, **kw)
        if filter_ is not None:
            out = out * filter_[:, :, None, None]
        return out if bias is None else out + bias[:, :, None, None]

    _check_every_mixture_method(
        lambda **m: mixture_conv2d(x, coeffs, bank, bias_bank, **kw, spatial=spatial,
                                   channel=channel, filter=filter_, **m),
        reference, inputs, chunked)


def test_recomputed_im2col_supports_double_backward() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 6, 5, dtype=F64, generator=gen, requires_grad=True)
    w = torch.randn(2, 6, 2, 3, 2, dtype=F64, generator=gen, requires_grad=True)

    def fn(x, w):
        return per_sample_conv2d(x, w, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                                 method="unfold")

    with recomputing():
        assert torch.autograd.gradcheck(fn, (x, w))
        assert torch.autograd.gradgradcheck(fn, (x, w))


def test_recomputed_im2col_under_autocast() -> None:
    """Backward runs without autocast: the recomputed products must still take the dtype the
    forward's product ran in, and give the gradients of the kept buffer in the inputs' dtypes."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 8, 6, 6, generator=gen, requires_grad=True)
    w = torch.randn(4, 8, 8, 3, 3, generator=gen, requires_grad=True)

    def grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = per_sample_conv2d(x, w, padding=1, method="unfold")
        assert out.dtype == torch.bfloat16
        return torch.autograd.grad(out.float().square().sum(), (x, w))

    kept = grads()
    with recomputing():
        recomputed = grads()
    for got, expected in zip(recomputed, kept, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("with_spatial", [False, True])
@pytest.mark.parametrize("per_sample_method", ["grouped", "loop", "unfold"])
def test_recomputed_kernels_under_autocast(with_spatial: bool, per_sample_method: str) -> None:
    """Under autocast the kernels are mixed in bfloat16; backward, which runs without autocast,
    recomputes them the same way: the same gradients as with the kernels kept, bit for bit."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 8, 6, 6, generator=gen, requires_grad=True)
    coeffs = torch.randn(4, 3, generator=gen, requires_grad=True)
    bank = torch.randn(3, 8, 8, 3, 3, generator=gen, requires_grad=True)
    spatial = torch.rand(4, 3, 3, generator=gen, requires_grad=True) if with_spatial else None
    inputs = [t for t in (x, coeffs, bank, spatial) if t is not None]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mixture_conv2d(x, coeffs, bank, padding=1, spatial=spatial, method="aggregate",
                                 per_sample_method=per_sample_method)
        return [out, *torch.autograd.grad(out.float().square().sum(), inputs)]

    kept = run()
    with recomputing(chunk_bytes=2**30):  # the whole batch a chunk
        recomputed = run()
    for got, expected in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with recomputing():  # a sample a chunk: the bank's gradient a float32 sum of bfloat16
        chunked = run()  # products, where the kept kernels' is one bfloat16 product
    for got, expected in zip(chunked, kept, strict=True):
        assert got.dtype == expected.dtype
        assert (got.float() - expected.float()).norm() <= 1e-2 * expected.float().norm()


def test_recomputed_im2col_is_not_kept_between_forward_and_backward() -> None:
    """A stack of per-sample convolutions through im2col holds every layer's im2col buffer (9x
    its input) until backward unless it is unfolded again there."""
    from dynconv.tools.cost import peak_bytes_of

    gen = torch.Generator().manual_seed(8)
    weights = [torch.randn(16, 32, 32, 3, 3, generator=gen, requires_grad=True) for _ in range(6)]
    x = torch.randn(16, 32, 8, 8, generator=gen, requires_grad=True)

    def step():
        out = x
        for w in weights:
            out = per_sample_conv2d(out, w, padding=1, method="unfold")
        out.sum().backward()

    kept = peak_bytes_of(step)
    with recomputing():
        recomputed = peak_bytes_of(step)
    cols = 16 * 32 * 9 * 64 * 4  # one layer's im2col buffer: 1.2 MB
    # kept: all six at the start of backward; recomputed: one at a time (measured: 4.6 MB less)
    assert kept - recomputed > 3 * cols, (kept, recomputed)


@pytest.mark.parametrize("with_spatial", [False, True])
def test_recomputed_kernels_support_double_backward(with_spatial: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 5, 4, dtype=F64, generator=gen, requires_grad=True)
    coeffs = torch.randn(2, 3, dtype=F64, generator=gen, requires_grad=True)
    bank = torch.randn(3, 6, 4, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    spatial = torch.randn(2, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    inputs = (x, coeffs, bank, spatial) if with_spatial else (x, coeffs, bank)

    def fn(x, c, k, s=None):
        return mixture_conv2d(x, c, k, padding=1, spatial=s, method="aggregate",
                              per_sample_method="unfold")

    with recomputing():
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_callers_saved_tensor_hooks_see_every_tensor() -> None:
    """Inside the caller's own hooks (save_on_cpu, checkpointing), the mixture does not push
    hooks of its own, which would take precedence: every saved tensor reaches the caller's.
    (The per-sample method 'loop' keeps the kernels for backward; 'grouped' and 'unfold' with
    gradients save none, see test_chunked_aggregate_saves_no_kernels.)"""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 8, 6, 6, dtype=F64, generator=gen, requires_grad=True)
    coeffs = torch.randn(4, 3, dtype=F64, generator=gen, requires_grad=True)
    bank = torch.randn(3, 8, 8, 3, 3, dtype=F64, generator=gen, requires_grad=True)
    seen = []

    def pack(t):
        seen.append(t.shape)
        return t

    with recomputing(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mixture_conv2d(x, coeffs, bank, padding=1, method="aggregate",
                             per_sample_method="loop")
    # the per-sample kernels, one [8, 8, 3, 3] a sample for its convolution
    assert sum(shape == (8, 8, 3, 3) for shape in seen) == 4, seen
    out.sum().backward()
    assert bank.grad is not None and x.grad is not None


@pytest.mark.parametrize("with_spatial", [False, True])
@pytest.mark.parametrize("per_sample_method", ["unfold", "grouped"])
def test_recomputed_kernels_are_not_kept_between_forward_and_backward(
    with_spatial: bool, per_sample_method: str
) -> None:
    """A stack of mixtures holds every layer's per-sample kernels (and, with a spatial weight,
    the unweighted mix) until backward unless they are recomputed; the recomputed ones live
    during their layer's backward only. Fails if the hooks stop recognising what is saved."""
    from dynconv.tools.cost import peak_bytes_of

    gen = torch.Generator().manual_seed(5)
    banks = [torch.randn(4, 64, 64, 3, 3, generator=gen, requires_grad=True) for _ in range(4)]
    x = torch.randn(16, 64, 8, 8, generator=gen, requires_grad=True)
    coeffs = torch.randn(16, 4, generator=gen).softmax(1)
    spatial = torch.rand(16, 3, 3, generator=gen, requires_grad=True) if with_spatial else None

    def step():
        out = x
        for bank in banks:
            out = mixture_conv2d(out, coeffs, bank, padding=1, spatial=spatial,
                                 method="aggregate", per_sample_method=per_sample_method)
        out.sum().backward()

    kept = peak_bytes_of(step)
    with recomputing():
        recomputed = peak_bytes_of(step)
    kernels = 16 * banks[0][0].numel() * 4  # one layer's per-sample kernels: 2.4 MB
    # the kernels, and with a spatial weight also the unweighted mix the product saves
    saved_per_layer = 2 if with_spatial else 1
    assert kept - recomputed > 2 * saved_per_layer * kernels, (kept, recomputed)


def test_gradcheck_mixture_with_spatial_weight() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 4, dtype=F64, generator=gen, requires_grad=True)
    coeffs = torch.randn(2, 3, dtype=F64, generator=gen, requires_grad=True)
    bank = torch.randn(3, 6, 2, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    spatial = torch.randn(2, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    for method in MIXTURE_METHODS[1:]:
        assert torch.autograd.gradcheck(
            lambda x, c, k, s, m=method: mixture_conv2d(
                x, c, k, stride=(2, 1), padding=1, dilation=(1, 2), groups=2, spatial=s,
                method=m,
            ),
            (x, coeffs, bank, spatial),
        )


def test_mixture_spatial_weight_errors() -> None:
    x = torch.randn(2, 4, 8, 8)
    bank = torch.randn(3, 6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"spatial must have shape \[N, kH, kW\] = \[2, 3, 3\]"):
        mixture_conv2d(x, torch.randn(2, 3), bank, spatial=torch.randn(2, 9))


@given(h=st.integers(1, 23), w=st.integers(1, 23), oh=st.integers(1, 5), ow=st.integers(1, 5))
@settings(max_examples=60)
def test_adaptive_avg_pool_as_matmul_matches_torch(h, w, oh, ow):
    """The form DRConv exports with (any input size) is torch's adaptive pooling, exactly."""
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, (oh, ow))
    got = adaptive_avg_pool2d_matmul(x, (oh, ow))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [3, 4, 5, 9])  # mix-out runs through im2col up to 16 pixels
@pytest.mark.parametrize("groups", [1, 2])
def test_mixout_on_both_sides_of_its_im2col_threshold(size, groups):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(3, 4, size, size, dtype=F64, generator=gen, requires_grad=True)
    coefficients = torch.randn(3, 3, dtype=F64, generator=gen, requires_grad=True)
    bank = torch.randn(3, 6, 4 // groups, 3, 3, dtype=F64, generator=gen, requires_grad=True)
    bias = torch.randn(3, 6, dtype=F64, generator=gen, requires_grad=True)

    def run(method):
        out = mixture_conv2d(x, coefficients, bank, bias, 1, 1, 1, groups, method=method)
        grads = torch.autograd.grad(out.square().sum(), (x, coefficients, bank, bias))
        return out, grads

    (out, grads), (ref, ref_grads) = run("mixout"), run("aggregate")
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("per_sample_method", ["grouped", "unfold"])
@pytest.mark.parametrize("with_attentions", [False, True])
def test_chunked_aggregate_saves_no_kernels(per_sample_method: str, with_attentions: bool) -> None:
    """With gradients and kernels of is_recomputed's size, the aggregate keeps for backward only
    its inputs (input, coefficients, bank, attentions), nothing kernel-sized: the per-sample
    kernels exist a chunk at a time. Also inside the caller's own saved-tensor hooks, which
    count here what is saved."""
    gen = torch.Generator().manual_seed(12)
    n, c, k = 8, 16, 4
    x = torch.randn(n, c, 12, 12, generator=gen, requires_grad=True)
    coeffs = torch.randn(n, k, generator=gen).softmax(1).requires_grad_()
    bank = torch.randn(k, c, c, 3, 3, generator=gen, requires_grad=True)
    attention = {} if not with_attentions else {
        "spatial": torch.rand(n, 3, 3, generator=gen, requires_grad=True),
        "channel": torch.rand(n, c, generator=gen, requires_grad=True),
        "filter": torch.rand(n, c, generator=gen, requires_grad=True)}
    with recomputing(chunk_bytes=2 * bank[0].numel() * 4):  # two samples a chunk
        saved = saved_storages(lambda: mixture_conv2d(
            x, coeffs, bank, padding=1, method="aggregate", per_sample_method=per_sample_method,
            **attention))
    inputs = [x, coeffs, bank, *attention.values()]
    assert set(saved) == {t.untyped_storage().data_ptr() for t in inputs}, saved


@pytest.mark.parametrize("per_sample_method", ["grouped", "unfold"])
@pytest.mark.parametrize("size", [3, 9])  # the channel and filter weights on the activations
def test_chunked_aggregate_uneven_chunks_and_double_backward(per_sample_method: str,
                                                             size: int) -> None:
    """Five samples in chunks of two, with every attention (on the kernels at 9x9, on the
    activations at 3x3), a group and a stride: the definition's outputs, gradients and second
    derivatives in float64 (gradgradcheck's numerical ones took 40 s here; test_recomputed_*
    runs it on the smaller cases)."""
    gen = torch.Generator().manual_seed(13)
    n, c_in, c_out, k, g = 5, 4, 6, 3, 2
    x = torch.randn(n, c_in, size, size, dtype=F64, generator=gen, requires_grad=True)
    coeffs = torch.randn(n, k, dtype=F64, generator=gen, requires_grad=True)
    bank = torch.randn(k, c_out, c_in // g, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    bias_bank = torch.randn(k, c_out, dtype=F64, generator=gen, requires_grad=True)
    spatial = torch.randn(n, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    channel = torch.randn(n, c_in, dtype=F64, generator=gen, requires_grad=True)
    filter_ = torch.randn(n, c_out, dtype=F64, generator=gen, requires_grad=True)
    inputs = (x, coeffs, bank, bias_bank, spatial, channel, filter_)
    kw = {"stride": (2, 1), "padding": (1, 0), "groups": g}

    def fn(x, c, k, b, s, a_c, a_f):
        return mixture_conv2d(x, c, k, b, **kw, spatial=s, channel=a_c, filter=a_f,
                              method="aggregate", per_sample_method=per_sample_method)

    def reference():
        weight = torch.einsum("nk,koihw->noihw", coeffs, bank) * spatial[:, None, None]
        out = reference_per_sample_conv2d(x * channel[:, :, None, None], weight, None, **kw)
        return out * filter_[:, :, None, None] + (coeffs @ bias_bank)[:, :, None, None]

    with recomputing(chunk_bytes=2 * bank[0].numel() * 8):
        assert_same_outputs_and_grads(lambda: fn(*inputs), reference, inputs)
        assert_same_second_derivatives(lambda: fn(*inputs), reference, inputs)


def test_fold_keeps_no_columns_sized_buffer() -> None:
    """The input's gradient of the recomputed im2col product is its own size, not the size of
    the columns F.fold made it from (9x here)."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(4, 8, 6, 6, generator=gen, requires_grad=True)
    w = torch.randn(4, 8, 8, 3, 3, generator=gen, requires_grad=True)
    with recomputing():
        out = per_sample_conv2d(x, w, padding=1, method="unfold")
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    assert grad_x.untyped_storage().nbytes() == x.numel() * 4


@pytest.mark.parametrize("spatial", [False, True])
def test_recomputed_kernels_are_recomputed_once_per_backward(monkeypatch, spatial: bool) -> None:
    """'loop' saves one slice of the per-sample kernels per sample: backward recomputes the
    batch's kernels once for all of them (it once did so for every slice: 64x the work at batch
    64), and still gives the gradients of the kept kernels, in float64, twice in a row with
    retain_graph."""
    gen = torch.Generator().manual_seed(3)
    n, k = 6, 3
    x = torch.randn(n, 4, 5, 5, dtype=F64, generator=gen, requires_grad=True)
    coefficients = torch.randn(n, k, dtype=F64, generator=gen, requires_grad=True)
    bank = torch.randn(k, 5, 4, 3, 3, dtype=F64, generator=gen, requires_grad=True)
    weights = (torch.randn(n, 3, 3, dtype=F64, generator=gen, requires_grad=True) if spatial
               else None)
    inputs = [t for t in (x, coefficients, bank, weights) if t is not None]

    def run():
        return mixture_conv2d(x, coefficients, bank, padding=1, spatial=weights,
                              method="aggregate", per_sample_method="loop")

    expected = torch.autograd.grad(run().square().sum(), inputs)
    calls = []
    original = mixture.mix_kernels
    monkeypatch.setattr(mixture, "mix_kernels", lambda *a: calls.append(1) or original(*a))
    with recomputing():
        out = run()
        assert len(calls) == 1  # forward
        loss = out.square().sum()
        for backward in range(2):
            got = torch.autograd.grad(loss, inputs, retain_graph=True)
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
            if backward == 0:
                assert len(calls) == 2  # the first backward: once for every slice
