"""A new layer type is one class: what fold, the MAC count, the FLOP counters and inspect need
are methods of the layer, and no registry of the tools is touched."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynconv import DynamicConvBase, fold, inspect_attention
from dynconv.layers.base import LayerMacs, kernel_numel, pooled_conv_macs
from dynconv.tools import cost
from dynconv.tools import fold as fold_module
from dynconv.tools.cost import count_macs, layer_macs
from dynconv.tools.counters import thop_ops


class GatedConv2d(DynamicConvBase):
    """One static kernel scaled per sample by a sigmoid gate computed from the pooled input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels,
                         kernel_size=kernel_size, **kwargs)
        self.weight = nn.Parameter(
            0.3 * torch.randn(out_channels, in_channels // self.groups, *self.kernel_size))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, 1, 1))

    def _gates(self, x: Tensor) -> Tensor:  # [N]
        return torch.sigmoid(self.gate(x).flatten() / self.temperature)

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = self._check_input(x)
        xp, padding = self._pad(x)
        out = F.conv2d(xp, self.weight, None, **self._conv_kwargs(padding))
        out = out * self._gates(x).reshape(-1, 1, 1, 1)
        return out.squeeze(0) if unbatched else out

    def effective_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.weight * self._gates(x).reshape(-1, 1, 1, 1, 1), None

    def macs(self, input_size: tuple[int, int]) -> LayerMacs:
        return LayerMacs(self._conv_macs(input_size), pooled_conv_macs(self.gate))

    def attention_record(self, x: Tensor) -> dict[str, Tensor]:
        x, _ = self._check_input(x)
        return {"kernel": self._gates(x).unsqueeze(1)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(GatedConv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(4, 2, 1)).double().eval()


def test_the_tools_take_the_layers_own_methods() -> None:
    layer = _model()[0]
    assert "GatedConv2d" not in cost._MAC_RULES.registered()
    assert "GatedConv2d" not in fold_module._RULES.registered()
    assert cost._MAC_RULES.lookup(layer) is GatedConv2d.macs
    assert fold_module._RULES.lookup(layer) is GatedConv2d.effective_kernels
    # a rule registered for a type comes before the type's own method
    fold_module.register_fold_rule(GatedConv2d, _stand_in := lambda layer, x: None)
    try:
        assert fold_module._RULES.lookup(layer) is _stand_in
    finally:
        fold_module._RULES._rules.pop(GatedConv2d)
    assert fold_module._RULES.lookup(nn.Conv2d(1, 1, 1)) is None  # no rule, no method


def test_fold_uses_the_layers_own_kernels() -> None:
    model = _model()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    layer = model[0]
    weight, _ = layer.effective_kernels(x)
    for n in range(5):  # the layer's claim, checked: its output is a conv with those kernels
        xp = F.pad(x[n : n + 1], (1, 1, 1, 1), mode="reflect")
        torch.testing.assert_close(layer(x[n : n + 1]), F.conv2d(xp, weight[n]))
    report = fold(model, x, measure_speed=False)
    folded = report.model[0]
    assert isinstance(folded, nn.Conv2d) and folded.padding_mode == "reflect"
    torch.testing.assert_close(folded.weight, weight.mean(0))
    assert report.layers[0].samples == 5 and report.layers[0].skipped is None
    one = x[:1]  # calibrated on one sample, the fold is exact for it
    torch.testing.assert_close(fold(model, one, measure_speed=False).model(one), model(one))


def test_mac_count_and_thop_use_the_layers_own_rule() -> None:
    model = _model()
    layer = model[0]
    expected = LayerMacs(4 * 3 * 9 * 6 * 6, 3)
    assert layer_macs(layer, (6, 6)) == expected == layer.macs((6, 6))
    assert kernel_numel(layer) == 4 * 3 * 9
    x = torch.zeros(2, 3, 6, 6, dtype=torch.float64)
    assert count_macs(model, x) == expected.total + 2 * 4 * 36
    assert GatedConv2d in thop_ops()
    thop = pytest.importorskip("thop")
    counted = thop.profile(model, inputs=(x,), custom_ops=thop_ops(), verbose=False)[0]
    pooling = 2 * (36 * 3 + 3)  # thop's adaptive pooling: H*W adds and a divide per output
    assert counted == 2 * expected.total + 2 * 2 * 4 * 36 + pooling  # thop counts ReLU as 0


def test_inspect_reads_the_layers_record() -> None:
    model = _model()
    x = torch.randn(7, 3, 6, 6, dtype=torch.float64)
    record = inspect_attention(model, [x[:4], x[4:]])["0"]
    assert record.samples == 7
    torch.testing.assert_close(record.kernel, model[0]._gates(x).float().unsqueeze(1))
