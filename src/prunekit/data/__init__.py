"""Sparsity for data that is not a layer weight: tensors, embedding tables, activations.

Mirrors ``torch.ao.pruning._experimental.data_sparsifier``, ``data_scheduler`` and
``activation_sparsifier``: code written for them runs after changing the import.
"""

from prunekit.data.activation import ActivationSparsifier
from prunekit.data.base import BaseDataSparsifier, DataNameError
from prunekit.data.norm import DataNormSparsifier, data_norm_mask
from prunekit.data.packed import PackedSparsity
from prunekit.data.quantize import post_training_sparse_quantize
from prunekit.data.scheduler import BaseDataScheduler

__all__ = [
    "ActivationSparsifier",
    "BaseDataScheduler",
    "BaseDataSparsifier",
    "DataNameError",
    "DataNormSparsifier",
    "PackedSparsity",
    "data_norm_mask",
    "post_training_sparse_quantize",
]
