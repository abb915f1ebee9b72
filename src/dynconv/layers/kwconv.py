"""``KWConv2d``: KernelWarehouse convolution (Li and Yao, ICML 2024), each kernel cell a
per-sample mixture of the cells of a shared :class:`~dynconv.layers.warehouse.Warehouse`."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._conv_args import PaddingArg, check_bool, check_int, check_positive_float
from ..functional.mixture import mix_cells, warehouse_conv2d_unchecked
from ..functional.per_sample import check_per_sample_method
from .attention import ATTENTION_NORMS, AttentionNorm
from .base import DynamicConvBase, LayerMacs, shared_notes
from .warehouse import CellLayout, Warehouse, assigned_cells, check_ratio

#: The official code adds this to the sum of absolute attention values before dividing.
NORMALISER_EPS = 1e-3


class KWAttention(nn.Module):
    """The attention of one KernelWarehouse layer: global average pool, ``fc1`` (Linear to the
    hidden width), ``norm1``, ReLU, ``fc2``; then, for each of the layer's m cells, n + 1 values
    (the n warehouse cells and a zero cell) divided by the sum of their absolute values plus
    1e-3, and mixed with ``temp_bias`` (1 at each cell's assigned warehouse cell) by the
    temperature t: ``(1 - t) * a + t * temp_bias``.

    With ``nonlocal_basis_ratio`` < 1, ``fc2`` gives the layer's own cells, a smaller basis and
    the zero cell; ``fc3`` maps the basis to the warehouse's other cells, and ``basis_bias`` is
    added (the official parameter-saving option).

    Names and shapes follow the official ``Attention`` (``fc1``, ``norm1``, ``fc2``, ``fc3``,
    ``basis_bias``). Shapes: input [N, C_in, H, W], temperature [] -> [N, m, n].
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_cells: int,
        layout: CellLayout,
        cell_num_ratio: float,
        nonlocal_basis_ratio: float = 1.0,
        norm: AttentionNorm = "batch",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        m = layout.mixtures
        self.num_cells, self.mixtures, self.norm_kind = num_cells, m, norm
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_channels, hidden_channels, bias=norm != "batch", **kw)
        if norm == "batch":
            self.norm1 = nn.BatchNorm1d(hidden_channels, **kw)
        elif norm == "layer":
            self.norm1 = nn.GroupNorm(1, hidden_channels, **kw)
        else:
            self.norm1 = nn.Identity()
        self.nonlocal_basis = nonlocal_basis_ratio < 1
        if self.nonlocal_basis:
            self.local_cells = int(cell_num_ratio * m)
            self.offset = layout.offset
            nonlocal_cells = num_cells - self.local_cells
            self.num_basis = max(int(nonlocal_cells * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(hidden_channels, (self.local_cells + self.num_basis + 1) * m,
                                 bias=False, **kw)
            with warnings.catch_warnings():  # a warehouse of one layer has no other cells
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                self.fc3 = nn.Linear(self.num_basis, nonlocal_cells, bias=False, **kw)
            self.basis_bias = nn.Parameter(torch.zeros((num_cells + 1) * m, **kw))
        else:
            self.fc2 = nn.Linear(hidden_channels, (num_cells + 1) * m, bias=True, **kw)
        self.register_buffer("temp_bias", torch.zeros((num_cells + 1) * m, **kw),
                             persistent=False)
        self.set_assignment(layout, cell_num_ratio)
        self.reset_parameters()

    @torch.no_grad()
    def set_assignment(self, layout: CellLayout, cell_num_ratio: float) -> None:
        """Point ``temp_bias`` at the warehouse cells the layer starts from (its offset)."""
        n, m = self.num_cells, self.mixtures
        slots = assigned_cells(m, layout.offset, cell_num_ratio, n)
        self.temp_bias.zero_()
        self.temp_bias[torch.arange(m) * (n + 1) + slots] = 1
        if self.nonlocal_basis:
            self.offset = layout.offset

    def reset_parameters(self) -> None:
        """Linear weights Kaiming-normal (fan_out, ReLU gain), biases 0, norm weight 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module.weight.numel():
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm1d, nn.GroupNorm)):
                module.reset_parameters()
        if self.nonlocal_basis:
            nn.init.zeros_(self.basis_bias)

    def logits(self, x: Tensor) -> Tensor:
        """The unnormalised values [N, m, n + 1] for input [N, C_in, H, W]."""
        if self.norm_kind == "batch" and self.training and x.shape[0] == 1:
            raise ValueError(
                "KWConv2d got a training batch of one sample: its attention's BatchNorm "
                "(attention_norm='batch', the official layout) needs more than one; use "
                "attention_norm='layer' (or 'none') to train at any batch size"
            )
        h = torch.relu(self.norm1(self.fc1(self.avgpool(x).flatten(1))))
        z = self.fc2(h)
        n, m = x.shape[0], self.mixtures
        if not self.nonlocal_basis:
            return z.reshape(n, m, self.num_cells + 1)
        z = z.reshape(n * m, self.local_cells + self.num_basis + 1)
        own, basis, zero = z.split([self.local_cells, self.num_basis, 1], dim=1)
        others = self.fc3(basis)
        z = torch.cat([others[:, :self.offset], own, others[:, self.offset:], zero], dim=1)
        return z.reshape(n, m, self.num_cells + 1) + self.basis_bias.reshape(m, -1)

    def forward(self, x: Tensor, temperature: Tensor) -> Tensor:
        z = self.logits(x)
        z = z / (z.abs().sum(dim=2, keepdim=True) + NORMALISER_EPS)
        bias = self.temp_bias.reshape(self.mixtures, self.num_cells + 1)
        z = (1 - temperature) * z + temperature * bias
        return z[:, :, :-1]

    def macs(self) -> int:
        """MACs per image of the Linear layers (on the pooled input)."""
        macs = self.fc1.in_features * self.fc1.out_features
        macs += self.fc2.in_features * self.fc2.out_features
        if self.nonlocal_basis:
            macs += self.mixtures * self.fc3.in_features * self.fc3.out_features
        return macs


@shared_notes
class KWConv2d(DynamicConvBase):
    """KernelWarehouse convolution: the kernel [C_out, C_in/groups, kH, kW] is cut into m cells
    of the warehouse's cell shape (channels, and with spatial partition 1x1 positions); for each
    sample, cell j is ``sum_i a[n, j, i] * cells[i]`` over the n cells of the shared
    :class:`Warehouse`, with the attention of :class:`KWAttention`.

    {conv_args}

    Args:
        bias: a static bias [C_out] added after the convolution (official default: none).
        warehouse: the :class:`Warehouse` whose cells the layer mixes (shared with the other
            layers built with it; :class:`Warehouses` gives one per name); ``None`` builds the
            layer its own, with ``cell_num_ratio`` 1.
        reduction, min_hidden: the attention's hidden width is
            ``max(int(in_channels * reduction), min_hidden)`` (official: 1/16 and 16).
        nonlocal_basis_ratio: < 1 maps the warehouse's other cells through a smaller basis
            (official option, e.g. 1/16 in ResNet-50 1/2x); 1 (default) does not.
        attention_norm: ``'batch'`` (official BatchNorm1d; needs more than one sample per
            training batch), ``'layer'`` (per sample, any batch) or ``'none'``.
        temperature: t in [0, 1], the weight of each cell's assigned warehouse cell: the
            official recipe anneals it from 1 to 0 over the first epochs; evaluation runs at 0
            (:class:`~dynconv.layers.temperature.TemperatureSchedule` does both). Saved in the
            state_dict.

    Parameters: the warehouse's ``warehouse.cells`` [n, c_out, c_in, ckH, ckW] (shared),
    ``attention.*``, ``bias`` [C_out] if any, and the buffers ``temperature`` and
    ``cell_offset`` (the layer's first own cell in the warehouse).

    {shapes}
    """

    #: Annealing ends at, and evaluation runs at, temperature 0 (see DynamicConvBase).
    final_temperature = 0.0
    #: The dimensions of the official cells of this layer (1 in the official KWLinear).
    official_cell_dims = 2
    layout: CellLayout
    cell_offset: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        warehouse: Warehouse | None = None,
        reduction: float = 0.0625,
        min_hidden: int = 16,
        nonlocal_basis_ratio: float = 1.0,
        attention_norm: AttentionNorm = "batch",
        temperature: float = 0.0,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode=padding_mode, device=device, dtype=dtype,
        )
        check_bool(bias, "bias")
        self.reduction = check_positive_float(reduction, "reduction")
        self.min_hidden = check_int(min_hidden, "min_hidden")
        self.nonlocal_basis_ratio = check_ratio(nonlocal_basis_ratio, "nonlocal_basis_ratio")
        if attention_norm not in ATTENTION_NORMS:
            raise ValueError(f"attention_norm must be one of {ATTENTION_NORMS}, got "
                             f"{attention_norm!r}")
        self.attention_norm = attention_norm
        if warehouse is None:
            warehouse = Warehouse(device=device, dtype=dtype)
        elif not isinstance(warehouse, Warehouse):
            raise TypeError(f"warehouse must be a dynconv Warehouse (or None), got "
                            f"{type(warehouse).__name__}")
        self.set_temperature(temperature)
        self.method = "auto"
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, **self._factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("cell_offset", torch.zeros((), dtype=torch.long, device=device))
        self.warehouse = warehouse
        warehouse.join(self, device, dtype)

    # -- the warehouse's side --------------------------------------------------------------

    @property
    def hidden_channels(self) -> int:
        return max(int(self.in_channels * self.reduction), self.min_hidden)

    def _set_layout(self, layout: CellLayout, rebuild: bool = True) -> None:
        """Take the cells ``layout`` gives (called by the warehouse); ``rebuild``: a fresh
        attention for the warehouse's cell count, else only the assignment moves."""
        self.layout = layout
        self.cell_offset.fill_(layout.offset)
        cells = self.warehouse.cells
        if rebuild:
            self.attention = KWAttention(
                self.in_channels, self.hidden_channels, self.warehouse.num_cells, layout,
                self.warehouse.cell_num_ratio, self.nonlocal_basis_ratio, self.attention_norm,
                device=cells.device, dtype=cells.dtype,
            ).train(self.training)
        else:
            self.attention.set_assignment(layout, self.warehouse.cell_num_ratio)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation of what is the layer's own: its attention
        (:meth:`KWAttention.reset_parameters`), the warehouse cells it brought
        (:meth:`Warehouse.reset_cells`) and a zero bias; the other layers' cells are left as
        they are. (The models' ``init_weights`` calls it after initialising the static layers.)"""
        self.attention.reset_parameters()
        self.warehouse.reset_cells(self)
        if self.bias is not None:
            self.bias.zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The saved offset says which cells are the layer's own, whatever order built it; a
        # state_dict without one (the official layout) keeps the current offset.
        offset = state_dict.get(prefix + "cell_offset")
        if isinstance(offset, Tensor) and offset.numel() == 1:
            value, n = int(offset), self.warehouse.num_cells
            if not 0 <= value <= n - self.layout.own_cells:
                error_msgs.append(
                    f"{prefix}cell_offset is {value}, but the layer's {self.layout.own_cells} "
                    f"cells do not fit there in a warehouse of {n} cells"
                )
            elif value != self.layout.offset:
                layout = self.layout
                self._set_layout(CellLayout(layout.groups_spatial, layout.groups_out,
                                            layout.groups_in, value, layout.own_cells),
                                 rebuild=False)
        else:
            state_dict.setdefault(prefix + "cell_offset", self.cell_offset.clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- temperature -------------------------------------------------------------------------

    def set_temperature(self, value: float) -> None:
        """Set t, the weight of the assigned cells, a number in [0, 1]."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"temperature must be a number, got {value!r} "
                            f"({type(value).__name__})")
        if not 0 <= value <= 1:
            raise ValueError(f"a KWConv2d temperature must be in [0, 1] (1 at the start of "
                             f"training, 0 at its end and in evaluation), got {value}")
        self.temperature.fill_(float(value))

    def scheduled_temperature(self, schedule: Any, epoch: int, iteration: int,
                              iterations_per_epoch: int) -> float:
        """The official schedule: t goes from 1 to 0 along ``schedule``'s annealing."""
        return schedule.remaining(epoch, iteration, iterations_per_epoch)

    # -- computation -------------------------------------------------------------------------

    def _parameter_dtype(self) -> torch.dtype:
        return self.warehouse.cells.dtype

    def cell_attention(self, x: Tensor) -> Tensor:
        """The mixing weights [N, m, n] of the layer's m cells over the warehouse's n cells, for
        input [N, C_in, H, W]."""
        return self.attention(x, self.temperature)

    def assemble(self, attention: Tensor) -> Tensor:
        """The per-sample kernels [N, C_out, C_in/groups, kH, kW] for mixing weights
        ``attention`` [N, m, n]: one matrix product with the cells, then the cells put in
        place (kernel positions, output channels, input channels, as the official code;
        :func:`~dynconv.functional.mix_cells`)."""
        cells = self.warehouse.cells
        return mix_cells(attention.to(cells.dtype), cells,
                         (self.out_channels, self.in_channels // self.groups, *self.kernel_size))

    def effective_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per sample the assembled kernel [N, C_out, C_in/groups, kH, kW] and the bias
        [N, C_out] (None without one) for input ``x`` [N, C_in, H, W]."""
        kernels = self.assemble(self.cell_attention(x))
        bias = None if self.bias is None else self.bias.expand(x.shape[0], -1)
        return kernels, bias

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched, output_size = self._check_input_size(x)
        self.warehouse.check_input(x, type(self).__name__)
        cells = self.warehouse.cells
        attention = self.cell_attention(x).to(cells.dtype)
        xp, geometry = self._pad(x)
        check_per_sample_method(self.method, x.shape[0])
        out = warehouse_conv2d_unchecked(xp, attention, cells, self.bias, geometry, output_size,
                                         method=self.method)
        return out.squeeze(0) if unbatched else out

    def attention_record(self, x: Tensor) -> dict[str, Tensor]:
        """``{'cells': [N, m, n]}``, each kernel cell's weights over the warehouse cells."""
        x, _ = self._check_input(x)
        return {"cells": self.cell_attention(x)}

    # -- the reference layout ----------------------------------------------------------------

    official_layouts: ClassVar[dict[str, str]] = {
        "kernelwarehouse": "OSVAI/KernelWarehouse (modules/kernel_warehouse.py): the layer's "
        "attention and bias; the warehouses as warehouse_manager.weights.<i> of the model",
    }

    def official_layout(self) -> str:
        """``'kernelwarehouse'``; a ``ValueError`` names what the official code cannot build
        (another attention norm or minimum hidden width, a non-square kernel, a padding
        mode)."""
        problems = self._official_geometry_problems()
        if self.attention_norm != "batch":
            problems.append(f"attention_norm={self.attention_norm!r} (official: BatchNorm1d)")
        if self.min_hidden != 16:
            problems.append(f"min_hidden={self.min_hidden} (official: 16)")
        self._refuse_layout("kernelwarehouse", problems)
        return "kernelwarehouse"

    def official_state_dict(self, layout: str | None = None) -> dict[str, Tensor]:
        """The layer's own tensors in the official layout: the attention and the bias (the
        warehouse is the model's, see :func:`dynconv.tools.official.to_official_state_dict`;
        the temperature and the cell offset are not kept there)."""
        own = self.official_layout()
        if layout is not None and layout != own:
            raise ValueError(f"{type(self).__name__} fits the {own!r} layout, not {layout!r}")
        return {k: v for k, v in self.state_dict().items()
                if k not in ("temperature", "cell_offset") and not k.startswith("warehouse.")}

    # -- conversion and cost -----------------------------------------------------------------

    @torch.no_grad()
    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Copy ``conv``'s kernel into the warehouse cells the layer starts from (at temperature
        1 each kernel cell is its assigned warehouse cell), and its bias: the layer then
        computes ``conv`` at temperature 1. Needs ``cell_num_ratio`` >= 1 (with 1/k, some cells
        start at zero)."""
        warehouse = self.warehouse
        if warehouse.cell_num_ratio < 1:
            raise NotImplementedError(
                "a KWConv2d with cell_num_ratio < 1 cannot start from a static conv: some of its "
                "kernel cells have no warehouse cell of their own"
            )
        layout, (c_out, c_in, ckh, ckw) = self.layout, warehouse.cell_shape
        kernel = conv.weight.to(warehouse.cells.dtype).reshape(
            layout.groups_out, c_out, layout.groups_in, c_in, layout.groups_spatial, ckh, ckw)
        cells = kernel.permute(4, 0, 2, 1, 3, 5, 6).reshape(-1, c_out, c_in, ckh, ckw)
        slots = assigned_cells(layout.mixtures, layout.offset, warehouse.cell_num_ratio,
                               warehouse.num_cells)
        warehouse.cells[slots.to(warehouse.cells.device)] = cells
        if self.bias is not None:
            self.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(self.bias))

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Refused (``NotImplementedError``), as it cannot be exact: ``scale`` [C_out] would have
        to go into the warehouse cells, which the layer's other output channels and kernel
        positions mix too (and the warehouse's other layers), so a following BatchNorm stays;
        :func:`dynconv.fold` gives a static convolution that takes it exactly."""
        raise NotImplementedError(
            "a KWConv2d cannot absorb a per-channel scale exactly: its kernel is mixed from "
            "warehouse cells that its other output channels and kernel positions (and the "
            "warehouse's other layers) share; keep the BatchNorm, or fold the layer into a "
            "static convolution first (dynconv.fold)"
        )

    def macs(self, input_size: tuple[int, int]) -> LayerMacs:
        """The convolution, the attention's Linear layers and the assembly: m * n * cell size
        multiply-accumulates (one matrix product of the weights with the cells)."""
        cells = self.warehouse.cells
        assembly = self.layout.mixtures * cells.numel()
        return LayerMacs(self._conv_macs(input_size), self.attention.macs(), assembly)

    def functional_macs(self, input_size: tuple[int, int]) -> int:
        """The convolution and the assembly (the attention is child modules), and the
        normalisation is not counted."""
        macs = self.macs(input_size)
        return macs.conv + macs.aggregation

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.bias is None:
            s += ", bias=False"
        layout = self.__dict__.get("layout")  # none while a layer has not joined its warehouse
        if layout is not None:
            s += f", cells={layout.mixtures}/{self.warehouse.num_cells}"
        return s


class KWLinear(nn.Module):
    """KernelWarehouse linear layer (the official ``KWLinear``): ``nn.Linear``'s arguments and
    a :class:`Warehouse`; a 1x1 :class:`KWConv2d` (``conv``) over the features of each
    sample's tokens, whose attention pools over the tokens.

    Keywords after ``dtype`` go to the :class:`KWConv2d`. Shapes: [N, *, in_features] ->
    [N, *, out_features] (at least 2-D).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.conv = KWConv2d(in_features, out_features, 1, bias=bias, device=device,
                             dtype=dtype, **kwargs)
        self.conv.official_cell_dims = 1  # the official cells of a linear layer are 1-D

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[-1] != self.in_features:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"KWLinear expects input [N, *, {self.in_features}], got {got}")
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1]).transpose(1, 2).unsqueeze(-1)
        y = self.conv(tokens).squeeze(-1).transpose(1, 2)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
