"""Mutable bookkeeping shared by the graph walk and the per-layer tracers."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import fx, nn

from prunekit.structured.engine.channels.state import Member, Tracked
from prunekit.structured.engine.channels.unionfind import ChannelUnionFind

__all__ = ["Propagation", "Shape"]

Shape = tuple[int, ...]


class Propagation:
    """Channel ids, the tensors they index (members) and the state of every graph value."""

    def __init__(self, root: nn.Module, shapes: dict[fx.Node, Any]) -> None:
        self.root = root
        self.uf = ChannelUnionFind()
        self.members: dict[tuple[str, str, int], Member] = {}
        self.env: dict[fx.Node, Any] = {}
        self.shapes = shapes
        self.inexact: set[str] = set()
        self.calls: list[tuple[str, Any]] = []
        self.attrs: dict[tuple[str, str], tuple[int, np.ndarray]] = {}

    def state(self, arg: Any) -> Any:
        """The channel state of an fx argument (``None`` for constants and untracked)."""
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.state(a) for a in arg)
        return None

    def shape(self, arg: Any) -> Any:
        return self.shapes.get(arg) if isinstance(arg, fx.Node) else None

    def fresh(self, n: int, frozen: bool = False) -> np.ndarray:
        ids = self.uf.fresh(n)
        if frozen:
            self.uf.freeze(ids)
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union(a, b)

    def freeze(self, value: Any) -> None:
        """Forbid pruning every channel reachable in ``value`` (nested tuples allowed)."""
        if isinstance(value, Tracked):
            self.uf.freeze(value.ids)
        elif isinstance(value, (tuple, list)):
            for item in value:
                self.freeze(item)
        elif isinstance(value, dict):
            self.freeze(list(value.values()))

    def add_member(self, owner: str, name: str, dim: int, ids: np.ndarray) -> None:
        """Record that entry i of ``owner.name`` along ``dim`` is channel ``ids[i]``."""
        key = (owner, name, dim)
        if key in self.members:  # a module called twice: both calls see the same tensor
            self.union(self.members[key].ids, ids)
            return
        self.members[key] = Member(owner, name, dim, np.asarray(ids, dtype=np.int64))

    def add_attr(self, owner: str, name: str, old: int, ids: np.ndarray) -> None:
        """Integer attribute ``owner.name`` (e.g. ``num_heads``) counts the channels
        ``ids``: after pruning it becomes the number kept."""
        key = (owner, name)
        if key in self.attrs and self.attrs[key][1].size == ids.size:
            self.union(self.attrs[key][1], ids)
        elif key not in self.attrs:
            self.attrs[key] = (old, np.asarray(ids, dtype=np.int64))

    def input_ids(self, arg: Any, dim: int, size: int) -> np.ndarray:
        """Ids of channel dim ``dim`` (negative allowed) of an input, or fresh frozen ones
        when the input's channels are not tracked along that dimension."""
        state = self.state(arg)
        shape = self.shape(arg)
        if (
            isinstance(state, Tracked)
            and isinstance(shape, tuple)
            and state.dim == dim % len(shape)
            and state.ids.size == size
        ):
            return state.ids
        self.freeze(state)
        return self.fresh(size, frozen=True)
