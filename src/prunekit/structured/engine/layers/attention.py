"""nn.MultiheadAttention: self- and cross-attention.

Its ``embed_dim`` is both the query width and the q/k/v width, so one unit is *dimension j
of every head*: query channels (h, j) for all heads h, with the q/k/v rows and out_proj
columns they index. Heads keep equal sizes; since the head dim shrinks, the q projection
is rescaled by sqrt(new/old head dim) so that attention scores stay exactly the same.
Key and value channels read the packed ``in_proj_weight`` columns when ``kdim == vdim ==
embed_dim`` (so they join the query's channels), else the separate ``k_proj_weight`` /
``v_proj_weight`` columns, which prune on their own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from prunekit.structured.engine.channels.common import arg
from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.state import Tracked
from prunekit.structured.engine.layers.base import LayerPruner, ShapeOf, numel, register_layer

__all__ = ["MultiheadAttentionPruner"]

_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _qkv(node: fx.Node) -> list[Any]:
    return [arg(node, i, name, None) for i, name in enumerate(("query", "key", "value"))]


def _input_proj(
    module: nn.MultiheadAttention, fqn: str, node: fx.Node, ctx: Propagation
) -> np.ndarray:
    """Columns of the input projections (the channels of query, key and value) and the
    rows of the q/k/v projections; returns the query's channel ids."""
    query, key, value = _qkv(node)
    ids = ctx.input_ids(query, -1, module.embed_dim)
    if module._qkv_same_embed_dim:
        for other in (key, value):
            if other is not query:
                ctx.union(ctx.input_ids(other, -1, module.embed_dim), ids)
        ctx.add_member(fqn, "in_proj_weight", 0, np.tile(ids, 3))
        ctx.add_member(fqn, "in_proj_weight", 1, ids)
        return ids
    ctx.add_member(fqn, "q_proj_weight", 1, ids)
    ctx.add_member(fqn, "k_proj_weight", 1, ctx.input_ids(key, -1, module.kdim))
    ctx.add_member(fqn, "v_proj_weight", 1, ctx.input_ids(value, -1, module.vdim))
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        ctx.add_member(fqn, name, 0, ids)
    return ids


@register_layer
class MultiheadAttentionPruner(LayerPruner):
    """``attn(query, key, value)``; with ``add_bias_kv`` or ``add_zero_attn`` its
    inputs are frozen instead."""

    types = (nn.MultiheadAttention,)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        assert isinstance(module, nn.MultiheadAttention)
        if module.bias_k is not None or module.add_zero_attn or None in _qkv(node):
            ctx.freeze([ctx.state(a) for a in _qkv(node)])
            return None
        ids = _input_proj(module, fqn, node, ctx)
        per_head = ids.reshape(module.num_heads, module.head_dim)
        ctx.union(per_head.reshape(-1), np.tile(per_head[0], module.num_heads))
        if module.in_proj_bias is not None:
            ctx.add_member(fqn, "in_proj_bias", 0, np.tile(ids, 3))
        out = f"{fqn}.out_proj"
        ctx.add_member(out, "weight", 0, ids)
        ctx.add_member(out, "weight", 1, ids)
        if module.out_proj.bias is not None:
            ctx.add_member(out, "bias", 0, ids)
        return (Tracked(len(ctx.shape(node)[0]) - 1, ids), None)

    def resize(self, module: nn.Module) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        packed = module._qkv_same_embed_dim
        embed = module.out_proj.weight.shape[1]
        head_dim = embed // module.num_heads
        scale = math.sqrt(head_dim / module.head_dim)
        with torch.no_grad():
            (module.in_proj_weight[:embed] if packed else module.q_proj_weight).mul_(scale)
            if module.in_proj_bias is not None:
                module.in_proj_bias[:embed].mul_(scale)
        module.embed_dim = module.kdim = module.vdim = embed
        if not packed:
            module.kdim = module.k_proj_weight.shape[1]
            module.vdim = module.v_proj_weight.shape[1]
        module.head_dim = head_dim

    def macs(self, module: nn.Module, out_shape: Any, shape_of: ShapeOf) -> int:
        assert isinstance(module, nn.MultiheadAttention)
        rows = numel(out_shape[0][:-1])
        names = [n for n in _PROJECTIONS if getattr(module, n, None) is not None]
        return rows * sum(numel(shape_of(n)) for n in names)
