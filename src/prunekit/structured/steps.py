"""Build the per-channel ``Step`` of a module or function sitting between a pruned layer
and its consumer (how a pruned channel's constant passes through it, what to slice)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.structured import ops
from prunekit.structured.shrink import Step, batchnorm_fn

__all__ = ["function_step", "module_step"]

_POOL_MODULES = tuple(
    p for rank in (1, 2, 3) for p in ops.POOLS[rank] + ops.ADAPTIVE_POOLS[rank]
    if isinstance(p, type)
)
_POOL_FUNCTIONS = frozenset(
    p for rank in (1, 2, 3) for p in ops.POOLS[rank] + ops.ADAPTIVE_POOLS[rank]
    if not isinstance(p, type)
)
_AVG_POOL_FUNCTIONS = frozenset({F.avg_pool1d, F.avg_pool2d, F.avg_pool3d})
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.LayerNorm)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _counts_zero_padding(module: nn.Module) -> bool:
    padding = getattr(module, "padding", 0)
    padded = any(p > 0 for p in padding) if isinstance(padding, tuple) else padding > 0
    return padded and getattr(module, "count_include_pad", False)


def module_step(module: nn.Module, name: str) -> Step:
    """The step of a module: BatchNorm as a per-channel affine map, pools and dropout as
    identities on a constant, activations as themselves."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return Step(name, batchnorm_fn(module), module)
    if isinstance(module, _POOL_MODULES):
        return Step(name, _identity, None, zero_padded=_counts_zero_padding(module))
    if isinstance(module, _IDENTITY_MODULES):
        # LayerNorm only appears after an LSTM, whose pruned units are zero: it is sliced.
        return Step(name, _identity, module if isinstance(module, nn.LayerNorm) else None)
    per_channel = isinstance(module, nn.PReLU) and module.num_parameters > 1
    return Step(name, module, module if per_channel else None)


def function_step(
    fn: Callable[..., Any], name: str, args: tuple[Any, ...] = (), kwargs: dict | None = None
) -> Step:
    """The step of a function call ``fn(x, *args, **kwargs)`` (constant arguments only)."""
    kwargs = dict(kwargs or {})
    key = ops.canonical(fn)
    if key in _POOL_FUNCTIONS:
        padding = kwargs.get("padding", args[2] if len(args) > 2 else 0)
        padded = any(p > 0 for p in padding) if isinstance(padding, (tuple, list)) else padding > 0
        counts = kwargs.get("count_include_pad", args[4] if len(args) > 4 else True)
        zero_padded = key in _AVG_POOL_FUNCTIONS and padded and counts
        return Step(name, _identity, None, zero_padded=bool(zero_padded))
    if key in ops.TRANSPARENT:
        return Step(name, _identity, None)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return fn(x, *args, **kwargs)

    return Step(name, apply, None)
