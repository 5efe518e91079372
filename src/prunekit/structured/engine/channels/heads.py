"""Reshapes, matmuls and attention: how channels become heads and back.

A reshape that splits the channel dim into (heads, head_dim) ties each head's channels
into one coupled unit, so heads are removed whole; q·kᵀ, softmax·v and
``scaled_dot_product_attention`` tie the heads of q, k and v (grouped-query attention
included, via ``repeat_interleave`` or the expand+reshape idiom). Sizes written as
literals in the model's code (``view(b, t, self.num_heads, self.head_dim)``) are only
allowed when a known attribute of the calling module holds them, and that attribute is
updated when the plan is applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from prunekit.structured.engine.channels.common import arg, unknown
from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.shapes import follow_reshape, follow_split
from prunekit.structured.engine.channels.state import Tracked
from prunekit.structured.engine.layers.conv import tie_blocks

__all__ = [
    "SIZES_FROM_EXPORT", "count_attrs", "expand", "matmul", "repeat_interleave", "reshape",
    "sdpa",
]  # fmt: skip

SIZES_FROM_EXPORT = "prunekit_sizes_from_export"
"""Node meta flag: the sizes of this call are numbers torch.export wrote down, whether the
model's code spelled them as literals or read them from shapes (it cannot tell)."""

COUNT_ATTRS = (
    "num_heads", "heads", "n_heads", "n_head", "num_attention_heads", "num_key_value_heads",
    "num_kv_heads", "n_kv_heads", "all_head_size", "inner_dim", "split_size",
)  # fmt: skip


def _literal_sizes(node: fx.Node) -> tuple[Any, ...]:
    if "shape" in node.kwargs:
        return tuple(node.kwargs["shape"])
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return tuple(rest[0])
    return tuple(rest)


def _sizes_ok(
    node: fx.Node, ctx: Propagation, dim: int, ids: np.ndarray, splits: bool = False
) -> bool:
    """False when the code spells the channel dim's size as a literal that no known
    attribute of the calling module holds (it would break once the width changes).
    In an exported graph every size is a number: one that restates the size the input
    already has is taken as read from a shape (were it a literal, the shrunk model would
    fail on a size mismatch, save an ``expand`` of a width cut to 1); one that splits
    channels into heads (``splits``) still needs -1 or a known attribute, since a wrong
    head count would pass silently."""
    if node.target not in ("view", "reshape", "expand", torch.reshape):
        return True
    sizes = _literal_sizes(node)
    size = sizes[dim] if dim < len(sizes) else None
    if not isinstance(size, int) or isinstance(size, bool) or size == -1:
        return True
    found = count_attrs(node, ctx, [(size, ids)])
    if not node.meta.get("nn_module_stack"):
        return False
    return found or (node.meta.get(SIZES_FROM_EXPORT, False) and not splits)


def count_attrs(node: fx.Node, ctx: Propagation, counts: list[tuple[int, np.ndarray]]) -> bool:
    """Record the calling module's count attributes (``num_heads``, ``all_head_size``...)
    that equal one of ``counts``, so that applying the plan updates them; ``True`` if any."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    owner = list(stack.values())[-1][0]
    module = ctx.root.get_submodule(owner)
    found = False
    for name in COUNT_ATTRS:
        for value, ids in counts:
            if getattr(module, name, None) == value:
                ctx.add_attr(owner, name, value, ids)
                found = True
    return found


def reshape(node: fx.Node, ctx: Propagation) -> Any:
    """view/reshape/flatten/(un)squeeze: follow, merge or split (into heads) channels."""
    state = ctx.state(node.args[0])
    if not isinstance(state, Tracked):
        return None
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    moved = follow_reshape(in_shape, out_shape, state.dim, state.ids)
    if moved is not None:
        return Tracked(*moved) if _sizes_ok(node, ctx, *moved) else unknown(node, ctx)
    split = follow_split(in_shape, out_shape, state.dim)
    if split is None:
        return unknown(node, ctx)
    dim, heads = split
    anchors = state.ids.reshape(heads, -1)[:, 0]
    if not _sizes_ok(node, ctx, dim, anchors, splits=True):
        return unknown(node, ctx)
    tie_blocks(ctx, heads, state.ids)
    count_attrs(node, ctx, [(heads, anchors), (state.ids.size, state.ids)])
    return Tracked(dim, anchors)


def expand(node: fx.Node, ctx: Propagation) -> Any:
    state = ctx.state(node.args[0])
    shift = len(ctx.shape(node)) - len(ctx.shape(node.args[0]))
    if not isinstance(state, Tracked):
        return state if shift == 0 else None
    moved = Tracked(state.dim + shift, state.ids)
    return moved if _sizes_ok(node, ctx, moved.dim, state.ids) else unknown(node, ctx)


def repeat_interleave(node: fx.Node, ctx: Propagation) -> Any:
    """``repeat_interleave(x, n, dim)`` (GQA key/value heads): each id repeated n times."""
    state, repeats = ctx.state(node.args[0]), arg(node, 1, "repeats", None)
    dim = arg(node, 2, "dim", None)
    if not isinstance(state, Tracked) or not isinstance(repeats, int) or dim is None:
        return unknown(node, ctx)
    if dim % len(ctx.shape(node)) != state.dim:
        return state
    return Tracked(state.dim, np.repeat(state.ids, repeats))


def _role(state: Any, shape: tuple[int, ...], is_left: bool, ndim: int) -> Any:
    """Where a matmul operand's channels go: 'contract' or an output dim."""
    if not isinstance(state, Tracked):
        return None
    rel = state.dim - len(shape)
    if rel == (-1 if is_left else -2):
        return "contract"
    return ndim + rel


def matmul(node: fx.Node, ctx: Propagation) -> Any:
    """a @ b: channels contracted on both sides are joined (and consumed); channels of
    batch dims (heads) are joined across operands and carried to the output."""
    a, b = node.args[0], node.args[1]
    sa, sb = ctx.state(a), ctx.state(b)
    shape_a, shape_b, ndim = ctx.shape(a), ctx.shape(b), len(ctx.shape(node))
    if not isinstance(shape_a, tuple) or len(shape_a) < 2 or len(shape_b) < 2:
        return unknown(node, ctx)
    ra, rb = _role(sa, shape_a, True, ndim), _role(sb, shape_b, False, ndim)
    if ra is None and rb is None:
        return None
    if ra == rb and sa.ids.size == sb.ids.size:
        ctx.union(sa.ids, sb.ids)
        return None if ra == "contract" else Tracked(ra, sa.ids)
    if ra == ndim - 2 and rb is None:
        return Tracked(ra, sa.ids)
    if rb == ndim - 1 and ra is None:
        return Tracked(rb, sb.ids)
    return unknown(node, ctx)


def sdpa(node: fx.Node, ctx: Propagation) -> Any:
    """``scaled_dot_product_attention(q, k, v)``: heads of q, k and v are one unit."""
    states = [ctx.state(a) for a in node.args[:3]]
    if not all(isinstance(s, Tracked) for s in states):
        return unknown(node, ctx)
    q, k, v = states
    ndim = len(ctx.shape(node))
    if not (q.dim == k.dim == v.dim < ndim - 2 and q.ids.size == k.ids.size == v.ids.size):
        return unknown(node, ctx)
    ctx.union(q.ids, k.ids)
    ctx.union(q.ids, v.ids)
    return Tracked(q.dim, q.ids)
