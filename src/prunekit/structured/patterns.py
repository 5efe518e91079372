"""The pattern table (same format as the reference's: ``{(key, key, ...): function}``) and
an index that finds the pattern of a traced branch by dictionary lookup.

The reference tried each of its 430 patterns at every graph node (O(nodes * patterns)).
Here wildcard-free patterns live in a dict keyed by their canonical key tuple, and the
few with ``MatchAllNode`` in a list per first key, so a lookup costs one probe per
prefix length of the branch.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable
from itertools import chain
from typing import Any

from torch import nn

from prunekit.structured import ops
from prunekit.structured import prune_functions as pf

__all__ = ["PatternIndex", "default_patterns"]

Pattern = tuple[Any, ...]


def _conv_patterns(conv: type[nn.Module], rank: int) -> dict[Pattern, Callable[..., None]]:
    acts = list(chain(ops.ACTIVATION_FUNCTIONS, ops.ACTIVATION_MODULES))
    table: dict[Pattern, Callable[..., None]] = {
        (conv, "output"): pf.prune_conv2d,
        (conv, conv): pf.prune_conv2d_conv2d,
    }
    for act in acts:
        table[(conv, act, "output")] = pf.prune_conv2d
        table[(conv, act, conv)] = pf.prune_conv2d_activation_conv2d
        for pool in ops.POOLS[rank]:
            table[(conv, act, pool, conv)] = pf.prune_conv2d_activation_pool_conv2d
            table[(conv, pool, act, conv)] = pf.prune_conv2d_pool_activation_conv2d
    for pool in ops.POOLS[rank]:
        table[(conv, pool, conv)] = pf.prune_conv2d_pool_conv2d
    for pool in ops.ADAPTIVE_POOLS[rank]:
        for flatten in ops.FLATTENS:
            table[(conv, pool, flatten, nn.Linear)] = pf.prune_conv2d_pool_flatten_linear
            for act in acts:
                key = (conv, act, pool, flatten, nn.Linear)
                table[key] = pf.prune_conv2d_activation_pool_flatten_linear
    return table


def default_patterns() -> dict[Pattern, Callable[..., None]]:
    """The reference's patterns, plus the same shapes for Conv1d/Conv3d, activations
    before the output or an adaptive pool + flatten, and LSTM → output."""
    table: dict[Pattern, Callable[..., None]] = {
        (nn.Linear, "output"): pf.prune_linear,
        (nn.Linear, nn.Linear): pf.prune_linear_linear,
        (nn.LSTM, operator.getitem, nn.Linear): pf.prune_lstm_output_linear,
        (nn.LSTM, operator.getitem, nn.LayerNorm, nn.Linear): pf.prune_lstm_output_layernorm_linear,
        (nn.LSTM, operator.getitem, "output"): pf.prune_lstm_output,
        (nn.LSTM, "output"): pf.prune_lstm_output,
    }
    for act in chain(ops.ACTIVATION_FUNCTIONS, ops.ACTIVATION_MODULES):
        table[(nn.Linear, act, nn.Linear)] = pf.prune_linear_activation_linear
        table[(nn.Linear, act, "output")] = pf.prune_linear
    for rank, conv in enumerate(ops.CONV_TYPES, start=1):
        table.update(_conv_patterns(conv, rank))
    return table


def _is_wildcard(key: Any) -> bool:
    from torch.ao.quantization.utils import MatchAllNode

    return isinstance(key, type) and issubclass(key, MatchAllNode)


class PatternIndex:
    """Longest-prefix lookup of a branch's key tuple in a pattern table."""

    def __init__(self, patterns: dict[Any, Callable[..., None]]) -> None:
        self.exact: dict[Pattern, Callable[..., None]] = {}
        self.wild: dict[Any, list[tuple[Pattern, Callable[..., None]]]] = defaultdict(list)
        for pattern, fn in patterns.items():
            raw = pattern if isinstance(pattern, tuple) else (pattern,)
            key = tuple(ops.canonical(k) for k in raw)
            if any(_is_wildcard(k) for k in key):
                first = None if _is_wildcard(key[0]) else key[0]
                self.wild[first].append((key, fn))
            else:
                self.exact[key] = fn

    def lookup(self, keys: Pattern) -> tuple[int, Callable[..., None]] | None:
        """``(length, function)`` of the longest pattern that is a prefix of ``keys``."""
        candidates = self.wild.get(keys[0], []) + self.wild.get(None, [])
        for length in range(len(keys), 0, -1):
            prefix = keys[:length]
            fn = self.exact.get(prefix)
            if fn is not None:
                return length, fn
            for pattern, wild_fn in candidates:
                if len(pattern) == length and all(
                    _is_wildcard(p) or p == k for p, k in zip(pattern, prefix, strict=False)
                ):
                    return length, wild_fn
        return None
