"""The dispatch rules' thresholds, one table per device type, in one place.

``'auto'`` in :func:`~dynconv.functional.per_sample_conv2d`, :func:`mixture_conv2d` and
:func:`region_conv2d` picks a formulation by a rule (docs/performance.md); the rule's thresholds
are looked up here by the device type of the input. CPU entries were measured (on the 2-core
AMD EPYC VM of docs/performance.md); the CUDA entries are conservative defaults from public
evidence, not measured by this project: wherever unmeasured they keep the seeds' grouped
convolution (timm's CondConv, the anchor on GPUs), never a formulation whose cost grows worse
than it on large maps. Other device types (MPS, XPU, meta) use the CPU table.
:func:`dynconv.autotune` replaces the rule by measurement, per shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import allocator

__all__ = ["RULES", "DispatchRule", "freed_memory_reused", "rule_for"]


@dataclass(frozen=True)
class DispatchRule:
    """The thresholds of the three dispatch rules for one device type.

    Attributes:
        pointwise_unfold: a 1x1 kernel without padding runs as one batched matrix product on
            the input (``per_sample_conv2d``'s ``'unfold'``: no im2col, the MACs of the
            convolution).
        unfold_max_pixels: up to this many output pixels per sample, ``'unfold'`` (im2col and a
            batched matrix product) replaces the grouped convolution, with gradients or when
            freed memory is kept (0: never).
        mixout_unfold_max_pixels: up to this many output pixels per sample, a mixture runs as
            mix-out through im2col when training or when its per-sample kernels are large
            (0: never).
        mixout_max_pixels: below this many output pixels, inference with more than
            ``mixout_min_kernel_bytes`` of per-sample kernels uses mix-out when freed memory
            is not kept (glibc's page faults; irrelevant where ``page_faults`` is False).
        mixout_min_kernel_bytes: see ``mixout_max_pixels`` and ``mixout_unfold_max_pixels``.
        page_faults: whether large freed blocks are handed back to the OS and page-faulted in
            again (glibc's malloc, unless :func:`dynconv.keep_freed_memory`); CUDA's caching
            allocator keeps them.
        restricted_min_regions, restricted_min_macs: ``region_conv2d`` runs ``'restricted'``
            from this many regions on, when one of its products holds at least this many MACs
            (a region's pixels times one group's kernel); else ``'dense'``.
        source: where the entries come from, as docs/performance.md says.
    """

    pointwise_unfold: bool
    unfold_max_pixels: int
    mixout_unfold_max_pixels: int
    mixout_max_pixels: int
    mixout_min_kernel_bytes: int
    page_faults: bool
    restricted_min_regions: int
    restricted_min_macs: int
    source: str


_NEVER = 2**62

RULES: dict[str, DispatchRule] = {
    "cpu": DispatchRule(
        pointwise_unfold=True,
        unfold_max_pixels=64,  # 8x8
        mixout_unfold_max_pixels=16,  # 4x4
        mixout_max_pixels=256,  # below 16x16
        mixout_min_kernel_bytes=32 * 2**20,  # glibc's largest mmap threshold
        page_faults=True,
        restricted_min_regions=4,
        restricted_min_macs=2**20,
        source="measured: 2-core AMD EPYC VM, torch 2.14.1, 2 threads (docs/performance.md)",
    ),
    "cuda": DispatchRule(
        # the batched matrix product of a 1x1 kernel has the convolution's MACs and no im2col
        pointwise_unfold=True,
        unfold_max_pixels=0,  # no im2col: the grouped convolution, as the seeds and timm
        mixout_unfold_max_pixels=0,  # no K-fold outputs or MACs
        mixout_max_pixels=0,
        mixout_min_kernel_bytes=_NEVER,
        page_faults=False,  # the caching allocator reuses freed blocks
        # the restricted method loops over samples and regions (a kernel launch each) and reads
        # region sizes on the host; the dense one is the seeds' formulation
        restricted_min_regions=_NEVER,
        restricted_min_macs=_NEVER,
        source="defaults from public evidence (timm's grouped CondConv), unmeasured",
    ),
}


def rule_for(device: torch.device | str) -> DispatchRule:
    """The dispatch table of ``device``'s type: :data:`RULES` ``['cuda']`` on CUDA, the CPU
    table elsewhere."""
    return RULES.get(torch.device(device).type, RULES["cpu"])


def freed_memory_reused(rule: DispatchRule) -> bool:
    """Whether a large tensor made on every call reuses freed memory (no page faults): always
    on CUDA; on the CPU once :func:`dynconv.keep_freed_memory` is in effect."""
    return not rule.page_faults or allocator.freed_memory_is_kept()
