"""Modules with the parameter layout of the reference implementations, written for the tests.

These follow the layouts described in the reference code (names, shapes, the order of the
operations), so that a state_dict they produce can be loaded into the package's layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeedKernelAttention(nn.Module):
    """Seed 001's ``attention2d``: pool, fc1 (no bias), ReLU, fc2, softmax(logits / T)."""

    def __init__(self, in_planes, ratio, num_kernels, temperature, fc2_bias=False, extra=0):
        super().__init__()
        hidden = int(in_planes * ratio) + extra if in_planes != 3 else num_kernels
        self.fc1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, num_kernels, 1, bias=fc2_bias)
        self.temperature = temperature

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, 1)
        x = self.fc2(F.relu(self.fc1(x))).view(x.size(0), -1)
        return F.softmax(x / self.temperature, 1)


class SeedDynamicConv2d(nn.Module):
    """Seed 001's ``Dynamic_conv2d`` layout, with the typo in its reshape fixed (C_in/groups)."""

    def __init__(self, in_planes, out_planes, kernel_size, ratio=0.25, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, K=4, temperature=34, fc2_bias=False, extra=0):
        super().__init__()
        self.in_planes, self.out_planes, self.kernel_size = in_planes, out_planes, kernel_size
        self.stride, self.padding, self.dilation, self.groups, self.K = (
            stride, padding, dilation, groups, K)
        self.attention = SeedKernelAttention(in_planes, ratio, K, temperature, fc2_bias, extra)
        self.weight = nn.Parameter(
            torch.randn(K, out_planes, in_planes // groups, kernel_size, kernel_size) * 0.2)
        self.bias = nn.Parameter(torch.randn(K, out_planes) * 0.2) if bias else None
        with torch.no_grad():
            for p in self.attention.parameters():
                p.normal_(0, 0.5)

    def forward(self, x):
        att = self.attention(x)
        n, _, h, w = x.size()
        x = x.reshape(1, -1, h, w)
        weight = torch.mm(att, self.weight.view(self.K, -1)).view(
            -1, self.in_planes // self.groups, self.kernel_size, self.kernel_size)
        bias = None if self.bias is None else torch.mm(att, self.bias).view(-1)
        out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation,
                       self.groups * n)
        return out.view(n, self.out_planes, out.size(-2), out.size(-1))


# -- DRConv (seed 003) -----------------------------------------------------------------------------


class SeedRegionAssign(torch.autograd.Function):
    """Seed 003's assignment: keep each pixel's argmax region; the guide's gradient goes through
    a softmax (straight-through), computed from every region's output."""

    @staticmethod
    def forward(ctx, outputs, guide):  # outputs [B, R, C_out, H, W], guide [B, R, H, W]
        ctx.save_for_backward(outputs, guide)
        one_hot = torch.zeros_like(guide).scatter_(1, guide.argmax(1, keepdim=True), 1.0)
        return (outputs * one_hot.unsqueeze(2)).sum(1)

    @staticmethod
    def backward(ctx, grad):
        outputs, guide = ctx.saved_tensors
        one_hot = torch.zeros_like(guide).scatter_(1, guide.argmax(1, keepdim=True), 1.0)
        grad_outputs = grad.unsqueeze(1) * one_hot.unsqueeze(2)
        scores = (grad.unsqueeze(1) * outputs).sum(2)
        s = F.softmax(guide, 1)
        grad_guide = s * (scores - (s * scores).sum(1, keepdim=True))
        return grad_outputs, grad_guide


class SeedDRConv2d(nn.Module):
    """Seed 003's ``DRConv2d`` layout (square kernel, no bias, no groups, zero padding).

    Fixed: in eval mode the seed runs its correlation through an autograd Function without a
    backward, so no gradient can be taken; here both modes use the same grouped convolution.
    """

    def __init__(self, in_channels, out_channels, kernel_size, region_num=8, **conv_kwargs):
        super().__init__()
        self.region_num = region_num
        self.conv_kernel = nn.Sequential(
            nn.AdaptiveAvgPool2d((kernel_size, kernel_size)),
            nn.Conv2d(in_channels, region_num * region_num, 1),
            nn.Sigmoid(),
            nn.Conv2d(region_num * region_num, region_num * in_channels * out_channels, 1,
                      groups=region_num),
        )
        self.conv_guide = nn.Conv2d(in_channels, region_num, kernel_size, **conv_kwargs)
        self.conv_kwargs = conv_kwargs

    def forward(self, x):
        b, c, h, w = x.shape
        kernel = self.conv_kernel(x)  # [B, R * C_in * C_out, k, k]
        kernel = kernel.reshape(-1, c, kernel.shape[-2], kernel.shape[-1])
        out = F.conv2d(x.reshape(1, b * c, h, w), kernel, groups=b, **self.conv_kwargs)
        out = out.reshape(b, self.region_num, -1, out.shape[-2], out.shape[-1])
        return SeedRegionAssign.apply(out, self.conv_guide(x))
