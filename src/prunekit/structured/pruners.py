"""The reference's three structured pruners, with the same scores and counts.

Masks only ever lose rows (the reference's monotonic behaviour, kept: a schedule that
lowers ``sparsity_level`` does not bring rows back; FPGM at ``sparsity_level <= 0``
resets the mask to all-kept, as the reference does). Scores are computed on the masked
weight, so already-pruned rows (score 0) are picked first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigKeyError, UnsupportedError
from prunekit.masks import _dense
from prunekit.sparsifier._checks import check_level
from prunekit.structured.base import BaseStructuredSparsifier
from prunekit.structured.shrink import structured_mask

__all__ = ["FPGMPruner", "LSTMSaliencyPruner", "SaliencyPruner"]


def _row_l1(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of every row. A weight sharded by FSDP2 is scored where it lies and only
    the norms are gathered, so every rank ranks all rows alike."""
    return _dense(weight.norm(dim=tuple(range(1, weight.dim())), p=1))


class _LevelPruner(BaseStructuredSparsifier):
    """Shared check: every group needs a ``sparsity_level`` in [0, 1]."""

    def validate_group(self, group: dict[str, Any]) -> None:
        where = f"{type(self).__name__}: group {group['tensor_fqn']!r}"
        if "sparsity_level" not in group:
            raise ConfigKeyError(
                f"{where} has no 'sparsity_level'; pass it in defaults (e.g. "
                f"{type(self).__name__}({{'sparsity_level': 0.5}})) or in the config entry"
            )
        check_level(where, "sparsity_level", group["sparsity_level"])

    @staticmethod
    def _mask(module: nn.Module, tensor_name: str) -> torch.Tensor:
        mask = structured_mask(module, tensor_name)
        if mask is None:
            raise ConfigError(f"{tensor_name!r} of {type(module).__name__} has no row mask")
        return mask


class SaliencyPruner(_LevelPruner):
    """Prune ``int(rows * sparsity_level)`` rows with the smallest L1 norm.

    >>> import torch, prunekit.structured as ps
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
    >>> pruner.prepare(model, None)
    >>> pruner.step()
    >>> int(model[0].parametrizations.weight[0].mask.sum())
    2
    """

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        weight = getattr(module, tensor_name)
        mask = self._mask(module, tensor_name)
        count = int(len(mask) * kwargs["sparsity_level"])
        mask[(-_row_l1(weight)).topk(count).indices] = False


class LSTMSaliencyPruner(_LevelPruner):
    """Like ``SaliencyPruner`` but per LSTM gate: the rows split into 4 equal blocks
    (input, forget, cell, output gates), each losing ``int(block * sparsity_level)`` rows.

    Gates are scored independently, as in the reference; ``prune()`` removes a hidden
    unit only where all of its gate rows are masked and keeps the others as zero rows, so
    independent gates rarely shrink the LSTM. With the group key ``tie_gates=True`` (a
    prunekit addition) whole units are scored (L1 over their rows in all four gates of
    ``weight_ih_l{k}`` and ``weight_hh_l{k}``) and masked in every gate, so ``prune()``
    removes ``int(hidden_size * sparsity_level)`` units per layer.
    """

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        rows = self._original(group["module"], group["tensor_name"]).shape[0]
        if rows % 4:
            raise ConfigError(
                f"LSTMSaliencyPruner: {group['tensor_fqn']!r} has {rows} rows; expected a "
                "multiple of 4 (one block per LSTM gate)"
            )

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        weight = getattr(module, tensor_name)
        mask = self._mask(module, tensor_name)
        if kwargs.get("tie_gates", False):
            self._mask_units(module, tensor_name, mask, kwargs["sparsity_level"])
            return
        gates = _row_l1(weight).reshape(4, -1)
        count = int(gates.shape[1] * kwargs["sparsity_level"])
        lowest = gates.topk(count, dim=1, largest=False, sorted=False).indices
        offsets = torch.arange(4, device=lowest.device).unsqueeze(1) * gates.shape[1]
        mask[(lowest + offsets).flatten()] = False


    @staticmethod
    def _mask_units(module: nn.Module, tensor_name: str, mask: torch.Tensor, level: float):
        """Mask the lowest-scoring hidden units in all four gates."""
        names = [tensor_name]
        if isinstance(module, nn.LSTM):  # score with both weights of the layer
            layer = tensor_name.rsplit("_l", 1)[1]
            names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}"]
        scores = sum(_row_l1(getattr(module, n)).reshape(4, -1).sum(0) for n in names)
        count = int(scores.numel() * level)
        lowest = scores.topk(count, largest=False).indices
        mask.view(4, -1)[:, lowest] = False


class FPGMPruner(_LevelPruner):
    """Filter Pruning via Geometric Median: prune the ``round(rows * sparsity_level)`` rows
    whose summed distance to all other rows is smallest.

    ``dist``: None or 2 (Euclidean), 1 (Manhattan) or a callable mapping the
    ``(rows, features)`` matrix to a ``(rows, rows)`` distance matrix.
    """

    def __init__(self, sparsity_level: float = 0.5, dist: Callable | int | None = None) -> None:
        if dist is None:
            dist = 2
        if callable(dist):
            self.dist_fn = dist
        elif dist in (1, 2) and not isinstance(dist, bool):
            self.dist_fn = _CDist(int(dist))
        else:
            raise UnsupportedError(
                f"FPGMPruner: dist must be 1, 2, None or a callable, got {dist!r}"
            )
        super().__init__(defaults={"sparsity_level": sparsity_level})

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "dist_fn": self.dist_fn}

    def _compute_distance(self, t: torch.Tensor) -> torch.Tensor:
        """Summed absolute distance of each row (flattened filter) to every row."""
        flat = t.reshape(t.shape[0], -1)
        return self.dist_fn(flat).abs().sum(dim=1)

    def update_mask(  # type: ignore[override]
        self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs: Any
    ) -> None:
        mask = self._mask(module, tensor_name)
        if sparsity_level <= 0:
            mask.fill_(True)
        elif sparsity_level >= 1:
            mask.fill_(False)
        else:
            weight = _dense(getattr(module, tensor_name))  # all rows, on every rank
            count = min(max(round(sparsity_level * weight.shape[0]), 0), weight.shape[0])
            closest = self._compute_distance(weight).topk(count, largest=False).indices
            mask[closest] = False


class _CDist:
    """Pairwise ``p``-norm distances between rows (a class, so pruners pickle)."""

    def __init__(self, p: int) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x, p=self.p)
