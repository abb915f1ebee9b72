"""Hypothesis strategies for random convolution configurations."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from dynconv._conv_args import parse_geometry


@dataclass(frozen=True)
class ConvConfig:
    batch: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: int | tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    height: int
    width: int
    bias: bool

    def conv_kwargs(self) -> dict:
        return {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }


#: An empty batch in a grouped, strided, padded, dilated geometry, which the property tests of the
#: ops run explicitly (``@example``) on top of the N = 0 that :func:`conv_configs` draws.
EMPTY_BATCH = ConvConfig(
    batch=0, in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2), padding=1,
    dilation=(2, 1), groups=2, padding_mode="zeros", height=7, width=9, bias=True,
)


@st.composite
def conv_configs(draw, max_batch: int = 5, padding_modes=("zeros", "reflect", "replicate",
                                                          "circular")) -> ConvConfig:
    """A small, valid 2-D convolution: grouped and depthwise included, non-square everything,
    and batches from empty (N = 0, which nn.Conv2d takes) to ``max_batch``."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups > 1
    c_in_g = 1 if depthwise else draw(st.integers(1, 3))
    c_out_g = 1 if depthwise else draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    choices = ["int", "pair", "valid"] + (["same", "same"] if stride == (1, 1) else [])
    kind = draw(st.sampled_from(choices))
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "pair":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    else:
        padding = kind
    padding_mode = draw(st.sampled_from(padding_modes))
    geometry = parse_geometry(kernel, stride, padding, dilation, groups)
    left, right, top, bottom = geometry.pads
    # The input must be large enough for the kernel, and for reflect padding larger than the pad.
    min_h = max(dilation[0] * (kernel[0] - 1) + 1 - top - bottom, top + 1, bottom + 1, 1)
    min_w = max(dilation[1] * (kernel[1] - 1) + 1 - left - right, left + 1, right + 1, 1)
    height = draw(st.integers(min_h, min_h + 6))
    width = draw(st.integers(min_w, min_w + 6))
    return ConvConfig(
        batch=draw(st.integers(0, max_batch)),
        in_channels=c_in_g * groups,
        out_channels=c_out_g * groups,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        height=height,
        width=width,
        bias=draw(st.booleans()),
    )
