"""What the pattern pruner knows about the operations between a pruned layer and its consumer.

Every graph node and every pattern element is reduced to a *key*: a module class (seen
through parametrizations), a canonical function, or the string ``"output"``. Aliases make
``torch.relu(x)``, ``x.relu()`` and ``F.relu(x)`` the same key, which the reference's
identity comparison did not.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.parametrize import type_before_parametrizations

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_MODULES",
    "ADAPTIVE_POOLS",
    "CONV_TYPES",
    "FLATTENS",
    "PASS_KEYS",
    "POOLS",
    "TRANSPARENT",
    "canonical",
    "node_key",
]

ACTIVATION_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.relu, F.rrelu, F.hardtanh, F.relu6, F.sigmoid, F.hardsigmoid, F.tanh, F.silu, F.mish,
    F.hardswish, F.elu, F.celu, F.selu, F.hardshrink, F.leaky_relu, F.logsigmoid, F.softplus,
    F.prelu, F.softsign, F.tanhshrink, F.gelu,
)
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.RReLU, nn.Hardtanh, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.ELU, nn.CELU, nn.SELU, nn.Hardshrink, nn.LeakyReLU,
    nn.LogSigmoid, nn.Softplus, nn.PReLU, nn.Softsign, nn.Tanhshrink, nn.GELU,
)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: (pool modules, pool functions) per spatial rank 1, 2, 3.
POOLS: dict[int, tuple[Any, ...]] = {
    1: (nn.AvgPool1d, F.avg_pool1d, nn.MaxPool1d, F.max_pool1d),
    2: (nn.AvgPool2d, F.avg_pool2d, nn.MaxPool2d, F.max_pool2d),
    3: (nn.AvgPool3d, F.avg_pool3d, nn.MaxPool3d, F.max_pool3d),
}
ADAPTIVE_POOLS: dict[int, tuple[Any, ...]] = {
    1: (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, F.adaptive_avg_pool1d),
    2: (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, F.adaptive_avg_pool2d),
    3: (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.adaptive_avg_pool3d),
}
FLATTENS: tuple[Any, ...] = (nn.Flatten, torch.flatten)
#: Per-channel identities in eval mode (or per-channel affine maps, for BatchNorm): the
#: pattern keys skip them, the pruner slices or folds them.
TRANSPARENT: frozenset[Any] = frozenset({
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout,
})

_ALIASES: dict[Any, Any] = {
    torch.relu: F.relu, torch.relu_: F.relu, F.relu_: F.relu, torch.sigmoid: F.sigmoid,
    torch.tanh: F.tanh, torch.selu: F.selu, torch.celu: F.celu, torch.rrelu: F.rrelu,
    torch.prelu: F.prelu, F.elu_: F.elu, F.leaky_relu_: F.leaky_relu, F.hardtanh_: F.hardtanh,
    torch.dropout: F.dropout,
    torch.max_pool1d: F.max_pool1d, torch.max_pool2d: F.max_pool2d,
    torch.max_pool3d: F.max_pool3d, torch.avg_pool1d: F.avg_pool1d,
}
_METHOD_ALIASES: dict[str, Any] = {
    "relu": F.relu, "relu_": F.relu, "sigmoid": F.sigmoid, "sigmoid_": F.sigmoid,
    "tanh": F.tanh, "tanh_": F.tanh, "flatten": torch.flatten,
}


def canonical(key: Any) -> Any:
    """The key a pattern element or a node target stands for (aliases resolved)."""
    try:
        return _ALIASES.get(key, key)
    except TypeError:  # unhashable pattern element: compared as is
        return key


def node_key(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    """The key of an fx node: a module class, a canonical function, ``"output"``, or a
    ``("method", name)``/``(op, target)`` tuple for anything else."""
    if node.op == "call_module":
        return type_before_parametrizations(modules[str(node.target)])
    if node.op == "call_function":
        return canonical(node.target)
    if node.op == "call_method":
        return _METHOD_ALIASES.get(str(node.target), ("method", node.target))
    if node.op == "output":
        return "output"
    return (node.op, node.target)


def _all_pools() -> set[Any]:
    keys: set[Any] = set()
    for rank in (1, 2, 3):
        keys.update(POOLS[rank], ADAPTIVE_POOLS[rank])
    return keys


#: Keys the walk from a pruned layer passes through on its way to a consumer.
PASS_KEYS: frozenset[Any] = frozenset(
    set(ACTIVATION_FUNCTIONS) | set(ACTIVATION_MODULES) | _all_pools() | set(FLATTENS)
    | TRANSPARENT | {operator.getitem, nn.LayerNorm}
)
