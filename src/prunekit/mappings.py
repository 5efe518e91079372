"""Module mappings for ``BaseSparsifier.convert`` to sparse-quantized modules."""

from __future__ import annotations

from torch import nn

__all__ = ["get_dynamic_sparse_quantized_mapping", "get_static_sparse_quantized_mapping"]


def get_static_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """``{nn.Linear: torch.ao.nn.sparse.quantized.Linear}`` (static int8, 1x4 blocks)."""
    import torch.ao.nn.sparse  # lazy: pulls in the quantized engines

    return {nn.Linear: torch.ao.nn.sparse.quantized.Linear}


def get_dynamic_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """``{nn.Linear: torch.ao.nn.sparse.quantized.dynamic.Linear}`` (dynamic int8)."""
    import torch.ao.nn.sparse

    return {nn.Linear: torch.ao.nn.sparse.quantized.dynamic.Linear}
