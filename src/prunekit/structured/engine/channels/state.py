"""What the channel propagation knows about each value in the captured graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AttrRef", "Member", "Tracked"]


@dataclass(frozen=True)
class Tracked:
    """A tensor whose dimension ``dim`` carries channels with the given ids."""

    dim: int
    ids: np.ndarray


@dataclass(frozen=True)
class AttrRef:
    """A parameter or buffer fetched with ``get_attr``: sliced once a tracked tensor meets it."""

    owner: str
    name: str
    shape: tuple[int, ...]


@dataclass
class Member:
    """Dimension ``dim`` of tensor ``owner.name``; entry i belongs to channel ``ids[i]``."""

    owner: str
    name: str
    dim: int
    ids: np.ndarray

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.owner, self.name, self.dim)
