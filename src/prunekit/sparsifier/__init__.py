"""Mask-only sparsifiers: they compute masks and never change shapes."""

from prunekit.sparsifier.base import BaseSparsifier
from prunekit.sparsifier.nearly_diagonal import NearlyDiagonalSparsifier
from prunekit.sparsifier.weight_norm import WeightNormSparsifier

__all__ = ["BaseSparsifier", "NearlyDiagonalSparsifier", "WeightNormSparsifier"]
