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
