"""Linear-like layers: ``nn.Linear``, and Hugging Face transformers' ``Conv1D`` (GPT-2
and its kin), the same affine map with its weight stored transposed (``in x out``). The
calibrated sparsifiers and ``deploy`` work on ``out x in`` weights; ``out_in`` gives that
view of either, so a Conv1D layer is pruned (N:M groups running along its inputs) and
deployed exactly as the equivalent Linear would be."""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from prunekit.parametrization import original_tensor

__all__ = ["LAYER_KINDS", "conv1d_class", "in_features", "is_conv1d", "is_linear_like", "out_in"]

LAYER_KINDS = "nn.Linear or transformers' Conv1D"


def conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D``, if transformers is loaded (a model holding one has
    loaded it), without importing transformers."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_class()
    return conv1d is not None and issubclass(type_before_parametrizations(module), conv1d)


def is_linear_like(module: nn.Module) -> bool:
    return issubclass(type_before_parametrizations(module), nn.Linear) or is_conv1d(module)


def in_features(module: nn.Module) -> int:
    """The input width of a Linear-like layer."""
    if is_conv1d(module):
        return int(original_tensor(module, "weight").shape[0])
    return int(module.in_features)


def out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``module``'s weight: its original, its mask) as an
    ``out x in`` view: transposed for a Conv1D, itself for a Linear. Writes into the view
    reach the tensor."""
    return tensor.T if is_conv1d(module) else tensor
