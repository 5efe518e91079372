"""ATen ops of an exported graph, renamed to the torch functions the channel handlers know.

Most ops keep their arguments (``aten.add.Tensor(x, y)`` is ``operator.add(x, y)``); a few
are rewritten into the form fx would have recorded (``slice``/``select`` become indexing,
``unflatten`` a reshape to its output shape, ``expand`` the tensor method). Ops not listed
keep their ATen target, which the handlers treat as unknown: their channels are frozen,
which is always safe.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["translate"]

aten = torch.ops.aten

ShapesOf = Callable[[Any], Any]
Call = tuple[str, Any, tuple[Any, ...], dict[str, Any]]

_RENAMED: dict[Any, Any] = {
    aten.add: operator.add, aten.add_: operator.add, aten.sub: operator.sub,
    aten.mul: operator.mul, aten.mul_: operator.mul, aten.div: operator.truediv,
    aten.pow: torch.pow,
    aten.where: torch.where, aten.maximum: torch.maximum, aten.minimum: torch.minimum,
    aten.relu: F.relu, aten.relu_: F.relu, aten.relu6: F.relu6, aten.gelu: F.gelu,
    aten.silu: F.silu, aten.silu_: F.silu, aten.elu: F.elu, aten.leaky_relu: F.leaky_relu,
    aten.hardswish: F.hardswish, aten.hardsigmoid: F.hardsigmoid, aten.mish: F.mish,
    aten.softplus: F.softplus, aten.hardtanh: F.hardtanh, aten.hardtanh_: F.hardtanh,
    aten.sigmoid: torch.sigmoid, aten.tanh: torch.tanh, aten.exp: torch.exp,
    aten.neg: torch.neg, aten.abs: torch.abs, aten.clamp: torch.clamp,
    aten.dropout: F.dropout, aten.clone: torch.clone, aten.contiguous: torch.clone,
    aten.alias: torch.clone, aten.detach: torch.detach, aten._to_copy: torch.clone,
    aten.to: torch.clone, aten.type_as: torch.clone,
    aten.cat: torch.cat, aten.concat: torch.cat, aten.split: torch.split,
    aten.split_with_sizes: torch.split, aten.chunk: torch.chunk,
    aten.view: torch.reshape, aten.reshape: torch.reshape, aten._unsafe_view: torch.reshape,
    aten.flatten: torch.flatten, aten.unsqueeze: torch.unsqueeze, aten.squeeze: torch.squeeze,
    aten.transpose: torch.transpose, aten.permute: torch.permute,
    aten.mean: torch.mean, aten.sum: torch.sum, aten.amax: torch.amax,
    aten.softmax: F.softmax, aten._softmax: F.softmax,
    aten.log_softmax: F.log_softmax, aten._log_softmax: F.log_softmax,
    aten.matmul: torch.matmul, aten.bmm: torch.matmul, aten.mm: torch.matmul,
    aten.scaled_dot_product_attention: F.scaled_dot_product_attention,
    aten.repeat_interleave: torch.repeat_interleave,
    aten.adaptive_avg_pool1d: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d: F.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d: F.adaptive_avg_pool3d,
    aten.avg_pool1d: F.avg_pool1d, aten.avg_pool2d: F.avg_pool2d, aten.avg_pool3d: F.avg_pool3d,
    aten.max_pool1d: F.max_pool1d, aten.max_pool2d: F.max_pool2d, aten.max_pool3d: F.max_pool3d,
    aten.upsample_nearest2d: F.interpolate, aten.upsample_bilinear2d: F.interpolate,
}  # fmt: skip

_DROPPED = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size}


def _index(node: fx.Node, shapes_of: ShapesOf, dim: int, item: Any) -> Call:
    ndim = len(shapes_of(node.args[0]))
    index = (slice(None),) * (dim % ndim) + (item,)
    return "call_function", operator.getitem, (node.args[0], index), {}


def _slice(node: fx.Node, shapes_of: ShapesOf) -> Call:
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    return _index(node, shapes_of, dim, slice(start, end, step))


def _select(node: fx.Node, shapes_of: ShapesOf) -> Call:
    return _index(node, shapes_of, node.args[1], node.args[2])


def _unflatten(node: fx.Node, shapes_of: ShapesOf) -> Call:
    return "call_function", torch.reshape, (node.args[0], list(shapes_of(node))), {}


def _expand(node: fx.Node, shapes_of: ShapesOf) -> Call:
    return "call_method", "expand", (node.args[0], node.args[1]), {}


_REWRITTEN: dict[Any, Callable[[fx.Node, ShapesOf], Call]] = {
    aten.slice: _slice,
    aten.select: _select,
    aten.unflatten: _unflatten,
    aten.expand: _expand,
}


def translate(node: fx.Node, shapes_of: ShapesOf) -> Call | tuple[str, None, tuple, dict]:
    """``(op, target, args, kwargs)`` of the torch-level call for an exported node (args
    still refer to the exported graph); ``target`` is ``None`` for ops to drop."""
    packet = getattr(node.target, "overloadpacket", node.target)
    if packet in _DROPPED:
        return "call_function", None, (), {}
    if packet in _REWRITTEN:
        return _REWRITTEN[packet](node, shapes_of)
    target = _RENAMED.get(packet, node.target)
    return "call_function", target, tuple(node.args), dict(node.kwargs)
