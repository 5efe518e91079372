"""Conv1d/2d/3d, including grouped and depthwise convolutions."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import fx, nn

from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.state import Tracked
from prunekit.structured.engine.layers.base import LayerPruner, ShapeOf, numel, register_layer

__all__ = ["ConvPruner", "tie_blocks"]


def tie_blocks(ctx: Propagation, groups: int, *spaces: np.ndarray) -> None:
    """Join every id of block j of each space into one coupled channel: grouped layers
    can only lose whole groups (equal-size groups must stay equal)."""
    anchor = spaces[0].reshape(groups, -1)[:, 0]
    for ids in spaces:
        block = ids.size // groups
        ctx.union(ids, np.repeat(anchor, block))


@register_layer
class ConvPruner(LayerPruner):
    """Output channels are a new space; input channels read the incoming one. With
    ``groups > 1`` a group's input and output channels form one unit."""

    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        assert isinstance(module, nn.modules.conv._ConvNd)
        in_ids = ctx.input_ids(node.args[0], 1, module.in_channels)
        out_ids = ctx.fresh(module.out_channels)
        ctx.add_member(fqn, "weight", 0, out_ids)
        if module.bias is not None:
            ctx.add_member(fqn, "bias", 0, out_ids)
        if module.groups == 1:
            ctx.add_member(fqn, "weight", 1, in_ids)
        else:
            tie_blocks(ctx, module.groups, out_ids, in_ids)
        return Tracked(1, out_ids)

    def resize(self, module: nn.Module) -> None:
        assert isinstance(module, nn.modules.conv._ConvNd)
        per_group = module.out_channels // module.groups
        out_channels = module.weight.shape[0]
        if module.groups > 1:
            module.groups = out_channels // per_group
        module.out_channels = out_channels
        module.in_channels = module.weight.shape[1] * module.groups

    def macs(self, module: nn.Module, out_shape: Any, shape_of: ShapeOf) -> int:
        positions = numel(out_shape) // out_shape[1]
        return positions * numel(shape_of("weight"))
