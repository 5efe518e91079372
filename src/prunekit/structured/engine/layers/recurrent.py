"""LSTM / GRU / RNN: hidden units are the channels; each gate block of the stacked
weights repeats them. ``hidden_size`` is shared by every layer and direction, so unit j
of all of them is one coupled channel (the counts must stay equal)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import fx, nn

from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.state import Tracked
from prunekit.structured.engine.layers.base import LayerPruner, ShapeOf, numel, register_layer

__all__ = ["RecurrentPruner"]

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _suffixes(module: nn.RNNBase) -> list[str]:
    return ["", "_reverse"] if module.bidirectional else [""]


@register_layer
class RecurrentPruner(LayerPruner):
    """Single or stacked, uni- or bidirectional; ``proj_size`` and user-given initial
    states freeze the hidden units (their width is fixed from outside)."""

    types = (nn.LSTM, nn.GRU, nn.RNN)

    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        assert isinstance(module, nn.RNNBase)
        in_ids = ctx.input_ids(node.args[0], -1, module.input_size)
        fixed = getattr(module, "proj_size", 0) > 0 or len(node.args) > 1 or bool(node.kwargs)
        hidden = ctx.fresh(module.hidden_size, frozen=fixed)
        gates = np.tile(hidden, _GATES[type(module)])
        layer_out = np.concatenate([hidden] * len(_suffixes(module)))
        for layer in range(module.num_layers):
            for sfx in _suffixes(module):
                ih, hh = f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"
                ctx.add_member(fqn, ih, 0, gates)
                ctx.add_member(fqn, ih, 1, in_ids if layer == 0 else layer_out)
                ctx.add_member(fqn, hh, 0, gates)
                if not fixed:
                    ctx.add_member(fqn, hh, 1, hidden)
                if module.bias:
                    ctx.add_member(fqn, f"bias_ih_l{layer}{sfx}", 0, gates)
                    ctx.add_member(fqn, f"bias_hh_l{layer}{sfx}", 0, gates)
        out_shape = ctx.shape(node)
        out = Tracked(len(out_shape[0]) - 1, layer_out)
        states = Tracked(2, np.concatenate([hidden] * (module.num_layers * len(_suffixes(module)))))
        if isinstance(module, nn.LSTM):
            return (out, (states, states))
        return (out, states)

    def resize(self, module: nn.Module) -> None:
        assert isinstance(module, nn.RNNBase)
        module.hidden_size = module.weight_hh_l0.shape[1]
        module.input_size = module.weight_ih_l0.shape[1]
        module._init_flat_weights()

    def macs(self, module: nn.Module, out_shape: Any, shape_of: ShapeOf) -> int:
        assert isinstance(module, nn.RNNBase)
        steps = numel(out_shape[0][:-1])
        names = [
            f"weight_{k}_l{layer}{sfx}"
            for layer in range(module.num_layers)
            for sfx in _suffixes(module)
            for k in ("ih", "hh")
        ]
        return steps * sum(numel(shape_of(n)) for n in names)
