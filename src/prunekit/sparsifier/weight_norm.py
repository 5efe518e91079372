"""``WeightNormSparsifier``: zero the blocks (or N of every M elements) of lowest norm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit._cpu_masks import copy_mask_
from prunekit.errors import UnsupportedError
from prunekit.masks import square, weight_norm_mask
from prunekit.sparsifier._checks import check_block_shape, check_level, check_zeros_per_block
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["WeightNormSparsifier"]


def _norm_fn(norm: Callable | int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if norm is None or (norm == 2 and not callable(norm)):
        return square
    if callable(norm):
        return norm
    if norm == 1:
        return torch.abs
    raise UnsupportedError(f"L-{norm} is not yet implemented.")


class WeightNormSparsifier(BaseSparsifier):
    """Zero the ``round(sparsity_level * n_blocks)`` blocks of lowest mean score, and in
    each of them ``zeros_per_block`` elements (default: the whole block).

    N:M sparsity, e.g. 2:4: ``sparsity_level=1.0, sparse_block_shape=(1, 4),
    zeros_per_block=2``. ``norm`` is 1 (``|w|``), 2 (``w*w``, the default) or an
    element-wise callable. Linear and Conv1d/2d/3d weights are scored as
    ``(out, in*k...)`` matrices; widths need not be multiples of the block.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    >>> s = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    >>> s.prepare(model, None); s.step()
    >>> int((model[0].weight != 0).view(16, 4, 4).sum(-1).max())
    2
    """

    def __init__(
        self,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: Callable | int | None = None,
    ) -> None:
        block = check_block_shape("WeightNormSparsifier", sparse_block_shape)
        if zeros_per_block is None:
            zeros_per_block = math.prod(block)
        defaults = {
            "sparsity_level": sparsity_level,
            "sparse_block_shape": sparse_block_shape,
            "zeros_per_block": zeros_per_block,
        }
        self.norm_fn = _norm_fn(norm)
        super().__init__(defaults=defaults)
        self.validate_group({"tensor_fqn": "defaults", **defaults})

    def validate_group(self, group: dict[str, Any]) -> None:
        where = f"{type(self).__name__} group {group['tensor_fqn']!r}"
        check_level(where, "sparsity_level", group.get("sparsity_level"))
        block = check_block_shape(where, group.get("sparse_block_shape"))
        check_zeros_per_block(where, group.get("zeros_per_block"), math.prod(block))

    def update_mask(  # type: ignore[override]
        self,
        module: nn.Module,
        tensor_name: str,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int,
        **kwargs: Any,
    ) -> None:
        where = f"{type(self).__name__} {kwargs.get('tensor_fqn', tensor_name)!r}"
        check_zeros_per_block(where, zeros_per_block, math.prod(sparse_block_shape))
        mask = module.parametrizations[tensor_name][0].mask
        keep = weight_norm_mask(
            getattr(module, tensor_name),
            sparsity_level,
            tuple(sparse_block_shape),
            zeros_per_block,
            self.norm_fn,
        )
        copy_mask_(mask, keep)
