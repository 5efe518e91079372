"""Where a sparsified tensor lives: sharded by FSDP2, on the ``meta`` device, or tied to
other modules. ``BaseSparsifier`` asks these before it changes anything, so a refused
call leaves the model as it was, and a tied tensor gets one mask however many modules
hold it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import ConfigError, UnsupportedError
from prunekit.parametrization import is_dtensor

_PREPARE_FIRST = (
    "call sparsifier.prepare(model, config) before fully_shard(model): the masks then stay "
    "full on every rank and follow the sharded parameters"
)


def check_not_sharded(where: str, fqn: str, module: nn.Module, name: str, tensor: Any) -> None:
    """Refuse to attach a new mask to a parameter that ``fully_shard`` already sharded."""
    if is_dtensor(tensor) and not parametrize.is_parametrized(module, name):
        raise UnsupportedError(
            f"{where}: {fqn!r} is already sharded (a DTensor with placements "
            f"{tuple(tensor.placements)}); {_PREPARE_FIRST}"
        )


def check_no_sharded_params(where: str, model: nn.Module) -> None:
    """Refuse ``prepare(model, None)`` on a sharded model: FSDP2 changes the module classes,
    so the default config would silently find nothing to sparsify."""
    for fqn, param in model.named_parameters():
        if is_dtensor(param) and ".parametrizations." not in f".{fqn}":
            raise UnsupportedError(
                f"{where}: parameter {fqn!r} is already sharded; {_PREPARE_FIRST}"
            )


def check_materialized(where: str, groups: list[dict[str, Any]], original: Any) -> None:
    """Masks depend on values: refuse tensors on the ``meta`` device (they have none)."""
    for group in groups:
        tensor = original(group["module"], group["tensor_name"])
        if tensor.device.type == "meta":
            raise UnsupportedError(
                f"{where}: {group['tensor_fqn']!r} is on the meta device and has no values to "
                "score; prepare() works on meta models for planning, but materialize them "
                "(model.to_empty(device=...) and load_state_dict) before step()"
            )


def tied_to(
    model: nn.Module, tensor: torch.Tensor, skip: nn.Module
) -> Iterator[tuple[nn.Module, str]]:
    """``(module, name)`` of every other place in ``model`` that holds the same Parameter
    ``tensor``, directly or as the original of a parametrization."""
    for module in model.modules():
        if module is skip or isinstance(module, parametrize.ParametrizationList):
            continue
        for name, held in list(module._parameters.items()):
            if held is tensor:
                yield module, name
        plists = module.parametrizations.items() if parametrize.is_parametrized(module) else ()
        for name, plist in plists:
            if plist.original is tensor:
                yield module, name


def check_not_tied(i: int, fqn: str, tensor: torch.Tensor, earlier: dict[int, str]) -> None:
    """A config names each Parameter once: tied modules share one mask."""
    first = earlier.get(id(tensor))
    if first is not None:
        raise ConfigError(
            f"config[{i}]: {fqn!r} is the same Parameter as {first!r} (tied weights); list "
            f"only {first!r}: every module holding it is masked by that one mask"
        )
    earlier[id(tensor)] = fqn


def check_not_ddp_wrapped(where: str, model: nn.Module) -> None:
    """Refuse to prepare inside ``DistributedDataParallel``: ``parametrize`` calls
    ``original.set_(original)``, which gives the parameter a new gradient accumulator, so
    the hooks DDP registered at wrap time never fire and DDP stops reducing gradients."""
    ddp = sys.modules.get("torch.nn.parallel.distributed")  # no import: see is_dtensor
    if ddp is None:
        return
    for fqn, module in model.named_modules():
        if isinstance(module, ddp.DistributedDataParallel):
            raise UnsupportedError(
                f"{where}: {fqn or 'the model'!r} is wrapped in DistributedDataParallel, which "
                "would stop reducing the sparsified weights' gradients; call "
                "sparsifier.prepare(model, config) before DistributedDataParallel(model)"
            )


def reshard_fsdp(model: nn.Module | None) -> None:
    """Reshard every FSDP2 module of ``model`` (a local operation, no communication).

    After a no-grad forward FSDP2 may keep a module's parameters gathered; masks written
    into that gathered copy would be lost at the next reshard, and squashing it would
    orphan the weight. Resharded, every original is its sharded DTensor again.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # no import: see is_dtensor
    if fsdp is None or model is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()
