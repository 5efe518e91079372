"""``squash_mask`` on FSDP2-sharded models.

torch's ``parametrize.remove_parametrizations`` cannot undo a mask on a module that
``fully_shard`` wrapped: it deletes the ``weight`` property from ``module.__class__``
(FSDP2's subclass ``FSDPParametrizedLinear``, not the class that has it) and then
restores ``__bases__[0]`` (``FSDPModule``); and FSDP2 keeps writing the gathered weight
into ``parametrizations.weight.original``. So the removal here steps the class back to
the parametrized one, removes, wraps the plain class again the way ``fully_shard`` does,
and re-points FSDP2's record of where the parameter lives (``FSDPParam._module_info``,
an internal of torch 2.6 to 2.13). Without those internals squash_mask is refused.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import UnsupportedError
from prunekit.parametrization import is_dtensor

_FSDP_CLASSES: dict[type, type] = {}


def _homes(model: nn.Module) -> list[Any] | None:
    """FSDP2's ``(module, param_name)`` records of every managed parameter; None if this
    torch does not expose them."""
    fsdp = sys.modules["torch.distributed.fsdp"]
    homes = []
    for module in model.modules():
        if not isinstance(module, fsdp.FSDPModule):
            continue
        state = getattr(module, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if state is not None else None
        for param in getattr(group, "fsdp_params", []):
            home = getattr(param, "_module_info", None)
            if home is None or not hasattr(home, "module"):
                return None
            homes.append(home)
    return homes


def sharded_homes(model: nn.Module, groups: list[dict[str, Any]], original: Any) -> list | None:
    """None if no group is sharded; else FSDP2's parameter records, after checking that
    every sharded group can be squashed (raises ``UnsupportedError`` before any change)."""
    sharded = [g for g in groups if is_dtensor(original(g["module"], g["tensor_name"]))]
    if not sharded:
        return None
    homes = _homes(model)
    for group in sharded:
        plist = group["module"].parametrizations[group["tensor_name"]]
        if not _squashable(group["module"], plist, homes):
            raise UnsupportedError(
                f"squash_mask: {group['tensor_fqn']!r} is sharded and carries "
                f"{[type(p).__name__ for p in plist]}; only a single bool FakeSparsity can be "
                "squashed in place on this torch. The sharded weights already hold the zeros: "
                "load model.state_dict() into an unsharded copy prepared with the same config, "
                "load the sparsifier's state_dict and squash there"
            )
    return homes


def _squashable(module: nn.Module, plist: nn.Module, homes: list | None) -> bool:
    """A single bool mask, a wrapper class laid out as fully_shard makes it, and one FSDP2
    record that owns the parameter alone (not tied to other modules)."""
    mask = getattr(plist[0], "mask", None) if len(plist) == 1 else None
    if homes is None or mask is None or mask.dtype != torch.bool:
        return False  # bool masks only (FakeSparsity, FakeStructuredSparsity)
    fsdp = sys.modules["torch.distributed.fsdp"]
    bases = type(module).__bases__
    if isinstance(module, fsdp.FSDPModule) and (len(bases) != 2 or bases[0] is not fsdp.FSDPModule):
        return False
    owners = [h for h in homes if h.module is plist and h.param_name == "original"]
    return len(owners) == 1 and not getattr(owners[0], "shared_modules", None)


def remove_mask(holder: nn.Module, name: str, leave: bool, homes: list | None) -> None:
    """``parametrize.remove_parametrizations`` that also works on FSDP2-wrapped modules."""
    plist = holder.parametrizations[name]
    if homes is None or not is_dtensor(plist.original):
        parametrize.remove_parametrizations(holder, name, leave_parametrized=leave)
        return
    if leave:  # bake the masked value into the sharded storage FSDP2 keeps
        with torch.no_grad():
            plist.original.copy_(getattr(holder, name))
    fsdp = sys.modules["torch.distributed.fsdp"]
    wrapper = type(holder) if isinstance(holder, fsdp.FSDPModule) else None
    if wrapper is not None:
        holder.__class__ = wrapper.__bases__[1]  # the parametrized class
    parametrize.remove_parametrizations(holder, name, leave_parametrized=False)
    if wrapper is not None:
        plain = type(holder)
        if plain not in _FSDP_CLASSES:
            extra = {k: v for k, v in wrapper.__dict__.items() if k == "__deepcopy__"}
            _FSDP_CLASSES[plain] = type(f"FSDP{plain.__name__}", (fsdp.FSDPModule, plain), extra)
        holder.__class__ = _FSDP_CLASSES[plain]
    for home in homes:
        if home.module is plist and home.param_name == "original":
            home.module, home.param_name = holder, name
