"""Loading a sparsifier's state_dict: check every entry against the model first, then
install the masks (the checks raise before anything changes)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import FqnError, StateDictError
from prunekit.fqn import resolve_tensor_fqn
from prunekit.parametrization import FakeSparsity, original_tensor
from prunekit.sparsifier._tensors import check_not_sharded, tied_to


def sparsity_of(module: nn.Module, tensor_name: str) -> FakeSparsity | None:
    """The ``FakeSparsity`` attached to ``module.<tensor_name>``, if any."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, FakeSparsity):
            return p
    return None


def as_bool_mask(mask: torch.Tensor, where: str) -> torch.Tensor:
    """Masks loaded from the reference are float 0/1: store them as bool."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise StateDictError(
            f"{where}: mask holds values other than 0 and 1; expected a binary mask"
        )
    return mask != 0


def masks_to_load(model: nn.Module, states: dict, strict: bool) -> dict:
    """Check every incoming mask against ``model``: ``{fqn: (module, name, bool mask)}``."""
    masks = {}
    for fqn, entry in states.items():
        try:
            info = resolve_tensor_fqn(model, fqn)
        except FqnError as err:
            if strict:
                raise StateDictError(f"load_state_dict: {err}") from None
            continue
        mask = entry.get("mask")
        if mask is None:
            continue
        tensor = original_tensor(info["module"], info["tensor_name"])
        check_not_sharded("load_state_dict", fqn, info["module"], info["tensor_name"], tensor)
        if not isinstance(mask, torch.Tensor) or mask.shape != tensor.shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise StateDictError(
                f"load_state_dict: mask for {fqn!r} has shape {got}, expected {tuple(tensor.shape)}"
            )
        mask = as_bool_mask(mask.to(tensor.device), f"load_state_dict: {fqn!r}")
        masks[fqn] = (info["module"], info["tensor_name"], mask)
    return masks


def groups_to_load(
    model: nn.Module, groups: list, strict: bool, validate: Callable[[dict], None]
) -> list[dict]:
    """Deep copies of the incoming groups with module info re-attached, each validated."""
    loaded = []
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or "tensor_fqn" not in group:
            raise StateDictError(f"load_state_dict: groups[{i}] has no 'tensor_fqn': {group!r}")
        try:
            info = resolve_tensor_fqn(model, group["tensor_fqn"])
        except FqnError as err:
            if strict:
                raise StateDictError(f"load_state_dict: {err}") from None
            continue
        loaded_group = copy.deepcopy(group)
        loaded_group.update(info)
        validate(loaded_group)
        loaded.append(loaded_group)
    return loaded


def install_mask(
    model: nn.Module, module: nn.Module, name: str, mask: torch.Tensor
) -> torch.Tensor:
    """Copy ``mask`` into the tensor's FakeSparsity (registering one, on the tensor and
    every module tied to it, if needed)."""
    sparsity = sparsity_of(module, name)
    if sparsity is None:
        sparsity = FakeSparsity(mask.clone())
        tensor = getattr(module, name)
        for holder, holder_name in [(module, name), *tied_to(model, tensor, module)]:
            parametrize.register_parametrization(holder, holder_name, sparsity)
    elif sparsity.mask.dtype == mask.dtype:
        sparsity.mask.copy_(mask)
    else:
        sparsity.mask.data = mask.clone()
    return sparsity.mask
