"""One process of tests/test_kw_models.py's DDP check, under torchrun (2 processes, gloo):
``python -m torch.distributed.run --nproc-per-node 2 kw_ranks.py DIR``: two KWConv2d layers
sharing a warehouse train 2 SGD steps on this process's half of a global batch of 8; the
process saves its state_dict to DIR/rankN.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dynconv


def shared_model() -> nn.Module:
    """Two KW layers on one warehouse and a head (seeded: the same on every process)."""
    torch.manual_seed(0)
    warehouse = dynconv.Warehouse(2)
    model = nn.Sequential(
        dynconv.KWConv2d(4, 8, 3, padding=1, warehouse=warehouse, attention_norm="layer"),
        nn.ReLU(),
        dynconv.KWConv2d(8, 8, 3, padding=1, warehouse=warehouse, attention_norm="layer"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    dynconv.set_temperature(model, 0.5)
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two global batches of 8 images and labels."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, 6, 6, generator=generator),
             torch.randint(0, 3, (8,), generator=generator)) for _ in range(2)]


def train(model: nn.Module, rank: int | None) -> None:
    """2 SGD steps; ``rank``: this process's half of each batch (None: the whole batch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in batches():
        if rank is not None:
            x, y = x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = shared_model()
    train(DistributedDataParallel(model), rank)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
