"""Narrow every expert of a mixture-of-experts model: drop intermediate channels.

An expert is a gated MLP; its intermediate channel ``j`` is row ``j`` of the gate and of
the up projection and column ``j`` of the down projection. ``prune_expert_channels``
runs the calibration batches once through the experts (unfused, see ``experts``), scores
each channel of each expert on the tokens routed to it, keeps the best ``keep`` of every
expert (the same count everywhere, each expert its own channels) and slices the bank's
3-D weights. The result computes exactly what the model computes with the dropped
channels' down columns zeroed (tested), with smaller products.

Scores: ``"activation"`` (default), the channel's activation norm ``‖x_j‖₂``; ``"wanda"``,
that times its down column's norm ``‖W_down[:, j]‖₂`` (the structured Wanda score, the
size of what the channel adds to the output if its inputs were independent). On SmolLM2
and its upcycled MoE twin the activation norm alone lost 2-9% less perplexity in all
four settings measured (``benchmarks/results/oneshot_moe_channels.md``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, UnsupportedError
from prunekit.experts import (
    expert_banks,
    kept_count,
    routed_layout,
    unfused_experts,
)
from prunekit.oneshot.engine import add_input_squares, batch_list, run_batches

__all__ = ["prune_expert_channels"]

_WIDTH_ATTRS = ("moe_intermediate_size", "intermediate_size")


def _channel_dims(bank: nn.Module) -> dict[str, int]:
    """Each bank tensor holding intermediate channels, and the dim they lie along
    (``experts x ...``): the up projection's outputs (twice as many rows when gated),
    its bias, the down projection's inputs."""
    up = "gate_up_proj" if bank.has_gate else "up_proj"
    dims = {up: 2 if bank.is_transposed else 1, "down_proj": 1 if bank.is_transposed else 2}
    return dims | ({f"{up}_bias": 1} if bank.has_bias else {})


def _up_rows(bank: nn.Module, channels: torch.Tensor, width: int) -> torch.Tensor:
    """The rows of the up (or gate-and-up) projection that carry ``channels``."""
    if not bank.has_gate:
        return channels
    if getattr(bank, "is_concatenated", True):  # [gate; up]
        return torch.cat([channels, channels + width])
    return torch.stack([2 * channels, 2 * channels + 1], -1).flatten()  # interleaved


def _width_attr(model: nn.Module, width: int) -> str | None:
    """The config entry holding the experts' width, if one does."""
    config = getattr(model, "config", None)
    return next((a for a in _WIDTH_ATTRS if getattr(config, a, None) == width), None)


SCORES = ("activation", "wanda")


def _scores(model: nn.Module, batches: list[Any], score: str) -> dict[str, torch.Tensor]:
    """Per bank, ``experts x width`` channel scores from one pass over the batches."""
    with unfused_experts(model) as swapped:
        sums = {fqn: torch.zeros(len(layers.down_proj), layers.down_proj[0].in_features,
                                 dtype=torch.float64) for fqn, layers in swapped.items()}
        handles = [layer.register_forward_pre_hook(functools.partial(add_input_squares, total))
                   for fqn, layers in swapped.items()
                   for layer, total in zip(layers.down_proj, sums[fqn], strict=True)]
        run_batches(model, batches, handles)
        if score == "activation":
            return {fqn: total.sqrt() for fqn, total in sums.items()}
        return {fqn: sums[fqn].sqrt() * torch.stack(
                    [layer.weight.detach().double().norm(dim=0).cpu()
                     for layer in layers.down_proj])
                for fqn, layers in swapped.items()}


def _narrowed_shape(bank: nn.Module, name: str, shape: torch.Size, count: int
                    ) -> tuple[int, ...]:  # fmt: skip
    """``shape`` of the bank tensor ``name`` once its experts keep ``count`` channels."""
    dims, dim = list(shape), _channel_dims(bank).get(name)
    if dim is not None:
        dims[dim] = count * (2 if bank.has_gate and name != "down_proj" else 1)
    return tuple(dims)


def _check_config_follows(model: nn.Module, banks: dict[str, nn.Module], attr: str,
                          count: int) -> None:  # fmt: skip
    """Refuse, before any change, if the model built from its config with ``attr`` set
    to ``count`` would not have the narrowed model's shapes (the entry also sizes
    other layers): the config must describe the result for it to load back."""
    config = copy.deepcopy(model.config)
    setattr(config, attr, count)
    try:
        with torch.device("meta"):
            twin = type(model)(config)
    except Exception as err:
        raise UnsupportedError(
            f"prune_expert_channels: {type(model).__name__} could not be rebuilt from its "
            f"config to check that config.{attr} sizes only the experts: "
            f"{type(err).__name__}: {err}") from err
    want = {}
    for name, tensor in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        bank = banks.get(owner)
        want[name] = (_narrowed_shape(bank, leaf, tensor.shape, count) if bank is not None
                      else tuple(tensor.shape))
    got = {name: tuple(t.shape) for name, t in twin.named_parameters()}
    wrong = [n for n in want if got.get(n) != want[n]]
    if wrong:
        raise UnsupportedError(
            f"prune_expert_channels: config.{attr} sizes more than the experts: with it at "
            f"{count}, {wrong[0]!r} would be {got.get(wrong[0])} instead of {want[wrong[0]]}; "
            "the narrowed model could not be loaded back from its config")


def _slice(bank: nn.Module, name: str, index: list[torch.Tensor], dim: int) -> None:
    """Replace ``bank.<name>`` by each expert's ``index[e]`` along ``dim`` (of its slice)."""
    tensor = getattr(bank, name)
    parts = [tensor.data[e].index_select(dim, idx.to(tensor.device)) for e, idx in
             enumerate(index)]
    setattr(bank, name, nn.Parameter(torch.stack(parts), requires_grad=tensor.requires_grad))


def prune_expert_channels(model: nn.Module, calibration_batches: Iterable[Any],
                          keep: int | float, score: str = "activation"
                          ) -> dict[str, list[list[int]]]:  # fmt: skip
    """Keep ``keep`` (a count, or a fraction) intermediate channels in every expert of
    every bank, in place, the best by ``score`` (``"activation"`` or ``"wanda"``, see the
    module docstring); returns ``{bank fqn: [kept channels of expert 0, ...]}``.

    Banks declared through transformers' ``use_experts_implementation`` (gated or not,
    concatenated or interleaved gate/up, transposed, with biases) are narrowed; the
    config's ``moe_intermediate_size`` (or ``intermediate_size``) follows; if that entry
    also sizes other layers (checked by building the model from the changed config on
    the meta device), the call is refused. Everything is checked, and the batches run,
    before any weight changes.
    """
    if score not in SCORES:
        raise ConfigError(f"prune_expert_channels: score must be one of {SCORES}, got "
                          f"{score!r}")
    banks = expert_banks(model)
    if not banks:
        raise UnsupportedError(f"prune_expert_channels: {type(model).__name__} has no expert "
                               "bank")
    for fqn, bank in banks:
        if routed_layout(bank) is None:
            raise UnsupportedError(f"expert bank {fqn!r} ({type(bank).__name__}): narrowing "
                                   "needs a bank declared through use_experts_implementation")
    widths = {bank.down_proj.shape[_channel_dims(bank)["down_proj"]] for _, bank in banks}
    if len(widths) != 1:
        raise UnsupportedError(f"prune_expert_channels: banks of widths {sorted(widths)}")
    width = widths.pop()
    batches = batch_list("prune_expert_channels", calibration_batches)
    count = kept_count("prune_expert_channels", keep, width, 1, "channels per expert")
    attr = _width_attr(model, width)
    if attr is not None:
        _check_config_follows(model, dict(banks), attr, count)
    scores = _scores(model, batches, score)
    kept: dict[str, list[list[int]]] = {}
    with torch.no_grad():
        for fqn, bank in banks:
            channels = [s.topk(count).indices.sort().values for s in scores[fqn]]
            rows = [_up_rows(bank, c, width) for c in channels]
            for name, dim in _channel_dims(bank).items():
                _slice(bank, name, channels if name == "down_proj" else rows, dim - 1)
            for name in ("intermediate_dim", "intermediate_size", "expert_dim"):
                if getattr(bank, name, None) == width:
                    setattr(bank, name, count)
            kept[fqn] = [c.tolist() for c in channels]
        if attr is not None:
            setattr(model.config, attr, count)
    return kept
