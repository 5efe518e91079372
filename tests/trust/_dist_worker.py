"""The body of every rank in the distributed trust tests (spawned by test_distributed.py).

Each rank runs the shared gradual-pruning loop on its half of every batch, wrapped in
DDP (prepared before wrapping; preparing after is refused) and in FSDP2 (prepared
before fully_shard), then writes what the test compares to ``<outdir>/rank<r>.pt``
(tensors, str and bool only, so it loads with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import prunekit
from prunekit.parametrization import is_dtensor
from tests.trust._helpers import (
    BATCH,
    CONFIG,
    assert_same_model,
    batches,
    make_scheduler,
    make_sparsifier,
    make_structured_pruner,
    masks_of,
    model_snapshot,
    run_in_group,
    structured_result,
    tiny_model,
    train,
)


def _rows(rank: int, world: int) -> slice:
    per_rank = BATCH // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _ddp_run(rank: int, world: int) -> dict[str, Any]:
    model = tiny_model()
    sparsifier = make_sparsifier(model)  # before wrapping: see _ddp_refusal
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    train(wrapped, optimizer, sparsifier, make_scheduler(sparsifier), batches(), _rows(rank, world))
    result = {
        "masks": masks_of(sparsifier),
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }
    sparsifier.squash_mask()
    result["squashed"] = {k: v.clone() for k, v in model.state_dict().items()}
    result["refused"] = _ddp_refusal()
    return result


def _ddp_structured_run(rank: int, world: int) -> dict[str, Any]:
    """A structured pruner's mask phase inside DDP (prepared before wrapping), then prune()."""
    model = tiny_model()
    pruner = make_structured_pruner(model)
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    train(wrapped, optimizer, pruner, make_scheduler(pruner), batches(), _rows(rank, world))
    return structured_result(model, pruner)


def _ddp_refusal() -> str:
    """Preparing an already wrapped model is refused (DDP would lose its grad hooks)."""
    wrapped = DistributedDataParallel(tiny_model())
    before = model_snapshot(wrapped)
    try:
        make_sparsifier(wrapped, prefix="module.")
    except prunekit.UnsupportedError as err:
        assert_same_model(before, wrapped)
        return str(err)
    return "not refused"


def _shard(model: nn.Module) -> None:
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)


def _refusals(sparsifier: prunekit.BaseSparsifier) -> dict[str, str]:
    """What FSDP2 cannot take: masks attached after fully_shard. Each is refused with the
    model left unchanged."""
    messages = {}
    late = tiny_model()
    _shard(late)
    late_before = model_snapshot(late)
    for key, config in (("prepare_config", CONFIG), ("prepare_none", None)):
        try:
            prunekit.WeightNormSparsifier().prepare(late, config)
        except prunekit.UnsupportedError as err:
            messages[key] = str(err)
        assert_same_model(late_before, late)
    try:  # masks loaded into a sharded model that has none: the same refusal as prepare
        prunekit.WeightNormSparsifier().load_state_dict(sparsifier.state_dict(), model=late)
    except prunekit.UnsupportedError as err:
        messages["load_state_dict"] = str(err)
    assert_same_model(late_before, late)
    floats = tiny_model()  # a float mask is not baked into the original: no squash in place
    float_sparsifier = prunekit.WeightNormSparsifier()
    float_sparsifier.prepare(floats, [{"tensor_fqn": "0.weight", "mask": torch.ones(6, 8)}])
    _shard(floats)
    floats_before = model_snapshot(floats)
    try:
        float_sparsifier.squash_mask()
    except prunekit.UnsupportedError as err:
        messages["squash_float_mask"] = str(err)
    assert_same_model(floats_before, floats)
    return messages


def _squash_sharded(model: nn.Module, sparsifier: prunekit.BaseSparsifier) -> dict[str, Any]:
    """squash_mask on the sharded model, then a forward and a training step."""
    x = batches()[0][0]
    with torch.no_grad():
        masked = model(x)
    sparsifier.squash_mask()
    with torch.no_grad():
        squashed_out = model(x)
    model.reshard()
    state = model.state_dict()
    result = {
        "types": [type(m).__name__ for m in model],
        "weights": {k: v.full_tensor() for k, v in state.items()},
        "same_output": torch.equal(masked, squashed_out),
    }
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(x).sum().backward()  # FSDP2 still gathers and reduces the squashed weights
    result["grads"] = all(p.grad is not None for p in model.parameters())
    return result


def _fsdp_run(rank: int, world: int, root_only: bool = False) -> dict[str, Any]:
    """FSDP2 training; ``root_only`` shards only the root, which FSDP2 leaves gathered
    after the no-grad forward that then runs before every sparsifier step."""
    model = tiny_model()
    sparsifier = make_sparsifier(model)
    if root_only:
        fully_shard(model)
    else:
        _shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = make_scheduler(sparsifier)
    train(model, optimizer, sparsifier, scheduler, batches(), _rows(rank, world), root_only)
    model.reshard()
    sharded = model.state_dict()
    return {
        "masks": masks_of(sparsifier),
        "weights": {k: v.full_tensor() for k, v in sharded.items()},
        "local_rows": {k: torch.tensor(v.to_local().shape[0]) for k, v in sharded.items()},
        "is_dtensor": {k: is_dtensor(v) for k, v in sharded.items()},
        "sparsifier_state": sparsifier.state_dict(),
        "refused": _refusals(sparsifier),
        "squash": _squash_sharded(model, sparsifier),
    }


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    """Entry point of ``torch.multiprocessing.spawn``: all scenarios, one process group."""

    def body() -> dict[str, Any]:
        return {
            "ddp": _ddp_run(rank, world),
            "ddp_structured": _ddp_structured_run(rank, world),
            "fsdp2": _fsdp_run(rank, world),
            "fsdp2_root_eval": _fsdp_run(rank, world, root_only=True),
        }

    run_in_group(rank, world, port, body, Path(outdir) / f"rank{rank}.pt")
