"""LAMP as a channel importance for the structured engine (``importance="lamp"``).

Registered in the engine's importance registry on import, so
``prunekit.structured.engine.prune(model, x, ratio, importance="lamp",
global_pruning=True)`` ranks channels of different layers on one scale-free footing.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.accuracy.allocation import lamp_scores
from prunekit.structured.engine.importance import Importance, register_importance

__all__ = ["LAMPImportance"]


@register_importance
class LAMPImportance(Importance):
    """LAMP over channel norms: ``n_i^2 / sum_{n_j >= n_i} n_j^2`` for the L2 norm ``n`` of
    each channel's slice, so every layer's strongest channel scores 1. Only weight
    matrices have an opinion (biases and norms follow their group)."""

    name = "lamp"

    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        if tensor.dim() < 2:
            return None
        norms = tensor.detach().float().movedim(dim, 0).reshape(tensor.shape[dim], -1).norm(dim=1)
        return lamp_scores(norms)
