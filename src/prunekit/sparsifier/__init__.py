"""Mask-only sparsifiers: they compute masks and never change shapes."""

from prunekit.sparsifier.admm import AdmmSparsifier
from prunekit.sparsifier.base import BaseSparsifier
from prunekit.sparsifier.calibrated import CalibratedSparsifier
from prunekit.sparsifier.nearly_diagonal import NearlyDiagonalSparsifier
from prunekit.sparsifier.sparsegpt import SparseGPTSparsifier
from prunekit.sparsifier.wanda import WandaSparsifier
from prunekit.sparsifier.weight_norm import WeightNormSparsifier

__all__ = [
    "AdmmSparsifier",
    "BaseSparsifier",
    "CalibratedSparsifier",
    "NearlyDiagonalSparsifier",
    "SparseGPTSparsifier",
    "WandaSparsifier",
    "WeightNormSparsifier",
]
