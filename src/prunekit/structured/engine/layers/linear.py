"""Linear, transformers' Conv1D and Embedding: channels live in the last dimension."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from prunekit.linear_like import conv1d_class
from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.state import Tracked
from prunekit.structured.engine.layers.base import LayerPruner, ShapeOf, numel, register_layer

__all__ = ["Conv1DPruner", "EmbeddingPruner", "LinearPruner"]


@register_layer
class LinearPruner(LayerPruner):
    """Rows of ``weight`` are output channels, columns read the input's last dim. Applied
    along another dim than the tracked one (token mixing), it passes those channels
    through untouched and its own widths stay fixed."""

    types = (nn.Linear,)
    weight_dims = (0, 1)  # the weight's (output, input) channel dims

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        state = ctx.state(node.args[0])
        if isinstance(state, Tracked) and state.dim != len(ctx.shape(node)) - 1:
            return state
        out_dim, in_dim = self.weight_dims
        in_ids = ctx.input_ids(node.args[0], -1, module.weight.shape[in_dim])
        out_ids = ctx.fresh(module.weight.shape[out_dim])
        ctx.add_member(fqn, "weight", out_dim, out_ids)
        ctx.add_member(fqn, "weight", in_dim, in_ids)
        if module.bias is not None:
            ctx.add_member(fqn, "bias", 0, out_ids)
        return Tracked(len(ctx.shape(node)) - 1, out_ids)

    def resize(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Linear)
        module.out_features, module.in_features = module.weight.shape

    def macs(self, module: nn.Module, out_shape: Any, shape_of: ShapeOf) -> int:
        return numel(out_shape[:-1]) * numel(shape_of("weight"))


@register_layer
class Conv1DPruner(LinearPruner):
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``in x out``."""

    types = ()
    lazy_types = (conv1d_class,)
    weight_dims = (1, 0)

    def resize(self, module: nn.Module) -> None:
        module.nx, module.nf = module.weight.shape


@register_layer
class EmbeddingPruner(LayerPruner):
    """The embedding dimension is a new channel space; the vocabulary is never pruned."""

    types = (nn.Embedding,)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        assert isinstance(module, nn.Embedding)
        out_ids = ctx.fresh(module.embedding_dim)
        ctx.add_member(fqn, "weight", 1, out_ids)
        return Tracked(len(ctx.shape(node)) - 1, out_ids)

    def resize(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Embedding)
        module.embedding_dim = module.weight.shape[1]
