"""Sparse weights and small models shared by the deploy tests."""

from __future__ import annotations

import torch
from torch import nn


def block_sparse(rows: int, cols: int, block: tuple[int, int], sparsity: float, seed: int = 0):
    """A dense weight whose zeros fill whole ``block``s (about ``sparsity`` of them)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows // block[0], cols // block[1], generator=gen) >= sparsity
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return torch.randn(rows, cols, generator=gen) * mask


def sparse_mlp(block: tuple[int, int] = (1, 1), sparsity: float = 0.9) -> nn.Sequential:
    """Linear-GELU-Linear with zero-filled weights (``block`` zeros); every tensor seeded,
    so a test sees the same model whatever ran before it."""
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model[0].weight.copy_(block_sparse(128, 64, block, sparsity, seed=1))
        model[2].weight.copy_(block_sparse(32, 128, block, sparsity, seed=2))
        for layer in (model[0], model[2]):
            layer.bias.uniform_(-0.1, 0.1, generator=gen)
    return model.eval()
