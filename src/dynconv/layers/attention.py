"""Attention branches: how a dynamic layer turns its input into per-sample coefficients."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

Routing = Literal["softmax", "sigmoid"]
ROUTINGS = ("softmax", "sigmoid")


def routing_weights(logits: Tensor, temperature: Tensor, routing: Routing = "softmax") -> Tensor:
    """``softmax(logits / T)`` over the last dimension, or an independent ``sigmoid(logits / T)``.

    Computed in at least float32, with autocast off, so that reduced precision never makes the
    attention saturate or overflow; the result keeps that dtype.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(dtype) / temperature.to(dtype)
        return z.softmax(dim=-1) if routing == "softmax" else z.sigmoid()


class KernelAttention(nn.Module):
    """DY-Conv / CondConv attention: global average pool, 1x1 conv, ReLU, 1x1 conv to K logits.

    Parameter names follow the reference DY-Conv code (``fc1``, ``fc2``) so its checkpoints load.

    Shapes: input [N, C_in, H, W] -> logits [N, K].
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_kernels: int,
        bias: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1, bias=False, **kw)
        self.fc2 = nn.Conv2d(hidden_channels, num_kernels, 1, bias=bias, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return self.fc2(torch.relu(self.fc1(pooled))).flatten(1)
