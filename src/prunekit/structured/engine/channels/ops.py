"""How channels flow through functions, tensor methods and parameter-free modules.

Each handler gets the fx node and the propagation context and returns the state of the
node's output. Anything not listed here is *unknown*: its tracked inputs are frozen (never
pruned) and its output is untracked, which is always safe.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from prunekit.structured.engine.channels import heads
from prunekit.structured.engine.channels.common import Handler, arg, unknown
from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.shapes import follow_index, follow_reduce
from prunekit.structured.engine.channels.state import AttrRef, Tracked

__all__ = ["function_handler", "method_handler", "module_handler", "unknown"]


def _first(node: fx.Node, ctx: Propagation) -> Any:
    return ctx.state(node.args[0])


def _nothing(node: fx.Node, ctx: Propagation) -> Any:
    return None


def _resolve(ctx: Propagation, arg: Any, out_dim: int, ndim: int, ids: np.ndarray) -> bool:
    """Couple operand ``arg`` of a broadcasting op to channels ``ids`` at output dim
    ``out_dim``; ``False`` when it cannot be coupled (e.g. Tracked along another dim)."""
    state, shape = ctx.state(arg), ctx.shape(arg)
    if not isinstance(shape, tuple):
        return True  # a Python scalar
    own = out_dim - (ndim - len(shape))
    if isinstance(state, Tracked):
        if state.dim != own or state.ids.size != ids.size:
            return False
        ctx.union(state.ids, ids)
    elif own >= 0 and shape[own] != 1:
        if isinstance(state, AttrRef) and shape[own] == ids.size:
            ctx.add_member(state.owner, state.name, own, ids)
        else:
            ctx.uf.freeze(ids)
    return True


def _elementwise(node: fx.Node, ctx: Propagation) -> Any:
    """add/mul/sub/div...: operands with the same channel dim are joined channel-wise."""
    args = list(node.args) + list(node.kwargs.values())
    ndim = len(ctx.shape(node))
    lead = next((a for a in args if isinstance(ctx.state(a), Tracked)), None)
    if lead is None:
        return None
    state = ctx.state(lead)
    out_dim = state.dim + ndim - len(ctx.shape(lead))
    if all(_resolve(ctx, a, out_dim, ndim, state.ids) for a in args if a is not lead):
        return Tracked(out_dim, state.ids)
    return unknown(node, ctx)


def _attention(node: fx.Node, ctx: Propagation) -> Any:
    """``scaled_dot_product_attention``: heads of q, k, v (:func:`heads.sdpa`), and an
    ``attn_mask`` (e.g. a per-head position bias) broadcast against the scores' heads."""
    out = heads.sdpa(node, ctx)
    mask = arg(node, 3, "attn_mask", None)
    if not isinstance(out, Tracked) or mask is None:
        return out
    ok = _resolve(ctx, mask, out.dim, len(ctx.shape(node)), out.ids)
    return out if ok else unknown(node, ctx)


def _cat(node: fx.Node, ctx: Propagation) -> Any:
    tensors = list(arg(node, 0, "tensors", ()))
    ndim = len(ctx.shape(node))
    dim = arg(node, 1, "dim", 0) % ndim
    states = [ctx.state(t) for t in tensors]
    lead = next((s for s in states if isinstance(s, Tracked)), None)
    if lead is None:
        return None
    if dim != lead.dim:
        ok = all(_resolve(ctx, t, lead.dim, ndim, lead.ids) for t in tensors)
        return Tracked(lead.dim, lead.ids) if ok else unknown(node, ctx)
    parts = []
    for t, s in zip(tensors, states, strict=True):
        if isinstance(s, Tracked) and s.dim == dim:
            parts.append(s.ids)
        else:
            ctx.freeze(s)
            parts.append(ctx.fresh(ctx.shape(t)[dim], frozen=True))
    return Tracked(dim, np.concatenate(parts))


def _split(node: fx.Node, ctx: Propagation) -> Any:
    """split/chunk along the channels: one slice of the ids per output. ``chunk`` parts
    must stay equal, so channel j of every part is one coupled channel (e.g. SwiGLU
    gate/up); so are equal ``split`` parts whose size a known attribute of the calling
    module holds (GPT-2's fused q/k/v, ``split(self.split_size)``), and the attribute
    follows. Other ``split`` sizes are constants in the code: their channels are frozen."""
    state = ctx.state(node.args[0])
    if not isinstance(state, Tracked):
        return None
    ndim = len(ctx.shape(node.args[0]))
    dim = arg(node, 2, "dim", 0) % ndim
    outs = ctx.shape(node)
    if dim != state.dim:
        return tuple(Tracked(state.dim, state.ids) for _ in outs)
    bounds = np.cumsum([0] + [s[dim] for s in outs])
    parts = [state.ids[a:b] for a, b in itertools.pairwise(bounds)]
    equal = len({p.size for p in parts}) == 1
    is_chunk = node.target in (torch.chunk, "chunk")
    if equal and (is_chunk or heads.count_attrs(node, ctx, [(parts[0].size, parts[0])])):
        for part in parts[1:]:
            ctx.union(parts[0], part)
    else:
        ctx.freeze(state)
    return tuple(Tracked(dim, p) for p in parts)


def _getitem(node: fx.Node, ctx: Propagation) -> Any:
    state, index = ctx.state(node.args[0]), node.args[1]
    if isinstance(state, (tuple, list)):
        return state[index]
    if not isinstance(state, Tracked):
        return None
    moved = follow_index(index, len(ctx.shape(node.args[0])), state.dim, state.ids)
    return unknown(node, ctx) if moved is None else Tracked(*moved)


def _transpose(node: fx.Node, ctx: Propagation) -> Any:
    state = ctx.state(node.args[0])
    if not isinstance(state, Tracked):
        return None
    ndim = len(ctx.shape(node))
    a, b = arg(node, 1, "dim0", 0) % ndim, arg(node, 2, "dim1", 1) % ndim
    dim = b if state.dim == a else a if state.dim == b else state.dim
    return Tracked(dim, state.ids)


def _permute(node: fx.Node, ctx: Propagation) -> Any:
    state = ctx.state(node.args[0])
    if not isinstance(state, Tracked):
        return None
    dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
    ndim = len(ctx.shape(node))
    return Tracked([d % ndim for d in dims].index(state.dim), state.ids)


def _reduce(node: fx.Node, ctx: Propagation) -> Any:
    state = ctx.state(node.args[0])
    if not isinstance(state, Tracked):
        return None
    ndim = len(ctx.shape(node.args[0]))
    dims, keep = arg(node, 1, "dim", None), arg(node, 2, "keepdim", False)
    dim = follow_reduce(dims, keep, ndim, state.dim)
    return unknown(node, ctx) if dim is None else Tracked(dim, state.ids)


def _softmax(node: fx.Node, ctx: Propagation) -> Any:
    state = ctx.state(node.args[0])
    ndim = len(ctx.shape(node))
    if isinstance(state, Tracked) and arg(node, 1, "dim", -1) % ndim == state.dim:
        return unknown(node, ctx)
    return state


def _spatial(node: fx.Node, ctx: Propagation) -> Any:
    """Pooling and interpolation act on dims 2.. and keep channels in dim 1."""
    state = ctx.state(node.args[0])
    if isinstance(state, Tracked) and state.dim != 1:
        return unknown(node, ctx)
    return state


_UNARY_FUNCS = (
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.elu,
    F.leaky_relu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.dropout,
    F.mish,
    F.softplus,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.neg,
    torch.abs,
    torch.clamp,
    torch.clone,
    torch.detach,
    operator.neg,
    torch.nn.functional.hardtanh,
)
_BINARY_FUNCS = (
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.isub,
    operator.truediv,
    operator.itruediv,
    operator.pow,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
    torch.pow,
    torch.where,
    torch.maximum,
    torch.minimum,
)
_FUNCTIONS: dict[Any, Handler] = {
    **dict.fromkeys(_UNARY_FUNCS, _first),
    **dict.fromkeys(_BINARY_FUNCS, _elementwise),
    torch.cat: _cat,
    torch.concat: _cat,
    torch.split: _split,
    torch.chunk: _split,
    operator.getitem: _getitem,
    operator.matmul: heads.matmul,
    torch.matmul: heads.matmul,
    torch.bmm: heads.matmul,
    F.scaled_dot_product_attention: _attention,
    torch.repeat_interleave: heads.repeat_interleave,
    torch.flatten: heads.reshape,
    torch.reshape: heads.reshape,
    torch.squeeze: heads.reshape,
    torch.unsqueeze: heads.reshape,
    torch.transpose: _transpose,
    torch.permute: _permute,
    torch.mean: _reduce,
    torch.sum: _reduce,
    torch.amax: _reduce,
    F.softmax: _softmax,
    F.log_softmax: _softmax,
    torch.softmax: _softmax,
    F.adaptive_avg_pool1d: _spatial,
    F.adaptive_avg_pool2d: _spatial,
    F.adaptive_avg_pool3d: _spatial,
    F.avg_pool1d: _spatial,
    F.avg_pool2d: _spatial,
    F.avg_pool3d: _spatial,
    F.max_pool1d: _spatial,
    F.max_pool2d: _spatial,
    F.max_pool3d: _spatial,
    F.interpolate: _spatial,
    getattr: _nothing,
    len: _nothing,
}
_METHODS: dict[str, Handler] = {
    **dict.fromkeys(
        (
            "relu",
            "relu_",
            "sigmoid",
            "tanh",
            "contiguous",
            "clone",
            "detach",
            "float",
            "to",
            "type_as",
            "neg",
            "exp",
            "abs",
            "clamp",
            "half",
            "double",
            "bfloat16",
        ),
        _first,
    ),
    **dict.fromkeys(
        (
            "add",
            "add_",
            "mul",
            "mul_",
            "sub",
            "sub_",
            "div",
            "div_",
            "__add__",
            "__mul__",
            "__radd__",
            "__rmul__",
            "pow",
            "__pow__",
        ),
        _elementwise,
    ),
    **dict.fromkeys(
        ("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"), heads.reshape
    ),
    **dict.fromkeys(("size", "dim", "numel"), _nothing),
    "split": _split,
    "chunk": _split,
    "transpose": _transpose,
    "permute": _permute,
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "softmax": _softmax,
    "expand": heads.expand,
    "matmul": heads.matmul,
    "bmm": heads.matmul,
    "repeat_interleave": heads.repeat_interleave,
    "expand_as": heads.expand,
}
_MODULES: dict[type[nn.Module], Handler] = {
    **dict.fromkeys(
        (
            nn.ReLU,
            nn.ReLU6,
            nn.GELU,
            nn.SiLU,
            nn.ELU,
            nn.LeakyReLU,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Sigmoid,
            nn.Tanh,
            nn.Mish,
            nn.Softplus,
            nn.Hardtanh,
            nn.Dropout,
            nn.Dropout1d,
            nn.Dropout2d,
            nn.Dropout3d,
            nn.Identity,
        ),
        _first,
    ),
    **dict.fromkeys(
        (
            nn.MaxPool1d,
            nn.MaxPool2d,
            nn.MaxPool3d,
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
            nn.Upsample,
        ),
        _spatial,
    ),
    nn.Flatten: heads.reshape,
    nn.Unflatten: heads.reshape,
}


def function_handler(target: Any) -> Handler:
    return _FUNCTIONS.get(target, unknown)


def method_handler(name: str) -> Handler:
    return _METHODS.get(name, unknown)


def module_handler(module: nn.Module) -> Handler:
    return _MODULES.get(type(module), unknown)
