"""Drop whole experts of a mixture-of-experts model: the ones calibration routes least to.

Unstructured sparsity in the experts saves memory only once a kernel packs it; removing
an expert removes its weights outright. ``drop_experts`` runs the calibration batches
once, sums per expert the routing weight the router gave it (its share of the tokens,
weighted by how much each relied on it), keeps the ``keep`` most used experts of every
bank, and slices them out of the bank's 3-D weights and the router's rows. The model
then routes among the kept experts exactly as the original would with the dropped
experts' router logits at ``-inf`` (tested): softmax and top-k see only the rest.

Banks declared through transformers' ``use_experts_implementation`` with a linear
router (``weight`` ``experts x hidden``, optional ``bias``: Mixtral, Qwen MoE, OLMoE,
GPT-OSS) are supported; routers with per-expert state of another kind (DeepSeek's
score-correction bias and expert groups) and Llama 4's bank are refused by name. Every
bank keeps the same number of experts, so the model's config describes it again and
``save_pretrained`` / ``from_pretrained`` round-trip.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import UnsupportedError
from prunekit.experts import expert_banks, kept_count, routed_layout
from prunekit.oneshot.engine import batch_list, run_batches

__all__ = ["drop_experts"]

_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


def _router(model: nn.Module, fqn: str, bank: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(router, parent)``: the linear router beside ``bank`` (a sibling whose only
    tensors are ``weight``, ``experts x hidden``, and an optional ``bias``, ``experts``)
    and the module holding both."""
    where = f"expert bank {fqn!r} ({type(bank).__name__})"
    if routed_layout(bank) is None:
        raise UnsupportedError(f"{where}: dropping experts needs a bank declared through "
                               "transformers' use_experts_implementation")
    parent = model.get_submodule(fqn.rpartition(".")[0])
    experts = bank.down_proj.shape[0]
    for child in parent.children():
        weight = getattr(child, "weight", None)
        if child is bank or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if weight.shape[0] != experts:
            continue
        tensors = dict(child.named_parameters()) | dict(child.named_buffers())
        extra = sorted(set(tensors) - {"weight", "bias"})
        bias = tensors.get("bias")
        if extra or (bias is not None and tuple(bias.shape) != (experts,)):
            raise UnsupportedError(
                f"{where}: its router {type(child).__name__} holds {extra or ['bias']} "
                "besides a per-expert weight and bias; dropping experts would leave them "
                "inconsistent")
        return child, parent
    raise UnsupportedError(f"{where}: no linear router (weight of {experts} rows) beside it")


def _usage(model: nn.Module, routers: dict[str, nn.Module], batches: list[Any]
           ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per bank (``routers``: bank fqn -> its router), the routing weight each of its
    experts received over the batches."""
    mass = {fqn: torch.zeros(r.weight.shape[0], dtype=torch.float64) for fqn, r in
            routers.items()}

    def record(fqn: str, _m: nn.Module, _a: tuple, output: Any) -> None:
        parts = output if isinstance(output, tuple) else (output,)
        indices = [p for p in parts if isinstance(p, torch.Tensor) and not p.is_floating_point()]
        scores = [p for p in parts if isinstance(p, torch.Tensor) and p.is_floating_point()
                  and indices and p.shape == indices[0].shape]
        if not (indices and scores):
            raise UnsupportedError(f"the router of {fqn!r} returned no (scores, expert "
                                   "indices) pair")
        mass[fqn].index_add_(0, indices[0].flatten().cpu(),
                             scores[0].detach().flatten().double().cpu())

    handles = [r.register_forward_hook(functools.partial(record, fqn))
               for fqn, r in routers.items()]
    run_batches(model, batches, handles)
    return mass


def _take(module: nn.Module, name: str, kept: torch.Tensor) -> None:
    tensor = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor.data[kept.to(tensor.device)].clone(),
                                       requires_grad=tensor.requires_grad))


def _set_counts(objects: Iterable[Any], old: int, new: int) -> None:
    """Set every expert-count attribute holding ``old`` to ``new`` (None objects skipped)."""
    for obj in objects:
        for attr in _COUNT_ATTRS:
            if getattr(obj, attr, None) == old:
                setattr(obj, attr, new)


def drop_experts(model: nn.Module, calibration_batches: Iterable[Any], keep: int | float
                 ) -> dict[str, list[int]]:  # fmt: skip
    """Keep the ``keep`` (a count, or a fraction of each bank) most used experts of
    every expert bank, in place; returns ``{bank fqn: kept expert indices}``.

    Use is the routing weight each expert received over ``calibration_batches`` (token
    ids, or dicts of the model's arguments). Everything is checked, and the batches run,
    before any weight changes.

    >>> from prunekit.oneshot.expert_drop import drop_experts
    >>> kept = drop_experts(moe, batches, keep=0.75)  # doctest: +SKIP
    """
    banks = expert_banks(model)
    if not banks:
        raise UnsupportedError(f"drop_experts: {type(model).__name__} has no expert bank")
    batches = batch_list("drop_experts", calibration_batches)
    placed = {fqn: _router(model, fqn, bank) for fqn, bank in banks}
    routers = {fqn: router for fqn, (router, _) in placed.items()}
    sizes = {bank.down_proj.shape[0] for _, bank in banks}
    if len(sizes) != 1:
        raise UnsupportedError(f"drop_experts: banks of {sorted(sizes)} experts; every bank "
                               "must have as many for the config to describe the result")
    experts = sizes.pop()
    top_k = max(int(getattr(r, "top_k", 1)) for r in routers.values())
    count = kept_count("drop_experts", keep, experts, top_k, "experts")
    mass = _usage(model, routers, batches)
    config = getattr(model, "config", None)
    kept_by_bank: dict[str, list[int]] = {}
    with torch.no_grad():
        for fqn, bank in banks:
            router, parent = placed[fqn]
            kept = mass[fqn].topk(count).indices.sort().values
            names = [n for n in ("gate_up_proj", "up_proj", "down_proj") if hasattr(bank, n)]
            for name in names + [f"{n}_bias" for n in names if bank.has_bias]:
                _take(bank, name, kept)
            for name in ("weight", "bias"):
                if getattr(router, name, None) is not None:
                    _take(router, name, kept)
            _set_counts([bank, router, parent, getattr(bank, "config", None)], experts, count)
            kept_by_bank[fqn] = kept.tolist()
        _set_counts([config, getattr(config, "text_config", None)], experts, count)
    return kept_by_bank
