"""``NearlyDiagonalSparsifier``: keep a band of width ``nearliness`` around the diagonal."""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.masks import nearly_diagonal_mask
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["NearlyDiagonalSparsifier"]


class NearlyDiagonalSparsifier(BaseSparsifier):
    """Keep ``|row - col| <= nearliness // 2`` of every 2-D weight; the weights' values
    play no part. ``nearliness`` must be odd (1 keeps the diagonal); ``<= 0`` zeroes all.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> s = NearlyDiagonalSparsifier(nearliness=3); s.prepare(model, None); s.step()
    >>> int((model[0].weight != 0).sum())
    10
    """

    def __init__(self, nearliness: int = 1) -> None:
        super().__init__(defaults={"nearliness": nearliness})
        self._check_nearliness("NearlyDiagonalSparsifier", nearliness, None)

    @staticmethod
    def _check_nearliness(where: str, nearliness: Any, shape: tuple[int, ...] | None) -> None:
        if isinstance(nearliness, bool) or not isinstance(nearliness, numbers.Integral):
            raise ConfigTypeError(f"{where}: nearliness must be an odd int, got {nearliness!r}")
        if nearliness <= 0:
            return
        if nearliness % 2 == 0:
            raise ConfigError(f"{where}: nearliness can only be an odd number, got {nearliness}")
        if shape is not None and nearliness // 2 >= min(shape):
            raise ConfigError(
                f"{where}: nearliness cannot be larger than the dimensions of tensor: "
                f"nearliness={nearliness} needs nearliness // 2 < {min(shape)} for shape "
                f"{tuple(shape)}"
            )

    def validate_group(self, group: dict[str, Any]) -> None:
        where = f"NearlyDiagonalSparsifier group {group['tensor_fqn']!r}"
        shape = tuple(self._original(group["module"], group["tensor_name"]).shape)
        if len(shape) != 2:
            raise ConfigError(f"{where}: needs a 2-D weight, got shape {shape}")
        self._check_nearliness(where, group.get("nearliness"), shape)

    def update_mask(  # type: ignore[override]
        self, module: nn.Module, tensor_name: str, nearliness: int, **kwargs: Any
    ) -> None:
        mask = module.parametrizations[tensor_name][0].mask
        keep = nearly_diagonal_mask(tuple(mask.shape), nearliness, device=mask.device)
        mask.copy_(keep)
