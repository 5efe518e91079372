"""Mixture-of-experts banks as Linear layers: for the time of a one-shot pruning, or for
good once deployed.

Hugging Face transformers (5.x) stores the experts of a mixture-of-experts block
(Mixtral, Qwen MoE, OLMoE, GPT-OSS, DeepSeek, Llama 4, ...) as one module holding 3-D
weights, ``gate_up_proj`` (or ``up_proj``) and ``down_proj``, ``experts x out x in``
(``x in x out`` when transposed). Most declare their layout through transformers'
``use_experts_implementation`` decorator; Llama 4's has one of its own. No layer of such
a bank is an ``nn.Linear``, so a calibrated sparsifier would see none of the weights
that hold most of the model.

``unfused_experts(model)`` swaps every bank for an ``ExpertLayers``: one ``nn.Linear``
per expert and projection whose weight is a view of the bank's tensor, computing what
the bank computes, so each expert is calibrated on exactly the tokens routed to it and
pruned like any Linear. It calls every expert's up projection before any down
projection (each a ``ParallelLayers``), so the engine calibrates all experts of a
projection together rather than in one stage per expert. On leaving, the layers' weights
are written back into the bank and the bank returns. ``prunekit.deploy.to_sparse`` keeps
an ``ExpertLayers`` for good (``own_weights``) where experts get sparse layouts.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError
from prunekit.fqn import fqn_to_module

__all__ = [
    "ExpertLayers",
    "Llama4ExpertLayers",
    "ParallelLayers",
    "RoutedExpertLayers",
    "expand_parallel",
    "expert_banks",
    "is_expert_bank",
    "kept_count",
    "put_module",
    "routed_layout",
    "routing_gates",
    "unfused",
    "unfused_experts",
]


class ParallelLayers(nn.ModuleList):
    """Layers none of which reads what another computes in the same forward: the
    engine may calibrate them in one stage although each reads an input of its own."""


def routed_layout(module: nn.Module) -> tuple[str, bool, bool] | None:
    """``(up projection's name, transposed, biased)`` of a bank declared through
    transformers' ``use_experts_implementation`` (its flags), else None."""
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return None
    return ("gate_up_proj" if module.has_gate else "up_proj", module.is_transposed,
            module.has_bias)


def _llama4_layout(module: nn.Module) -> tuple[str, bool, bool] | None:
    """Llama 4's experts: ``gate_up_proj`` ``experts x in x 2·out``, no flags."""
    named = type(module).__name__ == "Llama4TextExperts"
    return ("gate_up_proj", True, False) if named and callable(getattr(module, "act_fn", None)) \
        else None


def _layout(module: nn.Module) -> tuple[str, bool, bool] | None:
    layout = routed_layout(module) or _llama4_layout(module)
    if layout is None:
        return None
    weights = [getattr(module, layout[0], None), getattr(module, "down_proj", None)]
    return layout if all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights) else None


def is_expert_bank(module: nn.Module) -> bool:
    """A transformers experts module with 3-D weights this module can unfuse: one
    declared through ``use_experts_implementation``, or Llama 4's."""
    return _layout(module) is not None


def _linear_views(stacked: nn.Parameter, bias: nn.Parameter | None, transposed: bool
                  ) -> ParallelLayers:  # fmt: skip
    """One Linear per expert sharing the storage of ``stacked`` (and ``bias``)."""
    layers = ParallelLayers()
    for e in range(stacked.shape[0]):
        weight = stacked.data[e].T if transposed else stacked.data[e]
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device="meta", dtype=weight.dtype)
        layer.weight = nn.Parameter(weight, requires_grad=stacked.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias.data[e], requires_grad=bias.requires_grad)
        layers.append(layer)
    return layers


class ExpertLayers(nn.Module):
    """A bank's experts as ``nn.Linear`` layers (views of the bank's weights), named as
    the bank names its weights (``gate_up_proj.3``). Subclasses compute what the bank
    computes. While ``call_every_expert`` (the default), each forward calls every layer,
    on no rows if no token chose its expert, so each forward calls the same layers in the
    same order (the calibration engine relies on it); deployed, only the experts chosen
    run (all of them while traced)."""

    call_every_expert = True

    def __init__(self, bank: nn.Module) -> None:
        super().__init__()
        layout = _layout(bank)
        assert layout is not None, "not an expert bank"
        self.__dict__["bank"] = bank  # not a submodule: its tensors are the layers' own
        self.up_name, self.transposed, self.biased = layout
        for name in (self.up_name, "down_proj"):
            bias = getattr(bank, f"{name}_bias") if self.biased else None
            self.add_module(name, _linear_views(getattr(bank, name), bias, self.transposed))

    @property
    def ups(self) -> ParallelLayers:
        return getattr(self, self.up_name)

    def _runs_every_expert(self) -> bool:
        """Whether this forward runs every expert: while calibrating, and while traced
        (``torch.export`` and ``torch.compile`` cannot branch on where tokens went)."""
        return self.call_every_expert or torch.compiler.is_compiling()

    def _bank_tensors(self) -> list[tuple[str, str, str]]:
        """``(bank tensor, projection, layer tensor)`` for each tensor the layers view."""
        names = [(name, name, "weight") for name in (self.up_name, "down_proj")]
        return names + [(f"{name}_bias", name, "bias") for name in
                        (self.up_name, "down_proj")] * self.biased

    def foreign_tensors(self) -> list[str]:
        """The bank's own parameters and buffers that are not its experts' (none in
        transformers' banks): ``own_weights`` would leave them behind."""
        viewed = {bank_name for bank_name, _, _ in self._bank_tensors()}
        own = [n for n, _ in self.bank.named_parameters(recurse=False)]
        own += [n for n, _ in self.bank.named_buffers(recurse=False)]
        return [n for n in own if n not in viewed]

    def own_weights(self) -> None:
        """Make these layers the experts for good, in place of the bank: a layer still
        viewing the bank's storage gets a contiguous copy, the bank's expert tensors are
        dropped (their memory freed once the bank leaves the model) and its submodules
        (activation, post-expert norm) become this module's, so ``.to()``,
        ``parameters()`` and ``state_dict`` see them. The bank's forward no longer runs."""
        assert not self.foreign_tensors(), "checked before deploying"
        for _, projection, tensor_name in self._bank_tensors():
            for layer in getattr(self, projection):
                value = getattr(layer, tensor_name, None)
                if isinstance(value, nn.Parameter):
                    copy = value.detach().clone(memory_format=torch.contiguous_format)
                    setattr(layer, tensor_name, nn.Parameter(copy, value.requires_grad))
        for bank_name, _, _ in self._bank_tensors():
            delattr(self.bank, bank_name)
        for name, child in self.bank.named_children():
            self.add_module(name, child)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:  # fmt: skip
        """A checkpoint of the bank itself (3-D ``gate_up_proj``, ...) loads expert by
        expert: its tensors are split into the layers' keys first."""
        for bank_name, projection, tensor_name in self._bank_tensors():
            stacked = state_dict.get(prefix + bank_name)
            dims = 2 if tensor_name == "bias" else 3
            if not isinstance(stacked, torch.Tensor) or stacked.dim() != dims:
                continue
            del state_dict[prefix + bank_name]
            transpose = self.transposed and tensor_name == "weight"
            for e, value in enumerate(stacked):
                state_dict[f"{prefix}{projection}.{e}.{tensor_name}"] = (
                    value.T if transpose else value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def write_back(self) -> None:
        """Copy every layer's weight (masked, if a mask is attached) and bias into the
        bank, where a layer no longer holds a view of it."""
        for bank_name, projection, tensor_name in self._bank_tensors():
            stacked = getattr(self.bank, bank_name).data
            for e, layer in enumerate(getattr(self, projection)):
                value, target = getattr(layer, tensor_name).detach(), stacked[e]
                if tensor_name == "weight" and self.transposed:
                    target = target.T
                if value.data_ptr() != target.data_ptr() or value.stride() != target.stride():
                    target.copy_(value)


class RoutedExpertLayers(ExpertLayers):
    """A bank declared through ``use_experts_implementation``: called with the tokens,
    each token's chosen experts and their weights. Every expert's up projection on the
    tokens routed to it, the gate or activation, then every expert's down projection,
    weighted and summed per token, in transformers' own row order."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        bank, ups = self.bank, self.ups
        experts = range(len(ups)) if self._runs_every_expert() else \
            [e for e in top_k_index.unique().tolist() if 0 <= e < len(ups)]
        # (slot, token) pairs, slot-major: the row order of transformers' own loop
        routed = {e: torch.where(top_k_index.T.eq(e)) for e in experts}
        hidden = {e: ups[e](hidden_states[tokens]) for e, (_, tokens) in routed.items()}
        hidden = {e: bank._apply_gate(h) if bank.has_gate else bank.act_fn(h)
                  for e, h in hidden.items()}
        final = torch.zeros_like(hidden_states)
        for e, (slots, tokens) in routed.items():
            out = self.down_proj[e](hidden[e])
            if bank.has_post_expert_norm:
                out = bank.post_expert_norm(out)
            out = out * top_k_weights[tokens, slots, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final


class Llama4ExpertLayers(ExpertLayers):
    """Llama 4's bank: called with every token once per expert (``experts x tokens``
    rows), each scaled by its routing score, zero where the expert was not chosen. A
    zero row gives a zero output (no bias; the gate's activation is 0 at 0), so each
    expert runs on its nonzero rows only: its statistic counts the tokens routed to it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.view(len(self.ups), -1, hidden_states.shape[-1])
        final = torch.zeros_like(rows)
        for e, expert_rows in enumerate(rows):
            routed = expert_rows.ne(0).any(-1).nonzero().squeeze(1)
            if not (self._runs_every_expert() or len(routed)):
                continue
            gate, up = self.ups[e](expert_rows[routed]).chunk(2, dim=-1)
            final[e, routed] = self.down_proj[e](up * self.bank.act_fn(gate))
        return final.view(-1, hidden_states.shape[-1])


def unfused(bank: nn.Module) -> ExpertLayers:
    """The ``ExpertLayers`` computing what ``bank`` computes."""
    return (RoutedExpertLayers if routed_layout(bank) else Llama4ExpertLayers)(bank)


def expert_banks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's expert banks, each checked to be one this module can unfuse."""
    banks = [(fqn, m) for fqn, m in model.named_modules() if fqn and is_expert_bank(m)]
    for fqn, bank in banks:
        where = f"expert bank {fqn!r} ({type(bank).__name__})"
        if getattr(bank, "_is_expert_parallel", False):
            raise UnsupportedError(f"{where}: its experts are sharded over devices (expert "
                                   "parallel); prune an unsharded copy")
        if any(p.is_meta for p in bank.parameters()):
            raise UnsupportedError(f"{where}: its weights are on the meta device "
                                   "(offloaded); load the model without offloading")
    return banks


def put_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """Set ``module`` at ``fqn`` (a submodule's name) in ``model``."""
    parent, _, child = fqn.rpartition(".")
    setattr(fqn_to_module(model, parent) if parent else model, child, module)


@contextmanager
def unfused_experts(model: nn.Module) -> Iterator[dict[str, ExpertLayers]]:
    """Swap every expert bank of ``model`` for ``ExpertLayers`` while inside; yields
    ``{fqn: layers}``. On leaving, even on an error, the layers' weights go back into the
    banks and the banks back into the model."""
    swapped: dict[str, ExpertLayers] = {}
    banks = expert_banks(model)
    try:
        for fqn, bank in banks:
            swapped[fqn] = unfused(bank)
            put_module(model, fqn, swapped[fqn])
        yield swapped
    finally:
        for fqn, layers in swapped.items():
            layers.write_back()
            put_module(model, fqn, layers.bank)


def routing_gates(block: nn.Module) -> set[int]:
    """``id``s of the Linear layers that route tokens among an unfused bank's experts:
    siblings of an ``ExpertLayers`` with one output per expert (Llama 4's router) or a
    single one (Qwen MoE's shared-expert gate). Tiny, and a pruned gate moves tokens to
    other experts, so one-shot pruning leaves them dense unless named."""
    gates: set[int] = set()
    for parent in block.modules():
        children = list(parent.children())
        banks = [c for c in children if isinstance(c, ExpertLayers)]
        for bank in banks:
            gates |= {id(c) for c in children if isinstance(c, nn.Linear)
                      and c.out_features in (len(bank.ups), 1)}
    return gates


def kept_count(where: str, keep: Any, total: int, least: int, unit: str) -> int:
    """How many of ``total`` ``unit``s ``keep`` keeps: an int is a count, a float a
    fraction; refused unless between ``least`` and ``total``."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ConfigTypeError(f"{where}: keep must be an int ({unit}) or a fraction, got "
                              f"{keep!r}")
    count = int(keep) if isinstance(keep, numbers.Integral) else round(float(keep) * total)
    if not least <= count <= total:
        raise ConfigError(f"{where}: keep={keep!r} keeps {count} of {total} {unit}; need "
                          f"between {least} and {total}")
    return count


def expand_parallel(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with each one naming an unfused bank (``...mlp.experts``) or one of its
    projections (a ``ParallelLayers``: ``...experts.down_proj``) replaced by its layers'
    names."""
    out: list[str] = []
    for name in names:
        module = fqn_to_module(model, name) if isinstance(name, str) else None
        if isinstance(module, ExpertLayers):
            out += expand_parallel(model, [f"{name}.{module.up_name}", f"{name}.down_proj"])
        elif isinstance(module, ParallelLayers):
            out += [f"{name}.{i}" for i in range(len(module))]
        else:
            out.append(name)
    return out
