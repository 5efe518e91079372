"""``HessianSparsifier``: the calibration statistic shared by the methods that fit
weights by least squares: the input Hessian ``Σ x xᵀ`` of each layer."""

from __future__ import annotations

import abc
import numbers
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.linear_like import out_in
from prunekit.sparsifier.calibrated import CalibratedSparsifier, Pattern, parse_pattern

__all__ = ["HessianSparsifier"]


class HessianSparsifier(CalibratedSparsifier):
    """Abstract base: holds one ``in x in`` float32 Hessian per calibrated layer, checks
    ``percdamp`` (the damping, as a fraction of the mean Hessian diagonal) and writes
    what ``solve`` returns: new weights into the parameter, the keep-mask into the state.
    """

    @abc.abstractmethod
    def solve(
        self,
        weight: torch.Tensor,
        statistic: torch.Tensor,
        sparsity: float,
        nm: tuple[int, int] | None,
        group: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new weight, keep-mask)`` of one layer from its prepared ``statistic``."""

    def update_mask(  # type: ignore[override]
        self,
        module: nn.Module,
        tensor_name: str,
        sparsity_level: float,
        pattern: Pattern,
        statistic: torch.Tensor,
        **group: Any,
    ) -> None:
        nm = parse_pattern(type(self).__name__, pattern)
        if nm is None and sparsity_level == 0:
            return  # nothing to prune: leave the weights bit for bit
        original = out_in(module, self._original(module, tensor_name))
        weight, keep = self.solve(original.detach().contiguous(), statistic, sparsity_level, nm,
                                  group)
        original.copy_(weight.to(original.dtype))
        out_in(module, self.state[group["tensor_fqn"]]["mask"]).copy_(keep)

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

    def white_statistic(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)

    def accumulate(self, statistic: torch.Tensor, inputs: torch.Tensor) -> None:
        statistic.addmm_(inputs.T, inputs)
