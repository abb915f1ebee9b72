"""load_checkpoint: official training files as they are, and clear reports of what does not fit."""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import dynconv
from dynconv import DynamicConv2d, LoadResult, ODConv2d, load_checkpoint

from seed_layouts import OfficialODConv2d

F64 = torch.float64


def _official_net() -> nn.Module:
    """A small network in the layout of the official od_resnet: plain stem, ODConv 3x3 with four
    kernels, a 1x1 ODConv with one kernel, plain head."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 16, 3, padding=1, bias=False),
        bn1=nn.BatchNorm2d(16),
        relu=nn.ReLU(),
        conv2=OfficialODConv2d(16, 16, 3, padding=1, kernel_num=4),
        conv3=OfficialODConv2d(16, 16, 3, padding=1, groups=16, kernel_num=4),
        conv4=OfficialODConv2d(16, 32, 1, stride=2, kernel_num=1),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(32, 10),
    ))


def _our_net() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 16, 3, padding=1, bias=False),
        bn1=nn.BatchNorm2d(16),
        relu=nn.ReLU(),
        conv2=ODConv2d(16, 16, 3, padding=1, num_kernels=4),
        conv3=ODConv2d(16, 16, 3, padding=1, groups=16, num_kernels=4),
        conv4=ODConv2d(16, 32, 1, stride=2, num_kernels=1),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(32, 10),
    ))


def _trained_official() -> nn.Module:
    """An official-layout network after a few SGD steps (so that the BatchNorm statistics and
    every parameter moved), as the official main.py would have saved it."""
    torch.manual_seed(0)
    net = _official_net().double()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = net(torch.randn(4, 3, 8, 8, dtype=F64)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.optimizer_state = optimizer.state_dict()
    return net.eval()


def _official_file_content(net: nn.Module) -> dict:
    """The official main.py saves {'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'} from a
    DistributedDataParallel model: every key carries the 'module.' prefix."""
    state = OrderedDict(("module." + k, v) for k, v in net.state_dict().items())
    state._metadata = OrderedDict(  # type: ignore[attr-defined]
        ("module." + k if k else "module", v) for k, v in net.state_dict()._metadata.items()
    )
    return {"epoch": 100, "state_dict": state, "acc": torch.tensor(73.0),
            "best_acc": torch.tensor(73.1), "optimizer": net.optimizer_state}


def test_official_training_file_loads_from_a_path_and_matches(tmp_path) -> None:
    official = _trained_official()
    path = tmp_path / "model_best.pth.tar"
    torch.save(_official_file_content(official), path)
    ours = _our_net().double()
    result = load_checkpoint(ours, path)
    assert isinstance(result, LoadResult) and result.exact
    assert result.unwrapped == ("state_dict",) and result.stripped_prefixes == ("module.",)
    assert str(result) == "all keys matched"
    assert float(ours.conv2.temperature) == 1.0  # not in the official file: the default kept
    ours.eval()
    x = torch.randn(5, 3, 8, 8, dtype=F64)
    torch.testing.assert_close(ours(x), official(x))
    # the BatchNorm statistics of the attention came along
    torch.testing.assert_close(ours.conv2.attention.bn.running_var,
                               official.conv2.attention.bn.running_var)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "nested", "module_prefix",
                                  "compiled_and_ddp", "module_object"])
def test_wrappers_and_prefixes(wrap: str) -> None:
    torch.manual_seed(1)
    source = nn.Sequential(ODConv2d(4, 8, 3), DynamicConv2d(8, 8, 3))
    state = source.state_dict()
    checkpoint = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}, "args": None},
        "nested": {"model": {"state_dict": state}},
        "module_prefix": {"module." + k: v for k, v in state.items()},
        "compiled_and_ddp": {"module._orig_mod." + k: v for k, v in state.items()},
        "module_object": {"model": source, "epoch": 1},
    }[wrap]
    target = nn.Sequential(ODConv2d(4, 8, 3), DynamicConv2d(8, 8, 3))
    result = load_checkpoint(target, checkpoint)
    assert result.exact
    for key, value in state.items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_prefix_kept_when_the_model_has_it_too() -> None:
    inner = ODConv2d(4, 4, 3)
    wrapped = nn.Sequential(OrderedDict(module=inner))  # keys 'module.*', like a DDP wrapper
    state = {"module." + k: v for k, v in ODConv2d(4, 4, 3).state_dict().items()}
    assert load_checkpoint(wrapped, state).stripped_prefixes == ()


def test_missing_and_unexpected_keys_are_reported() -> None:
    state = ODConv2d(8, 8, 3, groups=2).state_dict()
    without_filter_head = {k: v for k, v in state.items() if "filter_fc" not in k}
    with pytest.raises(ValueError) as info:
        load_checkpoint(ODConv2d(8, 8, 3, groups=2),
                        {"module." + k: v for k, v in without_filter_head.items()}
                        | {"module.extra.weight": torch.zeros(1)})
    text = str(info.value)
    assert "does not match ODConv2d" in text
    assert "2 key(s) missing from the checkpoint: attention.filter_fc.weight, " \
           "attention.filter_fc.bias" in text
    assert "1 key(s) unexpected (in the checkpoint, not in the model): extra.weight" in text
    assert "strict=False" in text
    layer = ODConv2d(8, 8, 3, groups=2, bias=True)
    result = load_checkpoint(layer, without_filter_head | {"extra": torch.zeros(1)},
                             strict=False)
    assert not result.exact
    assert result.missing_keys == ["bias", "attention.filter_fc.weight",
                                   "attention.filter_fc.bias"]
    assert result.unexpected_keys == ["extra"]
    assert "missing from the checkpoint" in str(result)
    torch.testing.assert_close(layer.kernels, state["weight"])  # what fits was loaded


def test_a_checkpoint_of_another_model_says_so() -> None:
    with pytest.raises(ValueError, match="none of the checkpoint's 2 keys belongs to the model"):
        load_checkpoint(ODConv2d(4, 4, 3), nn.Sequential(nn.Linear(2, 2)).state_dict())


def test_wrong_shapes_and_types() -> None:
    with pytest.raises(ValueError, match=r"(?s)does not fit ODConv2d.*expects \[K, C_out"):
        load_checkpoint(ODConv2d(4, 4, 3), ODConv2d(4, 4, 3, num_kernels=2).state_dict())
    with pytest.raises(ValueError, match=r"(?s)does not fit ODConv2d.*size mismatch"):
        load_checkpoint(ODConv2d(4, 4, 3), ODConv2d(4, 4, 3, min_channels=8).state_dict())
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        load_checkpoint({}, {})
    with pytest.raises(TypeError, match="checkpoint must be a path, a state_dict"):
        load_checkpoint(ODConv2d(4, 4, 3), [1, 2])
    with pytest.raises(ValueError, match=r"found no tensors in the checkpoint\['state_dict'\]"):
        load_checkpoint(ODConv2d(4, 4, 3), {"state_dict": {"epoch": 1}})


def test_untrusted_pickles_need_weights_only_false(tmp_path) -> None:
    path = tmp_path / "with_args.pth"
    state = ODConv2d(4, 4, 3).state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_checkpoint(ODConv2d(4, 4, 3), path)
    assert load_checkpoint(ODConv2d(4, 4, 3), str(path), weights_only=False).exact


def test_safetensors_files_when_the_package_is_installed(tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    layer = ODConv2d(4, 4, 3)
    safetensors.save_file(layer.state_dict(), str(path))
    other = ODConv2d(4, 4, 3)
    assert load_checkpoint(other, path).exact
    torch.testing.assert_close(other.weight, layer.weight)


def test_safetensors_files_without_the_package(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    path = tmp_path / "model.safetensors"
    header = b'{"__metadata__":{}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header)  # told apart by its bytes
    with pytest.raises(ImportError, match="install the optional package `safetensors`"):
        load_checkpoint(ODConv2d(4, 4, 3), path)


def test_exported_from_the_package() -> None:
    assert dynconv.load_checkpoint is load_checkpoint
    assert "ODConv2d" in dynconv.__all__ and "load_checkpoint" in dynconv.__all__
