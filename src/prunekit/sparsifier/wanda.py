"""``WandaSparsifier``: prune by weight magnitude times input activation norm
(Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.linear_like import out_in
from prunekit.sparsifier.calibrated import CalibratedSparsifier, Pattern, parse_pattern
from prunekit.sparsifier.oneshot_math import wanda_keep_mask

__all__ = ["WandaSparsifier"]


class WandaSparsifier(CalibratedSparsifier):
    """Score ``|W_ij| * ||X_j||_2`` and drop the lowest scores of every output row (or
    the M-N lowest of every group of M inputs with ``pattern="N:M"``). Weights are not
    updated; only ``Σ x²`` per input feature is kept while calibrating.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    >>> s = WandaSparsifier(pattern="2:4"); s.prepare(model, None)
    >>> with s.calibrate():
    ...     _ = model(torch.randn(32, 16))
    >>> s.step()
    >>> int((model[0].weight != 0).view(4, 4, 4).sum(-1).max())
    2
    """

    def __init__(self, sparsity_level: float = 0.5, pattern: Pattern = None) -> None:
        super().__init__(sparsity_level=sparsity_level, pattern=pattern)

    def new_statistic(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)

    def white_statistic(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)

    def accumulate(self, statistic: torch.Tensor, inputs: torch.Tensor) -> None:
        statistic.add_(inputs.square().sum(0))

    def update_mask(  # type: ignore[override]
        self,
        module: nn.Module,
        tensor_name: str,
        sparsity_level: float,
        pattern: Pattern,
        statistic: torch.Tensor,
        **kwargs: Any,
    ) -> None:
        nm = parse_pattern(type(self).__name__, pattern)
        weight = out_in(module, self._original(module, tensor_name))
        keep = wanda_keep_mask(weight, statistic, sparsity_level, nm)
        out_in(module, self.state[kwargs["tensor_fqn"]]["mask"]).copy_(keep)
