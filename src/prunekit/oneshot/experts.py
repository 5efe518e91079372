"""Mixture-of-experts banks as Linear layers, for the time of a one-shot pruning.

Hugging Face transformers (5.x) stores the experts of a mixture-of-experts block
(Mixtral, Qwen MoE, OLMoE, GPT-OSS, DeepSeek, ...) as one module holding 3-D weights,
``gate_up_proj`` (or ``up_proj``) and ``down_proj``, ``experts x out x in`` (``x in x
out`` when ``is_transposed``), the layout its ``use_experts_implementation`` decorator
announces. No layer of such a bank is an ``nn.Linear``, so a calibrated sparsifier would
see none of the weights that hold most of the model.

``unfused_experts(model)`` swaps every bank for ``ExpertLayers``: one ``nn.Linear`` per
expert and projection whose weight is a view of the bank's tensor, computing what the
bank computes, so each expert is calibrated on exactly the tokens routed to it and
pruned like any Linear. It calls every expert's up projections before any down
projection (each ``ParallelLayers``), so the engine calibrates all experts of a
projection together rather than in one stage per expert. On leaving, the layers' weights
are written back into the bank and the bank returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunekit.errors import UnsupportedError
from prunekit.fqn import fqn_to_module

__all__ = [
    "ExpertLayers", "ParallelLayers", "expand_parallel", "is_expert_bank", "unfused_experts"
]


class ParallelLayers(nn.ModuleList):
    """Layers none of which reads what another computes in the same forward: the
    engine may calibrate them in one stage although each reads an input of its own."""


def _up_name(bank: nn.Module) -> str:
    return "gate_up_proj" if bank.has_gate else "up_proj"


def is_expert_bank(module: nn.Module) -> bool:
    """A transformers experts module with 3-D weights (``use_experts_implementation``)."""
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return False
    weights = [getattr(module, _up_name(module), None), getattr(module, "down_proj", None)]
    return all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights)


def _linear_views(bank: nn.Module, name: str) -> ParallelLayers:
    """One Linear per expert sharing the storage of ``bank.<name>`` (and its bias)."""
    stacked = getattr(bank, name)
    bias = getattr(bank, f"{name}_bias") if bank.has_bias else None
    layers = ParallelLayers()
    for e in range(stacked.shape[0]):
        weight = stacked.data[e].T if bank.is_transposed else stacked.data[e]
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device="meta", dtype=weight.dtype)
        layer.weight = nn.Parameter(weight, requires_grad=stacked.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias.data[e], requires_grad=bias.requires_grad)
        layers.append(layer)
    return layers


class ExpertLayers(nn.Module):
    """What a bank computes, with its experts as ``nn.Linear`` layers (views of the
    bank's weights): every expert's up projection on the tokens routed to it, the gate
    or activation, then every expert's down projection, weighted and summed per token.
    Every layer is called on every forward, on no rows if no token chose its expert, so
    each forward calls the same layers in the same order."""

    def __init__(self, bank: nn.Module) -> None:
        super().__init__()
        if getattr(bank, "_is_expert_parallel", False):
            raise UnsupportedError(f"{type(bank).__name__}: expert-parallel banks (experts "
                                   "sharded over devices) cannot be unfused for pruning")
        self.__dict__["bank"] = bank  # not a submodule: its tensors are the layers' own
        self.up_name = _up_name(bank)
        self.add_module(self.up_name, _linear_views(bank, self.up_name))
        self.down_proj = _linear_views(bank, "down_proj")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        bank, ups = self.bank, getattr(self, self.up_name)
        # (slot, token) pairs, slot-major: the row order of transformers' own loop
        routed = [torch.where(top_k_index.T.eq(e)) for e in range(len(ups))]
        hidden = [ups[e](hidden_states[tokens]) for e, (_, tokens) in enumerate(routed)]
        hidden = [bank._apply_gate(h) if bank.has_gate else bank.act_fn(h) for h in hidden]
        final = torch.zeros_like(hidden_states)
        for e, ((slots, tokens), h) in enumerate(zip(routed, hidden, strict=True)):
            out = self.down_proj[e](h)
            if bank.has_post_expert_norm:
                out = bank.post_expert_norm(out)
            out = out * top_k_weights[tokens, slots, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final

    def write_back(self) -> None:
        """Copy every layer's weight (masked, if a mask is attached) and bias into the
        bank, where a layer no longer holds a view of it."""
        bank = self.bank
        for name, layers in ((self.up_name, getattr(self, self.up_name)),
                             ("down_proj", self.down_proj)):
            for tensor_name in ("weight", "bias") if bank.has_bias else ("weight",):
                stacked = getattr(bank, name if tensor_name == "weight" else f"{name}_bias").data
                for e, layer in enumerate(layers):
                    value = getattr(layer, tensor_name).detach()
                    target = stacked[e]
                    if tensor_name == "weight" and bank.is_transposed:
                        target = target.T
                    if value.data_ptr() != target.data_ptr() or value.stride() != target.stride():
                        target.copy_(value)


def _banks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(fqn, m) for fqn, m in model.named_modules() if fqn and is_expert_bank(m)]


@contextmanager
def unfused_experts(model: nn.Module) -> Iterator[dict[str, ExpertLayers]]:
    """Swap every expert bank of ``model`` for ``ExpertLayers`` while inside; yields
    ``{fqn: layers}``. On leaving, even on an error, the layers' weights go back into the
    banks and the banks back into the model."""
    swapped: dict[str, ExpertLayers] = {}
    banks = _banks(model)
    try:
        for fqn, bank in banks:
            parent, _, child = fqn.rpartition(".")
            layers = ExpertLayers(bank)
            setattr(fqn_to_module(model, parent) if parent else model, child, layers)
            swapped[fqn] = layers
        yield swapped
    finally:
        for fqn, layers in swapped.items():
            layers.write_back()
            parent, _, child = fqn.rpartition(".")
            setattr(fqn_to_module(model, parent) if parent else model, child, layers.bank)


def expand_parallel(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with each one naming a ``ParallelLayers`` (an unfused expert
    projection, ``...experts.down_proj``) replaced by its layers' names."""
    out: list[str] = []
    for name in names:
        module = fqn_to_module(model, name) if isinstance(name, str) else None
        if isinstance(module, ParallelLayers):
            out += [f"{name}.{i}" for i in range(len(module))]
        else:
            out.append(name)
    return out
