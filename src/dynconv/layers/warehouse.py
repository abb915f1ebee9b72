"""KernelWarehouse (Li and Yao, ICML 2024): kernel cells shared by the layers of a stage.

A :class:`Warehouse` holds ``n`` kernel cells [n, c_out, c_in, ckH, ckW]; every
:class:`~dynconv.layers.kwconv.KWConv2d` that joins it splits its kernel into ``m`` cells of that
shape and assembles each, per sample, as a mixture of the ``n`` warehouse cells. The warehouse
derives its cell shape and count from its layers as they join (greatest common divisors of their
widths, ``cell_num_ratio``), so a model needs no reserve/store/allocate step: build the layers
with the warehouse, then train or load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from .._conv_args import Pair, check_bool

#: A layer that joins a warehouse (``KWConv2d``, which imports this module): it has
#: ``nn.Conv2d``'s attributes, ``layout`` and ``_set_layout(layout)``.
KWConv2d = nn.Module


#: The keywords of :class:`Warehouse` that :func:`dynconv.convert`, the models and the YOLO
#: blocks take beside their layers' own (``device`` and ``dtype`` go to both).
WAREHOUSE_SETTINGS = ("cell_num_ratio", "cell_in_ratio", "cell_out_ratio", "spatial_partition")


def check_ratio(value: object, name: str) -> float:
    """A finite float > 0 (the cell ratios)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_cell_num_ratio(value: object) -> float:
    """``cell_num_ratio``: an integer r >= 1 (r warehouse cells per kernel cell) or 1/k for an
    integer k >= 2 (one warehouse cell per k kernel cells), the two cases of the official
    temperature initialisation."""
    value = check_ratio(value, "cell_num_ratio")
    if value >= 1 and value == int(value):
        return value
    if value < 1 and abs(1 / value - round(1 / value)) < 1e-9:
        return 1 / round(1 / value)
    raise ValueError(
        "cell_num_ratio must be an integer >= 1 (e.g. 1, 2, 4) or 1/k for an integer k "
        f"(e.g. 0.5, 0.25), got {value}"
    )


@dataclass(frozen=True)
class CellLayout:
    """How one layer's kernel [C_out, C_in/groups, kH, kW] is cut into warehouse-shaped cells.

    ``groups_spatial``, ``groups_out``, ``groups_in``: cells along the kernel positions, the
    output and the input channels; ``mixtures`` (m) is their product, one mixture per cell, in
    the order (spatial, out, in) of the official code. ``offset``: the layer's first own cell in
    the warehouse; ``own_cells``: how many it was given (``consumed``).
    """

    groups_spatial: int
    groups_out: int
    groups_in: int
    offset: int
    own_cells: int

    @property
    def mixtures(self) -> int:
        return self.groups_spatial * self.groups_out * self.groups_in


def own_cells(mixtures: int, cell_num_ratio: float) -> int:
    """The warehouse cells a layer of ``mixtures`` cells brings: r per cell for a ratio r >= 1;
    for 1/k, one per cell index i with ``i % k == (i // k) % k`` (the official assignment)."""
    if cell_num_ratio >= 1:
        return mixtures * int(cell_num_ratio)
    k = round(1 / cell_num_ratio)
    return sum(1 for i in range(mixtures) if i % k == (i // k) % k)


def assigned_cells(mixtures: int, offset: int, cell_num_ratio: float, num_cells: int) -> Tensor:
    """The warehouse cell each of the layer's ``mixtures`` cells starts as (at temperature 1),
    as an index [m] into the ``num_cells + 1`` attention slots; slot ``num_cells`` is the
    attention's extra zero cell (the official ``temp_bias`` initialisation)."""
    slots = []
    if cell_num_ratio >= 1:
        step = int(cell_num_ratio)
        slots = [offset + i * step for i in range(mixtures)]
    else:
        k, next_cell = round(1 / cell_num_ratio), offset
        for i in range(mixtures):
            if i % k == (i // k) % k:
                slots.append(next_cell)
                next_cell += 1
            else:
                slots.append(num_cells)
    return torch.tensor(slots, dtype=torch.long)


class Warehouse(nn.Module):
    """Kernel cells shared by the :class:`~dynconv.KWConv2d` layers built with it.

    Args:
        cell_num_ratio: warehouse cells per kernel cell of its layers: an integer r >= 1 (the
            official 1x, 2x, 4x models) or 1/k (1/2x, 1/4x: fewer cells than the layers cut).
        cell_in_ratio, cell_out_ratio: a cell's input (output) channels as a fraction of the
            greatest common divisor of its layers' input (output) channels (official
            ``cell_inplane_ratio``, ``cell_outplane_ratio``; 0.5 in the 1/2x and 1/4x models).
        spatial_partition: cut kernels into 1x1 cells (official default); without it, every
            layer of the warehouse must have the same kernel size, which is the cells'.
        device, dtype: of the cells.

    Parameters: ``cells`` [n, c_out, c_in, ckH, ckW]. Every layer that joins re-derives the cell
    shape and count and re-initialises the cells and its layers' attentions (the official
    ``store()`` and ``allocate()``), so build all its layers before training or loading.
    A layer built without a warehouse gets its own.

    The warehouse is a child module of each of its layers, so the state_dict holds the cells
    under every layer (one tensor, as tied weights), ``model.to()``, ``copy.deepcopy`` and DDP
    treat it as one parameter, and the layers' cell offsets are saved with them: a state_dict
    loads into the same model whatever order its layers were built in.
    """

    cells: nn.Parameter

    def __init__(
        self,
        cell_num_ratio: float = 1.0,
        *,
        cell_in_ratio: float = 1.0,
        cell_out_ratio: float = 1.0,
        spatial_partition: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cell_num_ratio = check_cell_num_ratio(cell_num_ratio)
        self.cell_in_ratio = check_ratio(cell_in_ratio, "cell_in_ratio")
        self.cell_out_ratio = check_ratio(cell_out_ratio, "cell_out_ratio")
        self.spatial_partition = check_bool(spatial_partition, "spatial_partition")
        # the layers, in the order they joined: a plain list, so that they are not children
        self._members: list[KWConv2d] = []
        self.cells = nn.Parameter(torch.empty(0, 1, 1, 1, 1, device=device, dtype=dtype))

    # -- layout --------------------------------------------------------------------------------

    @property
    def members(self) -> tuple[KWConv2d, ...]:
        """The layers that share the warehouse, in the order they joined."""
        return tuple(self._members)

    @property
    def num_cells(self) -> int:
        """n, the number of cells."""
        return self.cells.shape[0]

    @property
    def cell_shape(self) -> tuple[int, int, int, int]:
        """(c_out, c_in, ckH, ckW) of one cell."""
        return tuple(self.cells.shape[1:])  # type: ignore[return-value]

    def _cell_shape_for(self, layers: list[KWConv2d]) -> tuple[int, int, Pair]:
        c_out = math.gcd(*(layer.out_channels for layer in layers))
        c_in = math.gcd(*(layer.in_channels // layer.groups for layer in layers))
        c_out = max(int(c_out * self.cell_out_ratio), 1)
        c_in = max(int(c_in * self.cell_in_ratio), 1)
        if self.spatial_partition:
            kernel: Pair = (1, 1)
        else:
            sizes = sorted({layer.kernel_size for layer in layers})
            if len(sizes) > 1:
                raise ValueError(
                    "a Warehouse with spatial_partition=False needs one kernel size for all its "
                    f"layers, got kernel sizes {sizes}; use spatial_partition=True (1x1 cells) "
                    "or one warehouse per kernel size"
                )
            kernel = sizes[0]
        for layer in layers:
            c_in_g = layer.in_channels // layer.groups
            if layer.out_channels % c_out or c_in_g % c_in:
                raise ValueError(
                    f"cells of {c_out} output x {c_in} input channels (cell_out_ratio="
                    f"{self.cell_out_ratio:g}, cell_in_ratio={self.cell_in_ratio:g} of the "
                    "greatest common divisors) cannot partition a layer of "
                    f"{layer.out_channels} output x {c_in_g} input channels per group"
                )
        return c_out, c_in, kernel

    def join(self, layer: KWConv2d, device: Any = None, dtype: torch.dtype | None = None
             ) -> None:
        """Add ``layer``, re-derive the cells and re-initialise every layer's attention."""
        cells = self.cells
        if (dtype is not None and torch.empty(0, dtype=dtype).dtype != cells.dtype) or (
                device is not None and torch.empty(0, device=device).device != cells.device):
            raise ValueError(
                f"{type(layer).__name__} (device={device}, dtype={dtype}) cannot join a "
                f"Warehouse on {cells.device} with dtype {cells.dtype}: build both on one "
                "device and dtype"
            )
        layers = [*self._members, layer]
        c_out, c_in, kernel = self._cell_shape_for(layers)  # raises before anything changes
        self._members.append(layer)
        layouts, offset = [], 0
        for member in layers:
            gs = (member.kernel_size[0] // kernel[0]) * (member.kernel_size[1] // kernel[1])
            go = member.out_channels // c_out
            gi = member.in_channels // member.groups // c_in
            own = own_cells(gs * go * gi, self.cell_num_ratio)
            layouts.append(CellLayout(gs, go, gi, offset, own))
            offset += own
        with torch.no_grad():
            self.cells = nn.Parameter(torch.empty(offset, c_out, c_in, *kernel,
                                                  device=cells.device, dtype=cells.dtype),
                                      requires_grad=cells.requires_grad)
            for member, layout in zip(layers, layouts):
                member._set_layout(layout)
                self.reset_cells(member)

    @torch.no_grad()
    def reset_cells(self, layer: KWConv2d) -> None:
        """Initialise ``layer``'s own cells as the official code does: Kaiming-normal (fan_out,
        ReLU gain) over the block of its cells."""
        layout = layer.layout
        block = self.cells[layout.offset:layout.offset + layout.own_cells]
        if block.numel():
            nn.init.kaiming_normal_(block.view(-1, *block.shape[2:]), mode="fan_out",
                                    nonlinearity="relu")

    def check_input(self, x: Tensor, name: str) -> None:
        """Raise a ``ValueError`` if the cells are not on ``x``'s device (or, outside autocast,
        of its dtype)."""
        cells = self.cells
        if cells.device != x.device:
            raise ValueError(
                f"{name}'s Warehouse is on {cells.device} but its input is on {x.device}: move "
                "every model that shares the warehouse to one device"
            )

    def extra_repr(self) -> str:
        n, c_out, c_in, kh, kw = self.cells.shape
        s = (f"cells={n}, cell_shape=({c_out}, {c_in}, {kh}, {kw}), layers={len(self._members)}"
             f", cell_num_ratio={Fraction(self.cell_num_ratio).limit_denominator(64)}")
        if self.cell_in_ratio != 1 or self.cell_out_ratio != 1:
            s += f", cell_in_ratio={self.cell_in_ratio:g}, cell_out_ratio={self.cell_out_ratio:g}"
        if not self.spatial_partition:
            s += ", spatial_partition=False"
        return s


class Warehouses:
    """Declarative sharing: one :class:`Warehouse` per name, all with the same settings, made
    on first use. ``shop = Warehouses(cell_num_ratio=0.5)``; then every layer built with
    ``warehouse=shop['stage2']`` shares that stage's cells (the official ``sharing_range``,
    without parsing layer names).

    Args: those of :class:`Warehouse`, for every warehouse it makes.
    """

    def __init__(self, cell_num_ratio: float = 1.0, **settings: Any) -> None:
        self.settings = {"cell_num_ratio": cell_num_ratio, **settings}
        Warehouse(**self.settings)  # check the settings now, not at the first name
        self._made: dict[str, Warehouse] = {}

    def __getitem__(self, name: str) -> Warehouse:
        if not isinstance(name, str):
            raise TypeError(f"a warehouse name must be a str, got {name!r}")
        if name not in self._made:
            self._made[name] = Warehouse(**self.settings)
        return self._made[name]

    def __contains__(self, name: object) -> bool:
        return name in self._made

    def __iter__(self):
        return iter(self._made)

    def __len__(self) -> int:
        return len(self._made)

    def items(self) -> list[tuple[str, Warehouse]]:
        """(name, warehouse) pairs, in the order they were made."""
        return list(self._made.items())

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"Warehouses({settings}; {sorted(self._made)})"


#: Where the official code keeps warehouse i: ``Warehouse_Manager.weights`` of the model.
OFFICIAL_WAREHOUSE_KEY = "warehouse_manager.weights.{}"


def model_warehouses(model: nn.Module) -> list[tuple[Warehouse, list[str]]]:
    """The warehouses used in ``model``, each with every path it sits under (one per layer,
    e.g. ``'layer2.0.conv2.warehouse'``), in module order: the official code's warehouse order
    for its models, whose first layer of each warehouse comes in the order the warehouses were
    declared."""
    found: dict[int, tuple[Warehouse, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Warehouse):
            found.setdefault(id(module), (module, []))[1].append(name)
    return list(found.values())


def check_official_order(warehouse: Warehouse, members_in_module_order: list[Any]) -> str | None:
    """Why the official ``allocate()`` would not give ``warehouse``'s layers the cells they
    have (it hands them out in module order), or None if it would."""
    offset = 0
    for layer in members_in_module_order:
        if layer.layout.offset != offset:
            return (f"its layers' cells are not in module order (a layer starts at cell "
                    f"{layer.layout.offset}, the official code would start it at {offset})")
        offset += layer.layout.own_cells
    if offset != warehouse.num_cells:
        return f"its layers use {offset} of its {warehouse.num_cells} cells"
    return None
