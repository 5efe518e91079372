"""Swap a (possibly parametrized) module for its deployment counterpart."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from prunekit.errors import ConfigError, ConfigTypeError

__all__ = ["register_swap_handler", "swap_module"]

SwapHandler = Callable[[nn.Module], nn.Module]
_HANDLERS: dict[type[nn.Module], SwapHandler] = {}


def register_swap_handler(target: type[nn.Module], handler: SwapHandler) -> None:
    """Let ``swap_module`` build ``target`` (a class without ``from_dense``, such as the
    sparse-quantized Linears) with ``handler(module)``; the handler owns the whole swap."""
    _HANDLERS[target] = handler


def _handler_for(target: type[nn.Module]) -> SwapHandler | None:
    if target not in _HANDLERS:
        # prunekit.deploy registers the handlers for torch.ao.nn.sparse.quantized on import;
        # importing it lazily keeps this module free of the quantization stack.
        importlib.import_module("prunekit.deploy.quantized")
    return _HANDLERS.get(target)


def swap_module(mod: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    """Return ``mapping[type(mod)].from_dense(mod)``, carrying over its forward hooks and
    device; ``mod`` itself if its type (seen through parametrizations) is not mapped.
    Targets without ``from_dense`` go to a registered handler (``register_swap_handler``)."""
    source = type_before_parametrizations(mod)
    if source not in mapping:
        return mod
    target = mapping[source]
    if not callable(getattr(target, "from_dense", None)):
        handler = _handler_for(target)
        if handler is not None:
            return handler(mod)
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
