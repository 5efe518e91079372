"""``AdmmSparsifier``: prune each layer by ADMM on its input Hessian, choosing the mask
gradually and solving the kept weights exactly (after Boža 2024, "Fast and Effective
Weight Update for Pruned Large Language Models")."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.sparsifier.calibrated import Pattern, parse_pattern
from prunekit.sparsifier.hessian import HessianSparsifier
from prunekit.sparsifier.oneshot_math import admm_prune

__all__ = ["AdmmSparsifier"]


class AdmmSparsifier(HessianSparsifier):
    """Minimise each layer's output error on the calibration inputs, ``‖WX - ŴX‖²``,
    over sparse ``Ŵ`` by ADMM (``oneshot_math.admm_prune``): the mask is re-chosen from
    the iterate while its sparsity ramps up, so weights SparseGPT's one left-to-right
    pass would drop for good can come back; the kept weights are then the exact
    least-squares solution for the final mask. On the same Hessian its layer error is
    below SparseGPT's, exact update included (tested).

    ``percdamp`` damps each input by that fraction of its own Hessian diagonal;
    ``iters`` ADMM iterations (the mask settles in the first half), each two matrix
    products of the layer's size.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    >>> s = AdmmSparsifier(pattern="2:4"); s.prepare(model, None)
    >>> with s.calibrate():
    ...     _ = model(torch.randn(64, 16))
    >>> s.step(); s.squash_mask()
    >>> int((model[0].weight != 0).view(4, 4, 4).sum(-1).max())
    2
    """

    def __init__(
        self,
        sparsity_level: float = 0.5,
        pattern: Pattern = None,
        percdamp: float = 0.01,
        iters: int = 60,
    ) -> None:
        super().__init__(
            sparsity_level=sparsity_level, pattern=pattern, percdamp=percdamp, iters=iters
        )

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        iters = group.get("iters")
        where = f"{type(self).__name__} group {group['tensor_fqn']!r}"
        if isinstance(iters, bool) or not isinstance(iters, numbers.Integral):
            raise ConfigTypeError(f"{where}: iters must be an int, got {iters!r}")
        if iters < 2:
            raise ConfigError(f"{where}: need iters >= 2, got {iters}")

    def update_mask(  # type: ignore[override]
        self,
        module: nn.Module,
        tensor_name: str,
        sparsity_level: float,
        pattern: Pattern,
        statistic: torch.Tensor,
        percdamp: float,
        iters: int,
        **kwargs: Any,
    ) -> None:
        nm = parse_pattern(type(self).__name__, pattern)
        if nm is None and sparsity_level == 0:
            return  # nothing to prune: leave the weights bit for bit
        original = self._original(module, tensor_name)
        weight, keep = admm_prune(original, statistic, sparsity_level, nm, percdamp, iters)
        original.copy_(weight.to(original.dtype))
        self.state[kwargs["tensor_fqn"]]["mask"].copy_(keep)
