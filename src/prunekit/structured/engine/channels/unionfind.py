"""Element-level union-find over channel ids.

Every channel of every produced tensor gets an integer id; ops that force two channels
to be pruned together join their ids. A root of the forest is one *coupled channel*:
the smallest unit that can be removed without breaking the graph.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ChannelUnionFind"]


class ChannelUnionFind:
    """Vectorised union-find: ids are allocated in blocks (one block per *space*)."""

    def __init__(self) -> None:
        self._parent = np.zeros(0, dtype=np.int64)
        self._space = np.zeros(0, dtype=np.int64)
        self._frozen: list[np.ndarray] = []
        self.n_spaces = 0

    def __len__(self) -> int:
        return int(self._parent.size)

    def fresh(self, n: int) -> np.ndarray:
        """Allocate ``n`` new ids forming one new channel space."""
        start = self._parent.size
        ids = np.arange(start, start + n, dtype=np.int64)
        self._parent = np.concatenate([self._parent, ids])
        self._space = np.concatenate([self._space, np.full(n, self.n_spaces, dtype=np.int64)])
        self.n_spaces += 1
        return ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        roots = self._parent[ids]
        while True:
            nxt = self._parent[roots]
            if np.array_equal(nxt, roots):
                return roots
            roots = nxt

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join ``a[i]`` with ``b[i]`` for every i (arrays of equal length)."""
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            lo = np.minimum(ra[differ], rb[differ])
            hi = np.maximum(ra[differ], rb[differ])
            self._parent[hi] = lo

    def freeze(self, ids: np.ndarray) -> None:
        """Mark ids whose coupled channels must never be pruned (outputs, unknown ops)."""
        self._frozen.append(np.asarray(ids, dtype=np.int64).reshape(-1))

    def roots(self) -> np.ndarray:
        """Root of every id, with full path compression."""
        self._parent = self.find(np.arange(self._parent.size))
        return self._parent.copy()

    def frozen_roots(self) -> set[int]:
        if not self._frozen:
            return set()
        return set(self.find(np.concatenate(self._frozen)).tolist())

    def spaces(self) -> np.ndarray:
        """Space index of every id (which producer allocated it)."""
        return self._space
