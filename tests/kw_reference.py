"""A plain reimplementation of the official KernelWarehouse code (OSVAI/KernelWarehouse,
``modules/kernel_warehouse.py``) for the tests: a manager that records layers by warehouse
name, then makes the warehouses (greatest common divisors, cell counts) and hands out cells in
module order; per layer, the attention and the per-sample kernel assembly of the official code,
written loop by loop where that is clearer. Exactness tests compare dynconv against it in
float64; the zoo tests build official-layout models and checkpoints with it.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    """The official attention, with the official parameter names."""

    def __init__(self, in_planes, reduction, num_cells, mixtures, cell_num_ratio,
                 nonlocal_basis_ratio, start):
        super().__init__()
        hidden = max(int(in_planes * reduction), 16)
        self.per_mixture = num_cells + 1
        self.mixtures = mixtures
        self.local = int(cell_num_ratio * mixtures)
        self.nonlocal_ = num_cells - self.local
        self.start = start
        self.fc1 = nn.Linear(in_planes, hidden, bias=False)
        self.norm1 = nn.BatchNorm1d(hidden)
        self.basis = nonlocal_basis_ratio < 1.0
        if not self.basis:
            self.fc2 = nn.Linear(hidden, self.per_mixture * mixtures, bias=True)
        else:
            self.num_basis = max(int(self.nonlocal_ * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(hidden, (self.local + self.num_basis + 1) * mixtures, bias=False)
            with warnings.catch_warnings():  # (no other cells in a one-layer warehouse)
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                self.fc3 = nn.Linear(self.num_basis, self.nonlocal_, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.per_mixture * mixtures))
        self.temp_bias = torch.zeros(self.per_mixture * mixtures)
        self.temp_value = 0.0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.5)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.5)
        if self.basis:
            nn.init.normal_(self.basis_bias, std=0.5)

    def assign(self, start, ratio):
        """The official temperature initialisation; returns the next free cell."""
        if ratio >= 1:
            for i in range(self.mixtures):
                self.temp_bias[i * self.per_mixture + start] = 1
                start += int(ratio)
            return start
        k = int(1 / ratio)
        for i in range(self.mixtures):
            if i % k == (i // k) % k:
                self.temp_bias[i * self.per_mixture + start] = 1
                start += 1
            else:
                self.temp_bias[i * self.per_mixture + self.per_mixture - 1] = 1
        return start

    def forward(self, x):
        pooled = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
        h = F.relu(self.norm1(self.fc1(pooled)))
        z = self.fc2(h)
        if self.basis:
            rows = z.reshape(-1, self.local + self.num_basis + 1)
            own = rows[:, :self.local]
            others = self.fc3(rows[:, self.local:-1])
            zero = rows[:, -1:]
            rows = torch.cat([others[:, :self.start], own, others[:, self.start:], zero], 1)
            z = rows.reshape(-1, self.per_mixture * self.mixtures) + self.basis_bias[None]
        rows = z.reshape(-1, self.per_mixture)
        rows = rows / (rows.abs().sum(1, keepdim=True) + 1e-3)
        t = self.temp_value
        mixed = (1 - t) * rows.reshape(-1, self.per_mixture * self.mixtures) \
            + t * self.temp_bias.to(rows)[None]
        return mixed.reshape(-1, self.per_mixture)[:, :-1]


class RefKWConv2d(nn.Module):
    """The official KWConv2d: kernels assembled per sample, one grouped convolution."""

    def __init__(self, manager, name, in_planes, out_planes, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=False):
        super().__init__()
        self.in_planes, self.out_planes, self.groups = in_planes, out_planes, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (
            kernel_size, stride, padding, dilation)
        self.bias = nn.Parameter(torch.zeros(out_planes)) if bias else None
        self.name = name
        self.manager = [manager]

    def init_attention(self, cells, start, reduction, ratio, nonlocal_basis_ratio):
        self.cell_shape = cells.shape
        self.g_out = self.out_planes // cells.shape[1]
        self.g_in = self.in_planes // cells.shape[2] // self.groups
        self.g_sp = 1
        for size in cells.shape[3:]:
            self.g_sp *= self.kernel_size // size
        mixtures = self.g_out * self.g_in * self.g_sp
        self.attention = RefAttention(self.in_planes, reduction, cells.shape[0], mixtures, ratio,
                                      nonlocal_basis_ratio, start)
        return self.attention.assign(start, ratio)

    def forward(self, x):
        a = self.attention(x)
        n = x.shape[0]
        cells = self.manager[0].weights[self.manager[0].index[self.name]]
        w = a @ cells.reshape(cells.shape[0], -1)
        w = w.reshape(n, self.g_sp, self.g_out, self.g_in, *cells.shape[1:])
        w = w.permute(0, 2, 4, 3, 5, 1, 6, 7).reshape(
            n * self.out_planes, self.in_planes // self.groups, self.kernel_size,
            self.kernel_size)
        y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, None, self.stride, self.padding,
                     self.dilation, self.groups * n)
        y = y.reshape(n, self.out_planes, *y.shape[2:])
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


class RefKWLinear(nn.Module):
    """The official KWLinear: ``conv``, a 1-D KW convolution of kernel 1 (1-D cells)."""

    def __init__(self, manager, name, in_planes, out_planes, bias=True):
        super().__init__()
        self.conv = RefKWConv1d(manager, name, in_planes, out_planes, 1, bias=bias)

    def forward(self, x):
        return self.conv(x[:, :, None])[:, :, 0]


class RefKWConv1d(RefKWConv2d):
    """The official KWConv1d, kernel 1 only: [N, C, L] -> [N, C_out, L]."""

    def forward(self, x):
        a = self.attention(x)
        n = x.shape[0]
        cells = self.manager[0].weights[self.manager[0].index[self.name]]
        w = (a @ cells.reshape(cells.shape[0], -1)).reshape(n, self.g_sp, self.g_out, self.g_in,
                                                            *cells.shape[1:])
        w = w.permute(0, 2, 4, 3, 5, 1, 6).reshape(n * self.out_planes, self.in_planes, 1)
        y = F.conv1d(x.reshape(1, -1, x.shape[-1]), w, None, 1, 0, 1, n)
        y = y.reshape(n, self.out_planes, -1)
        return y + self.bias[None, :, None] if self.bias is not None else y


class RefManager(nn.Module):
    """The official Warehouse_Manager: reserve, then store, then allocate(network)."""

    def __init__(self, reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1,
                 cell_outplane_ratio=1, nonlocal_basis_ratio=1, spatial_partition=True):
        super().__init__()
        self.reduction, self.ratio = reduction, cell_num_ratio
        self.in_ratio, self.out_ratio = cell_inplane_ratio, cell_outplane_ratio
        self.basis_ratio, self.spatial_partition = nonlocal_basis_ratio, spatial_partition
        self.shapes: dict[str, list] = {}
        self.index: dict[str, int] = {}

    def reserve(self, warehouse, in_planes, out_planes, kernel_size, linear=False, **kwargs):
        self.index.setdefault(warehouse, len(self.index))
        self.shapes.setdefault(warehouse, []).append(
            (out_planes, in_planes // kwargs.get("groups", 1), kernel_size, linear))
        if linear:
            return RefKWLinear(self, warehouse, in_planes, out_planes, **kwargs)
        return RefKWConv2d(self, warehouse, in_planes, out_planes, kernel_size, **kwargs)

    def setting(self, value, i):
        """A setting given once for all warehouses, or one per warehouse (a tuple)."""
        return value[i] if isinstance(value, tuple) else value

    def store(self):
        self.weights = nn.ParameterList()
        for i, name in enumerate(self.index):
            layers = self.shapes[name]
            out_gcd = math.gcd(*(s[0] for s in layers))
            in_gcd = math.gcd(*(s[1] for s in layers))
            c_in = max(int(in_gcd * self.setting(self.in_ratio, i)), 1)
            c_out = max(int(out_gcd * self.setting(self.out_ratio, i)), 1)
            k = 1 if self.spatial_partition else layers[0][2]
            total = sum((s[0] // c_out) * (s[1] // c_in) * (s[2] // k) ** (1 if s[3] else 2)
                        for s in layers)
            spatial = (k,) if layers[0][3] else (k, k)
            self.weights.append(nn.Parameter(torch.randn(
                max(int(total * self.setting(self.ratio, i)), 1), c_out, c_in, *spatial)))

    def allocate(self, network):
        ends = [0] * len(self.weights)
        for layer in network.modules():
            if isinstance(layer, RefKWConv2d):
                i = self.index[layer.name]
                ends[i] = layer.init_attention(self.weights[i], ends[i],
                                               self.setting(self.reduction, i),
                                               self.setting(self.ratio, i), self.basis_ratio)
        assert ends == [w.shape[0] for w in self.weights], (ends, [len(w) for w in self.weights])

    def set_temperature(self, network, t):
        for layer in network.modules():
            if isinstance(layer, RefAttention):
                layer.temp_value = t


def fuse_name(name, sharing_range=("layer", "conv")):
    """The official warehouse name of a layer named ``stageA_layerB_convC``."""
    parts = []
    for part in name.split("_"):
        for shared in sharing_range:
            if part.startswith(shared):
                part = shared
        parts.append(part)
    return "_".join(parts)


def ref_kw_resnet(model, bottleneck, manager):
    """Turn dynconv's static torchvision-named ResNet ``model`` into the official KW ResNet:
    the official constructor's names, handover and ``enabled`` rules, reserved in its order
    (a stage's shortcut before its first block), then store() and allocate(); the manager
    becomes ``model.warehouse_manager`` (the official state_dict key)."""
    def put(path, name, enabled):
        conv = model.get_submodule(path)
        if not enabled:
            return
        layer = manager.reserve(fuse_name(name), conv.in_channels, conv.out_channels,
                                conv.kernel_size[0], stride=conv.stride[0],
                                padding=conv.padding[0], groups=conv.groups)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)

    layer_idx = 0
    for stage in range(4):
        blocks = getattr(model, f"layer{stage + 1}")
        first = blocks[0]
        if first.downsample is not None:
            stride = first.downsample[0].stride[0]
            put(f"layer{stage + 1}.0.downsample.0",
                f"stage{stage - 1}_layer{layer_idx + 1}_conv0", stride != 1)
        for b in range(len(blocks)):
            prefix = f"layer{stage + 1}.{b}"
            if b == 0:  # warehouse handover
                if bottleneck:
                    put(prefix + ".conv1", f"stage{stage - 1}_layer{layer_idx}_conv0",
                        stage - 1 >= 0)
                else:
                    put(prefix + ".conv1", f"stage{max(stage - 1, 0)}_layer{layer_idx}_conv0",
                        True)
                names = [f"stage{stage}_layer0_conv{c}" for c in (1, 2)]
                layer_idx = 1
            else:
                put(prefix + ".conv1", f"stage{stage}_layer{layer_idx}_conv0", True)
                names = [f"stage{stage}_layer{layer_idx}_conv{c}" for c in (1, 2)]
                layer_idx += 1
            put(prefix + ".conv2", names[0], True)
            if bottleneck:
                put(prefix + ".conv3", names[1], True)
    manager.store()
    manager.allocate(model)
    model.warehouse_manager = manager
    return model


def ref_kw_mobilenetv2(model, width):
    """dynconv's static torchvision-named MobileNetV2 ``model`` made the official KW model of
    ``width`` ('1x', '4x': models/kw_mobilenetv2.py; '1/2x': models/kw1d2x_mobilenetv2.py):
    the official names, stages and handover, sharing ranges and per-warehouse settings."""
    half = width == "1/2x"
    if half:
        manager = RefManager(reduction=0.03125, cell_num_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5),
                             cell_inplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
                             cell_outplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1))
        sharing = tuple("layer")
    else:
        manager = RefManager(cell_num_ratio=1 if width == "1x" else 4)
        sharing = ("layer", "pwconv") if width == "1x" else ("layer",)
    enabled_pw = [False, False, False, False, False, True, True] if half else [True] * 7

    def put(path, name, enabled=True):
        conv = model.get_submodule(path)
        if not enabled:
            return
        layer = manager.reserve(fuse_name(name, sharing), conv.in_channels, conv.out_channels,
                                conv.kernel_size[0], stride=conv.stride[0],
                                padding=conv.padding[0], groups=conv.groups)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)

    put("features.0.0", "stage0_conv0")
    stages = [1, 2, 3, 4, 5, 6, 6]
    settings = [(1, 1), (6, 2), (6, 3), (6, 4), (6, 3), (6, 3), (6, 1)]
    layer_idx, index = 0, 1
    for row, (t, n) in enumerate(settings):
        for i in range(n):
            handover = i == 0 and row > 0 and stages[row] != stages[row - 1]
            stage = stages[row] - 1 if handover else stages[row]
            pw = enabled_pw[stage - 1]
            prefix = f"features.{index}.conv."
            j = 0
            if t != 1:
                put(prefix + "0.0", f"stage{stage}_layer{layer_idx}_pwconv0", pw)
                j = 1
            put(prefix + f"{j}.0", f"stage{stage}_layer{layer_idx}_dwconv0")
            put(prefix + f"{j + 1}", f"stage{stage}_layer{layer_idx}_pwconv1", pw)
            layer_idx += 1
            if handover:
                layer_idx = 0
            index += 1
    put(f"features.{index}.0", f"stage6_layer{layer_idx}_pwconv1")
    linear = model.classifier[1]
    if half:
        model.classifier[1] = manager.reserve("classifier", linear.in_features,
                                              linear.out_features, 1, linear=True)
    else:
        model.classifier = linear
    manager.store()
    manager.allocate(model)
    model.warehouse_manager = manager
    return model
