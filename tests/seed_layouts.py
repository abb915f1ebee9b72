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


class OfficialODAttention(nn.Module):
    """The attention of the official ODConv code (OSVAI/ODConv ``modules/odconv.py``), rebuilt
    from its layout: pool, ``fc`` (no bias), ``bn``, ReLU, then the four heads, each absent in
    the official special cases. ``temperature`` is a plain attribute, as there."""

    def __init__(self, in_planes, out_planes, kernel_size, groups=1, reduction=0.0625,
                 kernel_num=4, min_channel=16):
        super().__init__()
        hidden = max(int(in_planes * reduction), min_channel)
        self.kernel_size, self.temperature = kernel_size, 1.0
        self.fc = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, in_planes, 1)
        if not (in_planes == groups == out_planes):
            self.filter_fc = nn.Conv2d(hidden, out_planes, 1)
        if kernel_size != 1:
            self.spatial_fc = nn.Conv2d(hidden, kernel_size * kernel_size, 1)
        if kernel_num != 1:
            self.kernel_fc = nn.Conv2d(hidden, kernel_num, 1)

    def forward(self, x):
        h = F.relu(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        n, k, t = x.shape[0], self.kernel_size, self.temperature
        channel = torch.sigmoid(self.channel_fc(h).reshape(n, -1, 1, 1) / t)
        filter_ = (torch.sigmoid(self.filter_fc(h).reshape(n, -1, 1, 1) / t)
                   if hasattr(self, "filter_fc") else 1.0)
        spatial = (torch.sigmoid(self.spatial_fc(h).reshape(n, 1, 1, 1, k, k) / t)
                   if hasattr(self, "spatial_fc") else 1.0)
        kernel = (F.softmax(self.kernel_fc(h).reshape(n, -1, 1, 1, 1, 1) / t, dim=1)
                  if hasattr(self, "kernel_fc") else 1.0)
        return channel, filter_, spatial, kernel


class OfficialODConv2d(nn.Module):
    """The official ``ODConv2d`` layout: ``weight`` [K, C_out, C_in/g, k, k] (5-D even for K = 1)
    and ``attention``. Like the official code it builds the [N, K, C_out, C_in/g, k, k] tensor,
    sums it over K and runs one grouped convolution with groups = g * N; a 1x1 layer with K = 1
    is a plain convolution between the channel and filter attentions."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, reduction=0.0625, kernel_num=4):
        super().__init__()
        self.out_planes, self.kernel_size, self.groups = out_planes, kernel_size, groups
        self.conv_args = (stride, padding, dilation)
        self.attention = OfficialODAttention(in_planes, out_planes, kernel_size, groups,
                                             reduction, kernel_num)
        self.weight = nn.Parameter(
            torch.randn(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size))

    def update_temperature(self, temperature):
        self.attention.temperature = temperature

    def forward(self, x):
        channel, filter_, spatial, kernel = self.attention(x)
        x = x * channel
        if self.kernel_size == 1 and self.weight.shape[0] == 1:
            return F.conv2d(x, self.weight[0], None, *self.conv_args, self.groups) * filter_
        n, _, h, w = x.shape
        per_sample = (spatial * kernel * self.weight[None]).sum(dim=1)  # [N, C_out, C_in/g, k, k]
        out = F.conv2d(x.reshape(1, -1, h, w), per_sample.reshape(-1, *per_sample.shape[2:]),
                       None, *self.conv_args, self.groups * n)
        return out.reshape(n, self.out_planes, *out.shape[-2:]) * filter_


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
