"""The body of every rank in the FSDP2 structured and DCP-resume trust tests (spawned by
test_distributed_structured.py).

``worker`` runs the structured pruner's mask phase under FSDP2 and the resume check's
uninterrupted and interrupted runs (the latter saving a ``torch.distributed.checkpoint``
mid-schedule); ``resume_worker`` is the fresh process group that loads that checkpoint
and finishes the schedule. Each writes tensors, str and bool only to
``<outdir>/<name><rank>.pt``, so the results load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import fully_shard

import prunekit
from prunekit.parametrization import is_dtensor
from tests.trust._helpers import (
    BATCH,
    assert_same_model,
    batches,
    make_scheduler,
    make_sparsifier,
    model_snapshot,
    run_in_group,
    tiny_model,
    train,
)

RESUME_STEPS = 6
STOP_AT = 3  # the checkpoint is taken here, mid-schedule (CubicSL ends at step 4)
KINDS = ("unstructured", "structured")
FULL = StateDictOptions(full_state_dict=True)


def structured_model(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """``tiny_model`` with the odd rows of the hidden layer scaled down: the rows the pruner
    picks lie on both ranks' shards (rows 0-2 and 3-5), so a rank-local choice would differ."""
    model = tiny_model(dtype)
    with torch.no_grad():
        model[0].weight[1::2] *= 0.1
    return model


PRUNERS: dict[str, Callable[[], Any]] = {
    "saliency": lambda: prunekit.structured.SaliencyPruner({"sparsity_level": 0.5}),
    "fpgm": lambda: prunekit.structured.FPGMPruner(0.5),
}


def make_pruner(model: nn.Module, name: str = "saliency") -> Any:
    """A structured pruner (``PRUNERS[name]``) on the hidden layer, gradually to 50%."""
    pruner = PRUNERS[name]()
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    return pruner


def shard(model: nn.Sequential) -> nn.Sequential:
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def rows(rank: int, world: int) -> slice:
    per_rank = BATCH // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


class _Recorder:
    """The scheduler, also keeping the row mask after every step of the schedule."""

    def __init__(self, scheduler: Any, mask: torch.Tensor) -> None:
        self.scheduler, self.mask, self.history = scheduler, mask, []

    def step(self) -> None:
        self.scheduler.step()
        self.history.append(self.mask.clone())


def structured_run(
    shard_fn: Callable[[nn.Sequential], Any] = lambda m: m, name: str = "saliency"
) -> dict[str, Any]:
    """A structured pruner + CubicSL on ``structured_model`` (sharded by ``shard_fn`` after
    prepare), on this rank's rows when distributed; the row mask after every step."""
    distributed = dist.is_initialized()
    model = structured_model()
    pruner = make_pruner(model, name)
    shard_fn(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = _Recorder(make_scheduler(pruner), pruner.state["0.weight"]["mask"])
    part = rows(dist.get_rank(), dist.get_world_size()) if distributed else slice(None)
    train(model, optimizer, pruner, recorder, batches(), part)
    return {"model": model, "pruner": pruner, "history": torch.stack(recorder.history)}


def _prune_refused(model: nn.Module, pruner: Any) -> str:
    before = model_snapshot(model)
    try:
        pruner.prune()
    except prunekit.UnsupportedError as err:
        assert_same_model(before, model)
        return str(err)
    return "not refused"


def _prune_unsharded_copy(model: nn.Module, pruner: Any) -> dict[str, torch.Tensor]:
    """The documented way to shrink after sharded training: gather the full state dict
    into an unsharded copy prepared with the same config, load the pruner, prune there."""
    full = get_model_state_dict(model, options=FULL)
    copy = structured_model()
    copy_pruner = make_pruner(copy)
    copy.load_state_dict(full)
    copy_pruner.load_state_dict(pruner.state_dict())
    copy_pruner.prune()
    return {k: v.detach().clone() for k, v in copy.state_dict().items()}


def _squash_sharded(model: nn.Module, pruner: Any) -> dict[str, Any]:
    """squash_mask on the sharded model: the masked rows are baked into the shards."""
    x = batches()[0][0]
    with torch.no_grad():
        masked = model(x)
    pruner.squash_mask()
    with torch.no_grad():
        squashed = model(x)
    model.reshard()
    return {
        "weights": {k: v.full_tensor() for k, v in model.state_dict().items()},
        "same_output": torch.equal(masked, squashed),
    }


def _fsdp_structured() -> dict[str, Any]:
    run = structured_run(shard)
    model, pruner = run["model"], run["pruner"]
    model.reshard()
    original = model[0].parametrizations.weight.original
    return {
        "history": run["history"],
        "fpgm_history": structured_run(shard, "fpgm")["history"],
        "original_is_dtensor": is_dtensor(original),
        "local_rows": torch.tensor(original.to_local().shape[0]),
        "mask_rows": torch.tensor(pruner.state["0.weight"]["mask"].shape[0]),
        "prune_refused": _prune_refused(model, pruner),
        "pruned": _prune_unsharded_copy(model, pruner),
        "squash": _squash_sharded(model, pruner),
    }


# -- exact resume through torch.distributed.checkpoint -----------------------------------
class _Training(Stateful):
    """Model, optimizer, sparsifier and scheduler as one DCP ``Stateful``: the model and
    optimizer through ``get_state_dict``/``set_state_dict`` (sharded), the sparsifier's
    and scheduler's state_dicts as they are (full masks, the same on every rank)."""

    def __init__(self, kind: str) -> None:
        structured = kind == "structured"
        self.model = (structured_model if structured else tiny_model)(torch.float32)
        self.sparsifier = (make_pruner if structured else make_sparsifier)(self.model)
        shard(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05, weight_decay=0.01)
        self.scheduler = make_scheduler(self.sparsifier)

    def state_dict(self) -> dict[str, Any]:
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {
            "model": model,
            "optimizer": optimizer,
            "sparsifier": self.sparsifier.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optimizer"],
        )
        self.sparsifier.load_state_dict(state_dict["sparsifier"])
        self.scheduler.load_state_dict(state_dict["scheduler"])

    def run(self, start: int, stop: int) -> None:
        data = batches(RESUME_STEPS, torch.float32)[start:stop]
        part = rows(dist.get_rank(), dist.get_world_size())
        train(self.model, self.optimizer, self.sparsifier, self.scheduler, data, part)

    def result(self) -> dict[str, Any]:
        self.model.reshard()
        masks = {fqn: s["mask"].clone() for fqn, s in self.sparsifier.state.items()}
        weights = {k: v.full_tensor() for k, v in self.model.state_dict().items()}
        level = torch.tensor(self.sparsifier.groups[0]["sparsity_level"], dtype=torch.float64)
        return {"masks": masks, "weights": weights, "level": level}


def _resume_first_half(outdir: Path) -> dict[str, Any]:
    """The uninterrupted run of each kind, and the interrupted one saved at ``STOP_AT``."""
    results = {}
    for kind in KINDS:
        whole = _Training(kind)
        whole.run(0, RESUME_STEPS)
        interrupted = _Training(kind)
        interrupted.run(0, STOP_AT)
        dcp.save({"training": interrupted}, checkpoint_id=str(outdir / f"ckpt_{kind}"))
        results[kind] = {"whole": whole.result(), "saved": interrupted.result()}
    return results


def _resume_second_half(outdir: Path) -> dict[str, Any]:
    results = {}
    for kind in KINDS:
        resumed = _Training(kind)
        dcp.load({"training": resumed}, checkpoint_id=str(outdir / f"ckpt_{kind}"))
        resumed.run(STOP_AT, RESUME_STEPS)
        results[kind] = resumed.result()
    return results


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    """First spawn: FSDP2 structured mask phase, then the resume check's first half."""
    out = Path(outdir)

    def body() -> dict[str, Any]:
        return {"fsdp2_structured": _fsdp_structured(), "resume": _resume_first_half(out)}

    run_in_group(rank, world, port, body, out / f"first{rank}.pt")


def resume_worker(rank: int, world: int, port: int, outdir: str) -> None:
    """Second spawn (new processes): load the checkpoints and finish the schedules."""
    out = Path(outdir)
    run_in_group(rank, world, port, lambda: _resume_second_half(out), out / f"resumed{rank}.pt")
