"""Real image data for the quality benchmark: Fashion-MNIST from Debian's
``dataset-fashion-mnist`` (gzipped IDX files), or scikit-learn's bundled digits when
that package is absent (``--quick`` on CI)."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims, big-endian payload), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=_IDX_TYPES[dtype_code], offset=4 + 4 * ndim)
    return payload.reshape(shape)


def fashion_mnist() -> dict[str, torch.Tensor]:
    """Train (60k) and test (10k) images as float tensors ``(n, 1, 28, 28)`` in [0, 1],
    normalised with the training mean/std, and int64 labels."""
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = read_idx(FASHION / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION / f"{stem}-labels-idx1-ubyte.gz")
        out[f"x_{split}"] = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        out[f"y_{split}"] = torch.from_numpy(labels.astype(np.int64))
    mean, std = out["x_train"].mean(), out["x_train"].std()
    for split in ("train", "test"):
        out[f"x_{split}"] = (out[f"x_{split}"] - mean) / std
    return out


def digits() -> dict[str, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images): 1200 to train, the rest to test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = (x[perm] - 0.3) / 0.4, y[perm]
    return {"x_train": x[:1200], "y_train": y[:1200], "x_test": x[1200:], "y_test": y[1200:]}


def load(quick: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """Fashion-MNIST when installed (a 1k/1k subset in quick mode), else digits."""
    if not (FASHION / "t10k-labels-idx1-ubyte.gz").exists():
        return "sklearn digits", digits()
    data = fashion_mnist()
    if quick:
        data = {k: v[:1000] for k, v in data.items()}
    return "Fashion-MNIST", data


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass; the same ``seed`` gives every method the same batches."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(y), batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


class EpochLoader:
    """An iterable over shuffled batches that reshuffles (deterministically) per pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size, self.seed, self.passes = x, y, batch_size, seed, 0

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.passes += 1
        return batches(self.x, self.y, self.batch_size, self.seed * 1000 + self.passes)
