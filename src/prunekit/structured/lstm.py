"""Shrink the hidden size of a prepared ``nn.LSTM``.

Each weight row of an LSTM belongs to one gate (input, forget, cell, output) of one hidden
unit. The masked model zeroes the masked rows *and* their biases, so a unit whose
cell-gate row is masked keeps a zero cell state and outputs exactly zero. A unit is
removed when all four of its gate rows are masked in both ``weight_ih`` and ``weight_hh``;
rows masked for a unit that stays are kept as zeros. When every gate carries the same
mask (the reference's assumption) this gives the reference's shapes and weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import UnsupportedError
from prunekit.structured.shrink import Branch, check_branches, slice_channels, structured_mask

__all__ = ["check_lstm", "lstm_unit_masks", "shrink_lstm"]


def _gate_mask(lstm: nn.LSTM, name: str) -> torch.Tensor:
    mask = structured_mask(lstm, name)
    if mask is None:
        return torch.ones(4 * lstm.hidden_size, dtype=torch.bool, device=getattr(lstm, name).device)
    return mask


def lstm_unit_masks(lstm: nn.LSTM) -> list[torch.Tensor]:
    """Per layer, which hidden units survive (bool, ``hidden_size`` long)."""
    units = []
    for layer in range(lstm.num_layers):
        gone = torch.ones(lstm.hidden_size, dtype=torch.bool)
        for kind in ("ih", "hh"):
            rows = _gate_mask(lstm, f"weight_{kind}_l{layer}").cpu().reshape(4, -1)
            gone &= (~rows).all(dim=0)
        units.append(~gone)
    return units


def check_lstm(lstm: nn.LSTM, name: str, branches: Sequence[Branch]) -> None:
    """Raise before any change if ``lstm`` cannot be shrunk."""
    if lstm.bidirectional or lstm.proj_size:
        raise UnsupportedError(
            f"prune: LSTM {name!r} is bidirectional or projected (bidirectional="
            f"{lstm.bidirectional}, proj_size={lstm.proj_size}); only plain LSTMs are supported"
        )
    counts = [int(u.sum()) for u in lstm_unit_masks(lstm)]
    if len(set(counts)) > 1:
        raise UnsupportedError(
            f"prune: LSTM {name!r} would keep {counts} hidden units per layer; nn.LSTM needs "
            "the same hidden size in every layer, so mask the same number of units per layer"
        )
    for branch in branches:
        norms = [s for s in branch.steps if isinstance(s.module, nn.modules.batchnorm._BatchNorm)]
        if norms:
            raise UnsupportedError(
                f"prune: {norms[0].name} after LSTM {name!r} would turn the removed units' zeros "
                "into a shift that the pattern pruner does not fold; only Dropout/Identity/"
                "LayerNorm may sit between an LSTM and its Linear"
            )
    check_branches(lstm, name, lstm.hidden_size, branches)


def _rows(units: torch.Tensor) -> torch.Tensor:
    """Row indices of the kept units in every gate block."""
    hidden = units.numel()
    kept = units.nonzero().flatten()
    return torch.cat([kept + g * hidden for g in range(4)])


def _masked(lstm: nn.LSTM, name: str) -> torch.Tensor:
    """The tensor as the masked model sees it; removes its parametrizations."""
    if parametrize.is_parametrized(lstm, name):
        parametrize.remove_parametrizations(lstm, name, leave_parametrized=True)
    return getattr(lstm, name).detach()


def shrink_lstm(lstm: nn.LSTM, branches: Sequence[Branch]) -> None:
    """Remove the dropped hidden units of every layer, then the consumers' inputs."""
    units = [u.to(lstm.weight_hh_l0.device) for u in lstm_unit_masks(lstm)]
    with torch.no_grad():
        for layer, keep in enumerate(units):
            rows = _rows(keep)
            for kind in ("ih", "hh"):
                weight = _masked(lstm, f"weight_{kind}_l{layer}")[rows]
                columns = keep if kind == "hh" else (units[layer - 1] if layer else None)
                if columns is not None:
                    weight = weight[:, columns]
                setattr(lstm, f"weight_{kind}_l{layer}", nn.Parameter(weight))
                if lstm.bias:
                    bias = _masked(lstm, f"bias_{kind}_l{layer}")[rows]
                    setattr(lstm, f"bias_{kind}_l{layer}", nn.Parameter(bias))
    last = units[-1]
    lstm.hidden_size = int(last.sum())
    lstm._init_flat_weights()
    for branch in branches:
        for step in branch.steps:
            if step.module is not None:
                slice_channels(step.module, last)
        if branch.consumer is not None:
            _cut_columns(branch.consumer, last)


def _cut_columns(consumer: nn.Module, keep: torch.Tensor) -> None:
    with torch.no_grad():
        if parametrize.is_parametrized(consumer, "weight"):
            plist = consumer.parametrizations.weight
            plist.original = nn.Parameter(plist.original[:, keep])
            width = plist.original.shape[1]
        else:
            consumer.weight = nn.Parameter(consumer.weight[:, keep])
            width = consumer.weight.shape[1]
    consumer.in_features = width
