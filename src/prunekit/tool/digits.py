"""The demo's task: scikit-learn's bundled handwritten digits (1797 8x8 images, no
download) and a small CNN, with the training and evaluation loops the stages share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Digits", "DigitsCNN", "accuracy", "load_digits", "train_epoch"]


class DigitsCNN(nn.Module):
    """Two 3x3 conv blocks and a two-layer classifier: ~40k parameters, ~1 M MACs."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class Digits:
    """Train/test split of the digits, images scaled to [0, 1] as ``(N, 1, 8, 8)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """The scikit-learn digits, split by a seeded permutation."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def train_epoch(model: nn.Module, data: Digits, optimizer: torch.optim.Optimizer,
                batch_size: int = 64, after_step: Callable[[], None] | None = None) -> float:
    """One shuffled pass over the training set; returns the mean loss."""
    model.train()
    order = torch.randperm(len(data.y_train))
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(idx)
    return total / len(order)


def accuracy(model: nn.Module, data: Digits) -> float:
    """Top-1 accuracy on the test split."""
    model.eval()
    with torch.inference_mode():
        predicted = model(data.x_test).argmax(dim=1)
    return float((predicted == data.y_test).float().mean())
