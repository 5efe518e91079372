"""``DataNormSparsifier``: zero the blocks (or N of every M elements) of lowest L1/L2 norm
in tensors and embedding tables, scored on the unmasked data."""

from __future__ import annotations

import math
from typing import Any

import torch

from prunekit.data.base import BaseDataSparsifier
from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.masks import as_matrix, square, weight_norm_mask
from prunekit.sparsifier._checks import check_block_shape, check_level, check_zeros_per_block

__all__ = ["DataNormSparsifier", "data_norm_mask"]

_NORMS = {"L1": torch.abs, "L2": square}


def data_norm_mask(
    data: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
) -> torch.Tensor:
    """Bool keep-mask of ``DataNormSparsifier`` in ``data``'s own shape.

    Scored like the reference: singleton dimensions are dropped, 1-D data is one row, and
    ``round(sparsity_level * n_blocks)`` blocks are chosen with no block spared.

    >>> m = data_norm_mask(torch.arange(8.0).reshape(8, 1), 0.5, (1, 4))
    >>> m.flatten().tolist()
    [False, False, False, False, True, True, True, True]
    """
    block = tuple(sparse_block_shape)
    zeros = math.prod(block) if zeros_per_block is None else zeros_per_block
    matrix = as_matrix(data.detach().squeeze())
    keep = weight_norm_mask(
        matrix,
        sparsity_level,
        block,
        zeros,
        _NORMS[norm],
        clamp_blocks=False,
        in_block_ties_first=True,
    )
    return keep.reshape(data.shape)


class DataNormSparsifier(BaseDataSparsifier):
    """Zero the ``round(sparsity_level * n_blocks)`` blocks of lowest mean L1/L2 norm, and
    in each of them ``zeros_per_block`` elements (default: the whole block).

    Every argument is a default that ``add_data(name, data, **config)`` may override.
    Data may be 1-D or 2-D (plus singleton dimensions); the mask always has the data's
    shape.

    >>> import torch
    >>> table = torch.nn.Embedding(100, 16)
    >>> s = DataNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    >>> _ = s.add_data("table", table)
    >>> s.step()
    >>> int(s.get_mask("table").view(100, 4, 4).sum(-1).max())
    2
    """

    def __init__(
        self,
        data_list: list[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
    ) -> None:
        block = check_block_shape("DataNormSparsifier", sparse_block_shape)
        if zeros_per_block is None:
            zeros_per_block = math.prod(block)
        if norm not in _NORMS:
            raise ConfigError(f"DataNormSparsifier: norm must be 'L1' or 'L2', got {norm!r}")
        defaults = {
            "sparsity_level": sparsity_level,
            "sparse_block_shape": sparse_block_shape,
            "zeros_per_block": zeros_per_block,
        }
        self._check_config("DataNormSparsifier defaults", defaults)
        self.norm = norm
        super().__init__(data_list=data_list, **defaults)

    @staticmethod
    def _check_config(where: str, config: dict[str, Any]) -> None:
        check_level(where, "sparsity_level", config.get("sparsity_level"))
        block = check_block_shape(where, config.get("sparse_block_shape"))
        check_zeros_per_block(where, config.get("zeros_per_block"), math.prod(block))

    def validate_data(self, name: str, data: torch.Tensor, config: dict[str, Any]) -> None:
        where = f"DataNormSparsifier data {name!r}"
        if not (data.is_floating_point() and data.layout == torch.strided):
            raise ConfigTypeError(
                f"{where}: expected a dense floating-point tensor, got {data.dtype} ({data.layout})"
            )
        if sum(d != 1 for d in data.shape) > 2:
            raise ConfigError(
                f"{where}: only 1-D and 2-D data (plus singleton dimensions) is supported, got "
                f"shape {tuple(data.shape)}; reshape it to 2-D first"
            )
        self._check_config(where, config)

    def update_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int,
        **kwargs: Any,
    ) -> None:
        keep = data_norm_mask(data, sparsity_level, sparse_block_shape, zeros_per_block, self.norm)
        self._write_mask(name, keep)
