"""One process of tests/test_autotune.py's distributed checks, under torchrun (2 processes,
gloo): ``python -m torch.distributed.run --nproc-per-node 2 autotune_ranks.py SCENARIO DIR``.

``agree``: each process's timer prefers another formulation; the process writes what it chose
with gradients, what it timed there, its summary, whether its outputs equal the untuned ones
and what it chose for an evaluation batch of its own size to DIR/rankN.json.
``disagree``: the processes call a layer with different batch sizes; each writes the error it
got (or None).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dynconv
from dynconv.functional import per_sample_conv2d, tuning


def main(scenario: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    favourites = ({"loop": 0.1, "aggregate/loop": 0.1} if rank == 0
                  else {"unfold": 0.1, "aggregate/unfold": 0.1, "mixout": 0.1})
    timed: list[str] = []

    def timer(key, method, run) -> float:
        run()
        timed.append(method)
        return favourites.get(method, 1.0)

    torch.manual_seed(0)
    layer = dynconv.DynamicConv2d(3, 4, 3, num_kernels=2)
    result: dict = {"error": None}
    batch = 4 if scenario == "agree" or rank == 0 else 2
    x = torch.randn(batch, 3, 6, 6)
    weight = torch.randn(batch, 5, 3, 3, 3, requires_grad=True)
    expected = (layer(x), per_sample_conv2d(x, weight))
    try:
        with dynconv.autotune(timer=timer, cache=out / "cache.json"):
            got = (layer(x), per_sample_conv2d(x, weight))  # with gradients: agreed
            trained = {key.text: choice for key, choice in tuning._choices.items()}
            timed_in_training = list(timed)
            with torch.no_grad():  # evaluation, a shard of another size per process
                layer(torch.randn(3 + rank, 3, 6, 6))
    except dynconv.AutotuneError as error:
        result["error"] = str(error)
    else:
        result["outputs_equal_untuned"] = all(
            torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, expected))
        result.update(choices=trained, timed=timed_in_training, summary=tuning.autotune_summary(),
                      evaluation=[choice for key, choice in tuning._choices.items()
                                  if key.text not in trained])
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
