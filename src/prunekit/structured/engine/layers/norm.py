"""BatchNorm, LayerNorm and GroupNorm: they index channels but create no new ones."""

from __future__ import annotations

import inspect
from typing import Any

from torch import fx, nn

from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.state import Tracked
from prunekit.structured.engine.layers.base import LayerPruner, register_layer
from prunekit.structured.engine.layers.conv import tie_blocks

__all__ = ["BatchNormPruner", "GroupNormPruner", "LayerNormPruner"]

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@register_layer
class BatchNormPruner(LayerPruner):
    """Per-channel affine and statistics along dim 1: pruning is exact."""

    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        ids = ctx.input_ids(node.args[0], 1, module.num_features)
        for name in _BN_TENSORS:
            if getattr(module, name, None) is not None:
                ctx.add_member(fqn, name, 0, ids)
        return Tracked(1, ids)

    def resize(self, module: nn.Module) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name in _BN_TENSORS:
            tensor = getattr(module, name, None)
            if tensor is not None:
                module.num_features = tensor.shape[0]
                return


@register_layer
class GroupNormPruner(LayerPruner):
    """Statistics are per group, so only whole groups are removed (exact)."""

    types = (nn.GroupNorm,)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        assert isinstance(module, nn.GroupNorm)
        if not module.affine:  # nothing to slice would record the new width
            ctx.freeze(ctx.state(node.args[0]))
            return None
        ids = ctx.input_ids(node.args[0], 1, module.num_channels)
        tie_blocks(ctx, module.num_groups, ids)
        ctx.add_member(fqn, "weight", 0, ids)
        ctx.add_member(fqn, "bias", 0, ids)
        return Tracked(1, ids)

    def resize(self, module: nn.Module) -> None:
        assert isinstance(module, nn.GroupNorm)
        per_group = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        module.num_groups = module.num_channels // per_group


def is_transformers_rms_norm(module: nn.Module) -> bool:
    """A transformers model's own RMSNorm (``LlamaRMSNorm``, ``Qwen3RMSNorm``,
    ``GemmaRMSNorm``...; one class per model, most of them copies): a per-channel weight
    over the last dim, no bias, and a forward of one tensor (gated variants, which take
    a second, are not)."""
    cls = type(module)
    if not (cls.__name__.endswith("RMSNorm") and cls.__module__.startswith("transformers.")):
        return False
    weight = getattr(module, "weight", None)
    takes = list(inspect.signature(module.forward).parameters.values())
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1
            and getattr(module, "bias", None) is None and len(takes) == 1)


@register_layer
class LayerNormPruner(LayerPruner):
    """Affine LayerNorm/RMSNorm over the last dim (torch's, and transformers models'
    own RMSNorm classes). Their statistics are taken over the channels, so pruning them
    changes the statistics: recorded as *inexact*."""

    types = (nn.LayerNorm, nn.RMSNorm)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return is_transformers_rms_norm(module)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        state = ctx.state(node.args[0])
        shape = ctx.shape(node.args[0])
        ndim, normed = len(shape), len(getattr(module, "normalized_shape", (module.weight,)))
        if not isinstance(state, Tracked) or state.dim < ndim - normed:
            return state  # channels outside the normalised dims pass through untouched
        if normed != 1 or module.weight is None:
            ctx.freeze(state)
            return None
        ctx.add_member(fqn, "weight", 0, state.ids)
        if getattr(module, "bias", None) is not None:
            ctx.add_member(fqn, "bias", 0, state.ids)
        ctx.inexact.add(fqn)
        return state

    def resize(self, module: nn.Module) -> None:
        if hasattr(module, "normalized_shape"):  # transformers' RMSNorms keep no size
            module.normalized_shape = (module.weight.shape[0],)
