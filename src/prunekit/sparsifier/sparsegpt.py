"""``SparseGPTSparsifier``: prune and reconstruct each layer from its input Hessian
(Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot")."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.sparsifier.calibrated import Pattern
from prunekit.sparsifier.hessian import HessianSparsifier
from prunekit.sparsifier.oneshot_math import (
    damped_inverse_cholesky,
    masked_least_squares,
    sparsegpt_reconstruct,
)

__all__ = ["SparseGPTSparsifier"]


class SparseGPTSparsifier(HessianSparsifier):
    """Choose the weights to drop by their OBS error ``w² / [H⁻¹]_jj²`` and update the
    remaining ones so the layer's output on the calibration inputs changes least.

    Holds one ``in x in`` Hessian ``Σ x xᵀ`` per calibrated layer. ``percdamp`` adds
    ``percdamp * mean(diag H)`` to the diagonal (more is tried if the Hessian is still
    singular); ``blocksize`` columns are solved together with lazy updates. ``step()``
    writes the reconstructed weights into the original parameter.

    ``exact_update=True`` keeps the mask the OBS pass chose and then solves the kept
    weights exactly (``masked_least_squares``, conjugate gradients on the damped
    Hessian): OBS moves only the weights to the right of each pruned one, so its layer
    error is above the least-squares optimum for the same mask.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    >>> s = SparseGPTSparsifier(sparsity_level=0.5); s.prepare(model, None)
    >>> with s.calibrate():
    ...     _ = model(torch.randn(64, 16))
    >>> s.step(); s.squash_mask()
    >>> int((model[0].weight == 0).sum())
    32
    """

    def __init__(
        self,
        sparsity_level: float = 0.5,
        pattern: Pattern = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        exact_update: bool = False,
    ) -> None:
        super().__init__(
            sparsity_level=sparsity_level, pattern=pattern, blocksize=blocksize,
            percdamp=percdamp, exact_update=exact_update,
        )

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        where = f"{type(self).__name__} group {group['tensor_fqn']!r}"
        blocksize = group.get("blocksize")
        if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
            raise ConfigTypeError(f"{where}: blocksize must be an int, got {blocksize!r}")
        if not isinstance(group.get("exact_update", False), bool):
            raise ConfigTypeError(
                f"{where}: exact_update must be a bool, got {group['exact_update']!r}")
        if blocksize < 1:
            raise ConfigError(f"{where}: need blocksize >= 1, got {blocksize}")

    def prepare_statistic(self, group: dict[str, Any], statistic: torch.Tensor) -> torch.Tensor:
        """The Cholesky factor of the damped inverse Hessian (raises before any change)."""
        try:
            return damped_inverse_cholesky(statistic, group["percdamp"])
        except ConfigError as err:
            raise ConfigError(f"{group['module_fqn']!r}: {err}") from None

    def solve(
        self,
        weight: torch.Tensor,
        statistic: torch.Tensor,
        sparsity: float,
        nm: tuple[int, int] | None,
        group: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new, keep = sparsegpt_reconstruct(weight, statistic, sparsity, nm, group["blocksize"])
        if group.get("exact_update", False):
            hessian = torch.cholesky_inverse(statistic, upper=True)  # the damped H itself
            new = masked_least_squares(new, weight, hessian, keep)
        return new, keep
