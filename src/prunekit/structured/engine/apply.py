"""Slice tensors along their pruned dims and fix module attributes: the only step of
the engine that mutates the model, and it validates everything before the first write."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import StateError
from prunekit.fqn import fqn_to_module
from prunekit.structured.engine.layers import layer_pruner

__all__ = ["AttrChange", "Slice", "apply_slices"]


@dataclass(frozen=True)
class Slice:
    """Keep indices ``keep`` of ``owner.name`` along ``dim`` (originally ``size`` long)."""

    owner: str
    name: str
    dim: int
    size: int
    keep: tuple[int, ...]


@dataclass(frozen=True)
class AttrChange:
    """Integer attribute ``owner.name`` (e.g. ``num_heads``) goes from ``old`` to ``new``."""

    owner: str
    name: str
    old: int
    new: int


def _check_attr(model: nn.Module, change: AttrChange) -> None:
    value = getattr(model.get_submodule(change.owner), change.name, None)
    if value != change.old:
        raise StateError(
            f"plan expects {change.owner}.{change.name} == {change.old} but it is {value!r}; "
            "was the model changed (or the plan applied) already?"
        )


def _tensor(model: nn.Module, s: Slice) -> torch.Tensor:
    module = fqn_to_module(model, s.owner) if s.owner else model
    tensor = getattr(module, s.name, None) if isinstance(module, nn.Module) else None
    where = f"{s.owner}.{s.name}" if s.owner else s.name
    if not isinstance(tensor, torch.Tensor):
        raise StateError(f"plan entry {where} does not name a tensor of the model")
    if tensor.dim() <= s.dim or tensor.shape[s.dim] != s.size:
        raise StateError(
            f"plan entry {where} expects dim {s.dim} of size {s.size} but the tensor has "
            f"shape {tuple(tensor.shape)}; was the model changed (or the plan applied) already?"
        )
    return tensor


def _sliced(tensor: torch.Tensor, slices: Sequence[Slice]) -> torch.Tensor:
    out = tensor.detach()
    for s in slices:
        index = torch.tensor(s.keep, dtype=torch.long, device=tensor.device)
        out = out.index_select(s.dim, index)
    out = out.contiguous()
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(out, requires_grad=tensor.requires_grad)
    return out


def apply_slices(
    model: nn.Module, slices: Sequence[Slice], attrs: Sequence[AttrChange] = ()
) -> None:
    """Shrink ``model`` in place. Raises ``StateError`` (model untouched) if any entry
    does not match the model."""
    for change in attrs:
        _check_attr(model, change)
    by_tensor: dict[tuple[str, str], list[Slice]] = defaultdict(list)
    for s in slices:
        _tensor(model, s)
        by_tensor[(s.owner, s.name)].append(s)
    new = _shrunk_tensors(model, by_tensor)
    owners = {owner: model.get_submodule(owner) for owner, _ in new}
    for (owner, name), tensor in new.items():
        setattr(owners[owner], name, tensor)
    for module in owners.values():
        pruner = layer_pruner(module)
        if pruner is not None:
            pruner.resize(module)
    for change in attrs:
        setattr(model.get_submodule(change.owner), change.name, change.new)


def _shrunk_tensors(
    model: nn.Module, by_tensor: dict[tuple[str, str], list[Slice]]
) -> dict[tuple[str, str], torch.Tensor]:
    """The shrunk tensor of every ``(owner, name)`` in the plan, and of every other name
    holding the same tensor: a tensor two modules share (tied embeddings) is cut once,
    must be cut alike through either name, and stays shared."""
    made: dict[int, tuple[list[tuple[int, tuple[int, ...]]], torch.Tensor]] = {}
    shrunk: dict[tuple[str, str], torch.Tensor] = {}
    for (owner, name), ss in by_tensor.items():
        tensor = _tensor(model, ss[0])
        cuts = sorted((s.dim, s.keep) for s in ss)
        if id(tensor) not in made:
            made[id(tensor)] = (cuts, _sliced(tensor, ss))
        elif made[id(tensor)][0] != cuts:
            raise StateError(
                f"plan entry {owner}.{name} cuts a tensor it shares with another entry "
                "differently; a tied tensor must lose the same channels everywhere"
            )
        shrunk[(owner, name)] = made[id(tensor)][1]
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for fqn, tensor in named:
        if id(tensor) in made:
            owner, _, name = fqn.rpartition(".")
            shrunk.setdefault((owner, name), made[id(tensor)][1])
    return shrunk
