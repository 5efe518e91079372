"""``HessianSparsifier``: the calibration statistic shared by the methods that fit
weights by least squares: the input Hessian ``Σ x xᵀ`` of each layer."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.sparsifier.calibrated import CalibratedSparsifier

__all__ = ["HessianSparsifier"]


class HessianSparsifier(CalibratedSparsifier):
    """Abstract base: holds one ``in x in`` float32 Hessian per calibrated layer and
    checks ``percdamp`` (the damping, as a fraction of the mean Hessian diagonal)."""

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        where = f"{type(self).__name__} group {group['tensor_fqn']!r}"
        percdamp = group.get("percdamp")
        if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real):
            raise ConfigTypeError(f"{where}: percdamp must be a number, got {percdamp!r}")
        if not percdamp > 0:
            raise ConfigError(f"{where}: need percdamp > 0, got {percdamp}")

    def new_statistic(self, weight: torch.Tensor) -> torch.Tensor:
        n = weight.shape[1]
        return torch.zeros(n, n, dtype=torch.float32, device=weight.device)

    def accumulate(self, statistic: torch.Tensor, inputs: torch.Tensor) -> None:
        statistic.addmm_(inputs.T, inputs)
