"""Folding a BatchNorm that follows a convolution into the convolution, for inference."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import DynamicConvBase


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) [C] such that ``bn(y) == scale * y + shift`` per channel in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fold_batchnorm(conv: nn.Module, bn: nn.BatchNorm2d) -> bool:
    """Fold ``bn`` (which follows ``conv``) into ``conv`` in place, exactly (eval-mode BN).

    Works for ``nn.Conv2d`` and for every dynamic layer whose output can absorb a per-channel
    affine map exactly (``fold_output_affine``). Returns ``False``, changing nothing, when the
    layer cannot (then keep the BatchNorm).
    """
    scale, shift = batchnorm_affine(bn)
    if isinstance(conv, DynamicConvBase):
        try:
            conv.fold_output_affine(scale, shift)
        except NotImplementedError:
            return False
        return True
    if type(conv) is nn.Conv2d:
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype),
                                 requires_grad=conv.weight.requires_grad)
        return True
    return False
