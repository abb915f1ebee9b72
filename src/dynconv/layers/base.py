"""What every dynamic layer shares: ``nn.Conv2d``'s arguments, input checks, padding modes and a
temperature that is saved with the model.

:class:`DynamicConvBase` is the base of every layer; :class:`KernelBankConv` adds the bank of K
static kernels that DY-Conv, CondConv and ODConv mix per sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._conv_args import (
    ConvGeometry,
    PaddingArg,
    Pair,
    check_bool,
    check_channels,
    check_keyword_spellings,
    check_padding_mode,
    check_positive_float,
    parse_geometry,
)
from ..functional import mix_kernels
from ..functional._common import check_input_dtype

#: The paragraphs every public layer's docstring shares, written there as ``{conv_args}`` and
#: ``{shapes}`` and filled in by :func:`shared_notes` (as torch formats ``convolution_notes``
#: into its convolutions' docstrings).
LAYER_NOTES = {
    "conv_args": "Takes ``nn.Conv2d``'s arguments; the keyword-only ones are the layer's own.",
    "shapes": (
        "Shapes: input [N, C_in, H, W] or [C_in, H, W] -> output [N, C_out, H_out, W_out] (or\n"
        "    [C_out, H_out, W_out]), H_out and W_out as for ``nn.Conv2d``."
    ),
}

_Layer = TypeVar("_Layer", bound=type)


def shared_notes(cls: _Layer) -> _Layer:
    """Class decorator: fill the :data:`LAYER_NOTES` placeholders of the class's docstring."""
    doc = cls.__doc__ or ""
    for key, text in LAYER_NOTES.items():
        doc = doc.replace("{" + key + "}", text)
    cls.__doc__ = doc
    return cls


class DynamicConvBase(nn.Module):
    """Base of the dynamic layers: the arguments and checks of ``nn.Conv2d``, plus a temperature.

    Takes the convolution's geometry (``in_channels`` to ``groups``) in ``nn.Conv2d``'s order,
    and the rest by keyword only: ``padding_mode``, ``temperature``, ``device``, ``dtype``.

    The temperature is a buffer: it moves with the module, is saved in the state_dict, and a
    state_dict without it (every reference checkpoint) still loads with ``strict=True``.
    """

    temperature: Tensor
    #: Whether :func:`dynconv.export_onnx` can give the layer a dynamic batch dimension; a layer
    #: whose exported graph depends on the batch size sets it to False (the export then warns
    #: and fixes the batch).
    export_dynamic_batch: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every layer type: the reference code's spelling of a keyword (ODConv's kernel_num...)
        # raises a TypeError that names the layer's own.
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = check_keyword_spellings(cls.__init__)  # type: ignore[method-assign]

    @check_keyword_spellings
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        *,
        padding_mode: str = "zeros",
        temperature: float = 1.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        geometry = parse_geometry(kernel_size, stride, padding, dilation, groups)
        self.in_channels, self.out_channels = check_channels(
            in_channels, out_channels, geometry.groups
        )
        self.kernel_size = geometry.kernel_size
        self.stride = geometry.stride
        self.padding = geometry.padding
        self.dilation = geometry.dilation
        self.groups = geometry.groups
        self.padding_mode = check_padding_mode(padding_mode)
        self._geometry = geometry
        temperature = check_positive_float(temperature, "temperature")
        self.register_buffer(
            "temperature", torch.tensor(temperature, dtype=torch.float32, device=device)
        )
        self._factory_kwargs = {"device": device, "dtype": dtype}

    # -- temperature ---------------------------------------------------------------------------

    #: The temperature that annealing ends at and evaluation runs at: 1 for the softmax and
    #: sigmoid attentions (KernelWarehouse's mixing weight ends at 0).
    final_temperature: ClassVar[float] = 1.0

    def set_temperature(self, value: float) -> None:
        """Set the softmax/sigmoid temperature of the attention (a float > 0)."""
        self.temperature.fill_(check_positive_float(value, "temperature"))

    def scheduled_temperature(self, schedule: Any, epoch: int, iteration: int,
                              iterations_per_epoch: int) -> float:
        """The layer's temperature at iteration ``iteration`` of epoch ``epoch`` under
        ``schedule`` (a :class:`~dynconv.layers.temperature.TemperatureSchedule`): its value."""
        return schedule.at(epoch, iteration, iterations_per_epoch)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Reference checkpoints do not save the temperature: keep the current one.
        state_dict.setdefault(prefix + "temperature", self.temperature.detach().clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- the reference layouts (dynconv.tools.official) -----------------------------------------

    #: The reference layouts the layer type can be written in, name -> where it comes from.
    official_layouts: ClassVar[dict[str, str]] = {}

    def official_layout(self) -> str:
        """The name of the reference layout this layer's state_dict fits (one of
        :attr:`official_layouts`); a ``ValueError`` names what the layer holds that the
        reference code cannot (a layer type without one raises it always)."""
        raise ValueError(f"{type(self).__name__} has no reference layout")

    def official_state_dict(self, layout: str | None = None) -> dict[str, Tensor]:
        """The layer's tensors in the layout of the reference code (keys relative to the layer):
        its state_dict without the temperature, which the reference code keeps as a plain
        attribute (so its modules refuse the key); ``layout``, if given, must be the layer's
        (:meth:`official_layout`), else a ``ValueError`` says which it is."""
        own = self.official_layout()
        if layout is not None and layout != own:
            raise ValueError(f"{type(self).__name__} fits the {own!r} layout, not {layout!r}")
        state = self.state_dict()
        del state["temperature"]
        return dict(state)

    def fit_to_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "") -> str | None:
        """Rebuild what the layer can take from the shapes of ``state_dict`` (its keys under
        ``prefix``) before loading it, and say what changed; ``None`` if nothing did. By default
        nothing is rebuilt (see :func:`dynconv.tools.official.load_official`)."""
        return None

    def _official_geometry_problems(self) -> list[str]:
        """What the reference code, with its int ``kernel_size`` and zero padding, cannot
        hold."""
        problems = []
        if self.kernel_size[0] != self.kernel_size[1]:
            problems.append(f"a non-square kernel {self.kernel_size}")
        if self.padding_mode != "zeros":
            problems.append(f"padding_mode={self.padding_mode!r}")
        return problems

    def _refuse_layout(self, layout: str, problems: list[str]) -> None:
        """Raise a ``ValueError`` listing ``problems`` if there are any."""
        if problems:
            raise ValueError(
                f"{type(self).__name__} cannot be written in the {layout!r} layout: it has "
                + "; ".join(problems)
            )

    # -- conversion and fusion (overridden by the layers that support them) ---------------------

    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Start from the static convolution ``conv`` (same geometry): see :func:`convert`."""
        raise NotImplementedError(f"{type(self).__name__} cannot start from a static conv")

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Make the layer compute ``scale * y + shift`` per output channel ([C_out] each),
        exactly, in place; raise ``NotImplementedError`` if it cannot."""
        raise NotImplementedError(f"{type(self).__name__} cannot absorb an affine map")

    # -- inspection -----------------------------------------------------------------------------

    def attention_record(self, x: Tensor) -> dict[str, Tensor]:
        """What the layer decided for input ``x`` [N, C_in, H, W] (or [C_in, H, W]), as tensors
        with a leading batch dimension N, e.g. ``'kernel'`` [N, K]; called right after the
        layer's forward on ``x`` by :class:`dynconv.tools.inspection.AttentionCapture`, and must not
        change the layer's state. A layer type overrides it to be inspected."""
        return {}

    # -- deployment and cost: what fold, profile and the FLOP counters ask of the layer ----------

    def effective_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The kernel [N, C_out, C_in/groups, kH, kW] and bias [N, C_out] (or None) that the layer
        applies to each sample of its input ``x`` [N, C_in, H, W]: ``layer(x)[n]`` equals
        ``F.conv2d(x[n], weight[n], bias[n], ...)`` with the layer's geometry and padding.
        :func:`dynconv.fold` averages them; a layer type without one kernel per sample (DRConv:
        one per region) does not override it and is left dynamic."""
        raise NotImplementedError(f"{type(self).__name__} applies no single kernel per sample")

    def macs(self, input_size: tuple[int, int]) -> LayerMacs:
        """The analytic multiply-accumulates for one image of spatial size ``input_size``
        (H_in, W_in), whatever formulation runs (see :class:`LayerMacs`); every layer type
        overrides it (:func:`dynconv.tools.cost.layer_macs`, ``dynconv profile``)."""
        raise NotImplementedError(f"{type(self).__name__} has no MAC rule")

    def functional_macs(self, input_size: tuple[int, int]) -> int:
        """The MACs per image that are not computed by calling a child module: what a counter
        that hooks modules (thop) misses. By default the per-sample convolution and the kernel
        aggregation (the attention branch's convolutions are child modules)."""
        macs = self.macs(input_size)
        return macs.conv + macs.aggregation

    def _conv_macs(self, input_size: tuple[int, int]) -> int:
        """The per-sample convolution's MACs for one image: one kernel at every output pixel."""
        h_out, w_out = self._geometry.output_size(*input_size)
        return kernel_numel(self) * h_out * w_out

    # -- input and padding ---------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> tuple[Tensor, bool]:
        """Return (x as [N, C, H, W], whether it came unbatched as [C, H, W])."""
        x, unbatched, _ = self._check_input_size(x)
        return x, unbatched

    def _check_input_size(self, x: Tensor) -> tuple[Tensor, bool, Pair]:
        """:meth:`_check_input`, and the output size (H_out, W_out) it checked.

        As ``nn.Conv2d``: an empty batch (N = 0) is accepted; an input whose dtype is not the
        layer's is refused (a ``TypeError`` naming both), except under autocast."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        dtype = self._parameter_dtype()
        if x.dtype != dtype:  # (the check's own first test, saving a call in the hot path)
            check_input_dtype(x, dtype, name)
        if x.dim() not in (3, 4):
            raise ValueError(
                f"{name} expects input of shape [N, C, H, W] or [C, H, W], got shape "
                f"{list(x.shape)}"
            )
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} expects {self.in_channels} input channels, got input of shape "
                f"{list(x.shape)} ({x.shape[1]} channels)"
            )
        output_size = self._geometry.checked_output_size(x.shape[-2], x.shape[-1], name)
        return x, unbatched, output_size

    def _parameter_dtype(self) -> torch.dtype | None:
        """The dtype of the layer's parameters, which its input must have outside autocast
        (``None`` for a layer without any). A layer type overrides it with its own weight's,
        which is faster to reach."""
        parameter = next(self.parameters(), None)
        return None if parameter is None else parameter.dtype

    def _pad(self, x: Tensor) -> tuple[Tensor, ConvGeometry]:
        """Pad where the convolution cannot (a ``padding_mode`` other than zeros, or asymmetric
        'same' padding); return (input, the geometry of the convolution left to run on it,
        whose padding is symmetric)."""
        if self.padding_mode == "zeros" and self._geometry.symmetric_padding is not None:
            return x, self._geometry
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._geometry.pads, mode=mode), self._geometry.without_padding()

    def _conv_kwargs(self, geometry: ConvGeometry) -> dict[str, Any]:
        """``F.conv2d``'s keywords for the convolution :meth:`_pad` left."""
        return {
            "stride": self.stride,
            "padding": geometry.symmetric_padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }

    # -- printing ------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if not self.temperature.is_meta:  # a meta tensor holds no value to show
            s += f", temperature={self.temperature.item():g}"
        return s


class KernelBankConv(DynamicConvBase):
    """A dynamic layer with a bank of K static kernels (and optionally K biases).

    Takes :class:`DynamicConvBase`'s arguments, and by keyword ``num_kernels`` (K) and ``bias``
    (whether there is a bank of K biases, default True).

    The bank is stored as one 4-D parameter ``weight`` [K * C_out, C_in/groups, kH, kW], so that
    ``model.to(memory_format=torch.channels_last)`` works (a 5-D parameter makes it fail) and the
    bank reaches a dense convolution as a free view. The state_dict shows it in the reference
    layout [K, C_out, C_in/groups, kH, kW], and both layouts load. ``kernels`` is the 5-D view.

    Attributes:
        method: the formulation handed to :func:`~dynconv.functional.mixture_conv2d`,
            ``'auto'`` by default (the dispatch rule); forcing one changes the speed, not the
            result.
    """

    method: str

    def __init__(self, *args: Any, num_kernels: int, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(num_kernels, bool) or not isinstance(num_kernels, int) or num_kernels < 1:
            raise ValueError(f"num_kernels must be an int >= 1, got {num_kernels!r}")
        check_bool(bias, "bias")
        self.num_kernels = num_kernels
        self.method = "auto"
        c_out, kw = self.out_channels, self._factory_kwargs
        self.weight = nn.Parameter(
            torch.empty(num_kernels * c_out, self.in_channels // self.groups, *self.kernel_size,
                        **kw)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(num_kernels, c_out, **kw))
        else:
            self.register_parameter("bias", None)

    def _parameter_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def kernels(self) -> Tensor:
        """The kernel bank in the reference layout [K, C_out, C_in/groups, kH, kW]."""
        return self.weight.reshape(self.num_kernels, self.out_channels, *self.weight.shape[1:])

    def reset_bank(self) -> None:
        """Initialise every kernel (and bias) as ``nn.Conv2d`` initialises its one kernel."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _fill_bank(self, conv: nn.Conv2d, kernel_factor: float, bias_factor: float) -> None:
        """Set every kernel of the bank to ``kernel_factor * conv.weight`` and every bias to
        ``bias_factor * conv.bias`` (zero if ``conv`` has none)."""
        kernels = conv.weight.to(self.weight.dtype) * kernel_factor
        self.weight.copy_(kernels.repeat(self.num_kernels, 1, 1, 1))
        if self.bias is not None:
            static = conv.bias if conv.bias is not None else torch.zeros_like(self.bias[0])
            self.bias.copy_((static.to(self.bias.dtype) * bias_factor).expand_as(self.bias))

    @torch.no_grad()
    def _fold_affine_into_bank(self, scale: Tensor, shift: Tensor) -> None:
        """Scale output channel o of every kernel (and bias) by ``scale[o]`` and add ``shift[o]``
        to every bias (creating the bias bank if needed): exact when the mixing weights of the
        biases sum to one."""
        # row k * C_out + o of the stored bank is output channel o of kernel k
        self.weight.mul_(scale.repeat(self.num_kernels).reshape(-1, 1, 1, 1).to(self.weight.dtype))
        bias = torch.zeros_like(self.kernels[:, :, 0, 0, 0]) if self.bias is None else self.bias
        self.bias = nn.Parameter(bias * scale.to(bias.dtype) + shift.to(bias.dtype),
                                 requires_grad=self.weight.requires_grad)

    def _reference_weight_shape(self) -> list[int]:
        return [self.num_kernels, self.out_channels, *self.weight.shape[1:]]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        destination[key] = destination[key].reshape(self._reference_weight_shape())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        value = state_dict.get(key)
        if isinstance(value, Tensor):
            expected = self._reference_weight_shape()
            if list(value.shape) == expected or (
                value.dim() == 4 and list(value.shape) == list(self.weight.shape)
            ):
                state_dict[key] = value.reshape(self.weight.shape)
            else:
                error_msgs.append(
                    f"size mismatch for {key}: the checkpoint holds {list(value.shape)}, this "
                    f"layer expects [K, C_out, C_in/groups, kH, kW] = {expected}"
                )
                state_dict = {k: v for k, v in state_dict.items() if k != key}
                missing: list[str] = []
                super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing, unexpected_keys,
                    error_msgs,
                )
                missing_keys.extend(k for k in missing if k != key)
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def mixed(self, coefficients: Tensor) -> tuple[Tensor, Tensor | None]:
        """The bank mixed per sample, ``sum_k coefficients[n, k] * W_k``: kernels [N, C_out,
        C_in/groups, kH, kW] and biases [N, C_out] (None without a bias bank), for
        ``coefficients`` [N, K]."""
        coefficients = coefficients.to(self.weight.dtype)
        bias = None if self.bias is None else mix_kernels(coefficients, self.bias)
        return mix_kernels(coefficients, self.kernels), bias

    def _first_kernel(self, n: int) -> tuple[Tensor, Tensor | None]:
        """The bank's first kernel [N, C_out, C_in/groups, kH, kW] and bias [N, C_out] (or None)
        for each of ``n`` samples (expanded views): what a layer that mixes nothing applies."""
        bias = None if self.bias is None else self.bias[0].expand(n, -1)
        return self.kernels[0].expand(n, -1, -1, -1, -1), bias

    def _bank_macs(self, mixes_bias: bool) -> int:
        """MACs of mixing the K kernels (and, if ``mixes_bias``, the K biases) into one."""
        bias = self.num_kernels * self.out_channels if mixes_bias else 0
        return self.num_kernels * kernel_numel(self) + bias

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", num_kernels={self.num_kernels}"
        if self.bias is None:
            s += ", bias=False"
        return s


@dataclass(frozen=True)
class LayerMacs:
    """Multiply-accumulates of one convolution layer for one image.

    ``conv``: the (per-sample) convolution, ``C_out * C_in/groups * kH * kW * H_out * W_out``;
    ``attention``: the attention branch's convolutions (on the pooled input);
    ``aggregation``: mixing the kernel bank into the sample's kernel, ``K * C_out * C_in/groups *
    kH * kW`` (plus ``K * C_out`` for a bias bank).
    """

    conv: int
    attention: int = 0
    aggregation: int = 0

    @property
    def total(self) -> int:
        return self.conv + self.attention + self.aggregation


def kernel_numel(conv: nn.Module) -> int:
    """Elements of one kernel of a layer with ``nn.Conv2d``'s attributes: C_out * C_in/groups *
    kH * kW."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def pooled_conv_macs(module: nn.Module) -> int:
    """MACs of the ``nn.Conv2d`` modules in ``module`` applied to a pooled (1x1) input."""
    return sum(kernel_numel(m) for m in module.modules() if isinstance(m, nn.Conv2d))


def init_conv_fan_out_(conv: nn.Conv2d) -> None:
    """Kaiming-normal weight (fan_out, ReLU gain) and zero bias, in place: torchvision's ResNet
    initialisation of a convolution, which the official ODConv attention uses too."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
