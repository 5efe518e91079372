"""Shared pieces of the trust tests: a tiny model, fixed data, one gradual-pruning loop
(WeightNormSparsifier + CubicSL) that every distributed, resumed and single-process run
goes through, so their results can be compared bit for bit."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

import prunekit

STEPS = 6
BATCH = 8
CONFIG = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "sparsity_level": 0.6}]


def tiny_model(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """8 -> 6 -> 4 MLP; 6 output rows shard unevenly (3/3) and 4 evenly (2/2) on 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).to(dtype)


def batches(
    steps: int = STEPS, dtype: torch.dtype = torch.float64
) -> list[tuple[torch.Tensor, ...]]:
    """The global batches of every step (each rank takes its slice of the rows)."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 8, generator=g, dtype=dtype),
            torch.randn(BATCH, 4, generator=g, dtype=dtype),
        )
        for _ in range(steps)
    ]


def make_sparsifier(model: nn.Module, prefix: str = "") -> prunekit.WeightNormSparsifier:
    """The sparsifier prepared on ``model`` (its tensor fqns under ``prefix``)."""
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 2))
    config = [{**entry, "tensor_fqn": prefix + entry["tensor_fqn"]} for entry in CONFIG]
    sparsifier.prepare(model, config)
    return sparsifier


def make_scheduler(sparsifier: prunekit.BaseSparsifier) -> prunekit.CubicSL:
    return prunekit.CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=4)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Any,
    scheduler: Any,
    data: list[tuple[torch.Tensor, ...]],
    rows: slice = slice(None),
    evaluate: bool = False,
) -> None:
    """One optimizer, sparsifier and scheduler step per batch, on ``rows`` of each batch
    (with ``evaluate``, a no-grad forward before each sparsifier step)."""
    for x, y in data:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
        if evaluate:
            with torch.no_grad():
                model(x[rows])
        sparsifier.step()
        scheduler.step()


def masks_of(sparsifier: Any) -> dict[str, torch.Tensor]:
    """Copies of the sparsifier's masks, keyed by tensor fqn without any wrapper prefix."""
    return {fqn.removeprefix("module."): s["mask"].clone() for fqn, s in sparsifier.state.items()}


def single_process_run(steps: int = STEPS) -> dict[str, Any]:
    """The reference result: the whole schedule in this process on the full batches."""
    model = tiny_model()
    sparsifier = make_sparsifier(model)
    scheduler = make_scheduler(sparsifier)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, sparsifier, scheduler, batches(steps))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = masks_of(sparsifier)
    sparsifier.squash_mask()
    squashed = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"masks": masks, "weights": weights, "squashed": squashed}


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference over masks (as 0/1) and weights; 0.0 means identical."""
    assert a["masks"].keys() == b["masks"].keys() and a["weights"].keys() == b["weights"].keys()
    diffs = [(a["masks"][k] ^ b["masks"][k]).float().max() for k in a["masks"]]
    diffs += [(a["weights"][k] - b["weights"][k]).abs().max() for k in a["weights"]]
    return float(torch.stack(diffs).max())


def run_in_group(rank: int, world: int, port: int, body: Callable[[], Any], out: Path) -> None:
    """In a spawned process: run ``body`` in a gloo process group of ``world`` ranks and
    save what it returns to ``out``.

    Then leave without the interpreter's teardown: gloo's worker threads can outlive it
    and abort the finished process (SIGABRT, "terminate called without an active
    exception", seen now and then under pytest), which would fail the spawn.
    """
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(body(), out)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_snapshot(model: nn.Module) -> dict[str, Any]:
    """Values (NaN-aware), dtypes, identities and parametrizations of a model."""
    tensors = {
        name: (t.detach().clone(), t.dtype, id(t))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    plists = {
        (name, t): [type(p).__name__ for p in m.parametrizations[t]]
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m)
        for t in m.parametrizations
    }
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    return {"tensors": tensors, "plists": plists, "types": types}


def assert_same_model(before: dict[str, Any], model: nn.Module) -> None:
    after = model_snapshot(model)
    assert before["types"] == after["types"]
    assert before["plists"] == after["plists"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (value, dtype, ident) in before["tensors"].items():
        new_value, new_dtype, new_ident = after["tensors"][name]
        assert (new_dtype, new_ident) == (dtype, ident), name
        assert torch.equal(value.isnan(), new_value.isnan()), name
        assert torch.equal(value.nan_to_num(), new_value.nan_to_num()), name


def make_structured_pruner(model: nn.Module) -> Any:
    """A SaliencyPruner on the hidden layer (its rows are channels), gradually to 50%."""
    from prunekit.structured import SaliencyPruner

    pruner = SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    return pruner


def structured_result(model: nn.Module, pruner: Any) -> dict[str, Any]:
    """Row masks, then the physically shrunk model's weights (``prune()`` in place)."""
    masks = masks_of(pruner)
    pruner.prune()
    return {
        "masks": masks,
        "pruned": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def single_structured_run() -> dict[str, Any]:
    """The structured pruner's mask phase and prune() on the full batches, in this process."""
    model = tiny_model()
    pruner = make_structured_pruner(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, pruner, make_scheduler(pruner), batches())
    return structured_result(model, pruner)
