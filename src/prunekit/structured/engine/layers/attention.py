"""nn.MultiheadAttention (self-attention, packed q/k/v projection).

Its ``embed_dim`` is both the model width and the q/k/v width, so one unit is *dimension j
of every head*: model channels (h, j) for all heads h, with the q/k/v rows and out_proj
columns they index. Heads keep equal sizes; since the head dim shrinks, the q projection
is rescaled by sqrt(new/old head dim) so that attention scores stay exactly the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.state import Tracked
from prunekit.structured.engine.layers.base import LayerPruner, ShapeOf, numel, register_layer

__all__ = ["MultiheadAttentionPruner"]


def _supported(module: nn.MultiheadAttention, node: fx.Node) -> bool:
    same_input = len(node.args) >= 3 and node.args[0] is node.args[1] is node.args[2]
    return (
        same_input
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
    )


@register_layer
class MultiheadAttentionPruner(LayerPruner):
    """Self-attention ``attn(x, x, x)`` only; other uses freeze the input channels."""

    types = (nn.MultiheadAttention,)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        assert isinstance(module, nn.MultiheadAttention)
        if not _supported(module, node):
            ctx.freeze(ctx.state(node.args[0]))
            return None
        ids = ctx.input_ids(node.args[0], -1, module.embed_dim)
        per_head = ids.reshape(module.num_heads, module.head_dim)
        ctx.union(per_head.reshape(-1), np.tile(per_head[0], module.num_heads))
        ctx.add_member(fqn, "in_proj_weight", 0, np.tile(ids, 3))
        ctx.add_member(fqn, "in_proj_weight", 1, ids)
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
        embed = module.in_proj_weight.shape[1]
        head_dim = embed // module.num_heads
        scale = math.sqrt(head_dim / module.head_dim)
        with torch.no_grad():
            module.in_proj_weight[:embed].mul_(scale)
            if module.in_proj_bias is not None:
                module.in_proj_bias[:embed].mul_(scale)
        module.embed_dim = module.kdim = module.vdim = embed
        module.head_dim = head_dim

    def macs(self, module: nn.Module, out_shape: Any, shape_of: ShapeOf) -> int:
        assert isinstance(module, nn.MultiheadAttention)
        rows = numel(out_shape[0][:-1])
        return rows * numel(shape_of("in_proj_weight"))
