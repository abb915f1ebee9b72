"""YOLO-style blocks: Ultralytics' layout, dynamic variants, and exact BatchNorm folding."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from torch import nn

import dynconv
from dynconv.blocks import yolo

# (block, args) -> (number of state_dict entries, parameters, fingerprint of names and shapes),
# read off Ultralytics 8.4.190's blocks built with the same arguments.
ULTRALYTICS_LAYOUT = {
    ("Conv", (16, 32, 3, 2)): (6, 4672, "5c448802a479"),
    ("Bottleneck", (32, 32)): (12, 9312, "402bdbd07b96"),
    ("C3", (32, 64, 2)): (42, 27136, "1db5b42f2d75"),
    ("C2f", (32, 64, 2, True)): (36, 47616, "10d8fe64cf9b"),
    ("C3k", (32, 32, 2)): (42, 11520, "4b45d2b110d8"),
    ("C3k2", (32, 64, 2, True)): (96, 33536, "8e4e6e09e89f"),
    ("C3k2", (32, 64, 1, False, 0.25)): (24, 6640, "4f6f0b358d69"),
}


def _fingerprint(module: nn.Module) -> tuple[int, int, str]:
    state = module.state_dict()
    text = ";".join(f"{k}:{list(v.shape)}" for k, v in state.items())
    return (len(state), sum(p.numel() for p in module.parameters()),
            hashlib.sha1(text.encode()).hexdigest()[:12])


@pytest.mark.parametrize("key", list(ULTRALYTICS_LAYOUT), ids=str)
def test_static_blocks_have_ultralytics_layout(key) -> None:
    name, args = key
    assert _fingerprint(getattr(yolo, name)(*args)) == ULTRALYTICS_LAYOUT[key]


def test_autopad() -> None:
    assert yolo.autopad(3) == 1 and yolo.autopad(5, d=2) == 4 and yolo.autopad([3, 1]) == [1, 0]
    assert yolo.autopad(3, 0) == 0


def _randomise_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)


@pytest.mark.parametrize("suffix", ["DynamicConv", "CondConv", "ODConv", "DRConv", "KWConv"])
@pytest.mark.parametrize("block", ["", "Bottleneck_", "C3_", "C2f_", "C3k_", "C3k2_"])
def test_dynamic_variants_build_run_fuse_and_pickle(block: str, suffix: str) -> None:
    torch.manual_seed(0)
    cls = getattr(yolo, block + suffix)
    args = (16, 16, 3) if not block else (16, 16) if block in ("Bottleneck_",) else (16, 16, 1)
    model = cls(*args).double().eval()
    dynamic = [m for m in model.modules() if type(m).__name__ in
               ("DynamicConv2d", "ODConv2d", "DRConv2d", "KWConv2d")]
    assert dynamic, "the variant has no dynamic convolution"
    _randomise_bn(model)
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    expected = model(x)
    folded = yolo.fuse_blocks(model)
    torch.testing.assert_close(model(x), expected)
    # CondConv and KernelWarehouse keep their BatchNorm (a shift into sigmoid-gated kernels, a
    # scale into cells that other output channels share: neither is exact)
    assert folded >= (1 if suffix not in ("CondConv", "KWConv") else 0)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is cls
    torch.testing.assert_close(clone(x), expected)


def test_c2f_odconv_keeps_outer_convs_static_and_maps_stock_weights() -> None:
    stock, dyn = yolo.C2f(32, 32, 1, True), yolo.C2f_ODConv(32, 32, 1, True)
    assert type(dyn.cv1.conv) is nn.Conv2d and type(dyn.cv2.conv) is nn.Conv2d
    assert type(dyn.m[0].cv1.conv).__name__ == "ODConv2d"
    static_keys = {k for k in stock.state_dict() if not k.startswith("m.")}
    dyn.load_state_dict({k: stock.state_dict()[k] for k in static_keys}, strict=False)
    torch.testing.assert_close(dyn.cv1.conv.weight, stock.cv1.conv.weight)


def test_c3k2_c3k_inner_blocks_are_dynamic() -> None:
    block = yolo.C3k2_DynamicConv(16, 32, 1, True)
    assert isinstance(block.m[0], yolo.C3k)
    assert type(block.m[0].m[0].cv1.conv).__name__ == "DynamicConv2d"
    with pytest.raises(ValueError, match="attn=True"):
        yolo.C3k2(16, 32, 1, False, 0.5, True)


def test_fused_static_conv_matches() -> None:
    conv = yolo.Conv(8, 16, 3, 2).eval()
    _randomise_bn(conv)
    x = torch.randn(2, 8, 9, 9)
    expected = conv(x)
    assert conv.fuse() and isinstance(conv.bn, nn.Identity)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.forward_fuse(x), expected, rtol=1e-5, atol=1e-5)


def test_kw_blocks_share_one_warehouse_per_block_and_train_at_batch_one() -> None:
    """A 'kw' block's layers share one warehouse, made from the settings among conv_kwargs and
    handed to its inner blocks (a C3k2's C3k included); the inner blocks that C3k2 and C3k
    build through their base and replace join none (every member of the warehouse is in the
    block); another block has another. They train at batch 1 (attention_norm='layer')."""
    torch.manual_seed(0)
    block = yolo.C3k2_KWConv(16, 32, 2, True, conv_kwargs={"cell_num_ratio": 2})
    layers = [m for m in block.modules() if isinstance(m, dynconv.KWConv2d)]
    warehouse = layers[0].warehouse
    assert len(layers) == 8 and all(layer.warehouse is warehouse for layer in layers)
    assert set(warehouse.members) == set(layers)
    assert warehouse.cell_num_ratio == 2 and layers[0].attention_norm == "layer"
    assert yolo.C2f_KWConv(16, 16, 1).m[0].cv1.conv.warehouse is not warehouse
    single = yolo.KWConv(16, 16, 3, conv_kwargs={"cell_num_ratio": 0.5})
    assert single.conv.warehouse.members == (single.conv,)
    assert single.conv.warehouse.cell_num_ratio == 0.5
    block.train()
    block(torch.randn(1, 16, 8, 8)).square().mean().backward()
    assert warehouse.cells.grad is not None and warehouse.cells.grad.abs().sum() > 0
