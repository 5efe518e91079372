"""Walk a captured graph once and build the channel union-find and its members."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import fx, nn

from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.ops import (
    function_handler,
    method_handler,
    module_handler,
)
from prunekit.structured.engine.channels.state import AttrRef
from prunekit.structured.engine.layers import layer_pruner

__all__ = ["propagate"]


def propagate(
    model: nn.Module,
    graph: fx.Graph,
    shapes: dict[fx.Node, Any],
    ignored: Collection[str],
    prune_outputs: bool = False,
) -> Propagation:
    """Channel ids of every value of ``graph`` (captured from ``model``). Graph outputs
    (unless ``prune_outputs``) and the outputs of ``ignored`` modules are frozen, so
    their widths never change."""
    ctx = Propagation(model, shapes)
    for node in graph.nodes:
        if node.op == "output":
            if not prune_outputs:
                ctx.freeze(ctx.state(node.args[0]))
            continue
        ctx.env[node] = _visit(model, node, ctx, ignored)
    return ctx


def _visit(model: nn.Module, node: fx.Node, ctx: Propagation, ignored: Collection[str]) -> Any:
    if node.op == "placeholder":
        return None
    if node.op == "get_attr":
        return _get_attr(model, node)
    if node.op == "call_function":
        return function_handler(node.target)(node, ctx)
    if node.op == "call_method":
        return method_handler(node.target)(node, ctx)
    module = model.get_submodule(node.target)
    pruner = layer_pruner(module)
    if pruner is None:
        state = module_handler(module)(node, ctx)
    else:
        state = pruner.trace(module, node.target, node, ctx)
        ctx.calls.append((node.target, ctx.shape(node)))
    if node.target in ignored:
        ctx.freeze(state)
    return state


def _get_attr(model: nn.Module, node: fx.Node) -> Any:
    owner, _, name = node.target.rpartition(".")
    value = getattr(model.get_submodule(owner), name)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Module):
        return AttrRef(owner, name, tuple(value.shape))
    return None
