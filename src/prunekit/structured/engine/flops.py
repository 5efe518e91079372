"""Parameter and MAC counts of the layers a plan touches, before and after slicing,
computed from shapes alone (no forward pass)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from prunekit.structured.engine.layers import layer_pruner

__all__ = ["Sizes", "count_macs", "count_params"]

# (owner fqn, tensor name) -> shape after pruning; tensors not listed keep their shape
Sizes = Mapping[tuple[str, str], tuple[int, ...]]


def _shape(module: nn.Module, owner: str, name: str, sizes: Sizes) -> tuple[int, ...]:
    return sizes.get((owner, name), tuple(getattr(module, name).shape))


def count_params(model: nn.Module, sizes: Sizes) -> int:
    """Parameters of ``model`` if its tensors had the shapes in ``sizes``; a parameter
    shared by several modules (tied embeddings) counts once."""
    shapes: dict[int, tuple[int, ...]] = {}
    for owner, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if (owner, name) in sizes or id(p) not in shapes:
                shapes[id(p)] = tuple(sizes.get((owner, name), p.shape))
    return sum(math.prod(shape) for shape in shapes.values())


def count_macs(model: nn.Module, calls: list[tuple[str, Any]], sizes: Sizes) -> int:
    """MACs of the registered layers over the recorded calls (shared layers count once
    per call), with the tensor shapes in ``sizes``."""
    total = 0
    for fqn, out_shape in calls:
        module = model.get_submodule(fqn)
        pruner = layer_pruner(module)
        if pruner is not None:
            total += pruner.macs(
                module, out_shape, lambda n, m=module, f=fqn: _shape(m, f, n, sizes)
            )
    return total
