"""Swap a (possibly parametrized) module for its deployment counterpart."""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from prunekit.errors import ConfigError, ConfigTypeError

__all__ = ["swap_module"]


def swap_module(mod: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    """Return ``mapping[type(mod)].from_dense(mod)``, carrying over its forward hooks and
    device; ``mod`` itself if its type (seen through parametrizations) is not mapped."""
    source = type_before_parametrizations(mod)
    if source not in mapping:
        return mod
    target = mapping[source]
    if not callable(getattr(target, "from_dense", None)):
        raise ConfigTypeError(
            f"swap_module: {target.__name__} (mapped from {source.__name__}) has no "
            "from_dense(module) classmethod; map to a class that builds itself from a dense "
            "module, or use prunekit.deploy for quantized targets"
        )
    devices = {t.device for t in [*mod.parameters(), *mod.buffers()]}
    if len(devices) > 1:
        raise ConfigError(
            f"swap_module: {source.__name__} has tensors on several devices "
            f"{sorted(map(str, devices))}; expected one"
        )
    new_mod = target.from_dense(mod)
    for hook in mod._forward_pre_hooks.values():
        new_mod.register_forward_pre_hook(hook)
    for hook in mod._forward_hooks.values():
        new_mod.register_forward_hook(hook)
    if devices:
        new_mod.to(next(iter(devices)))
    return new_mod
