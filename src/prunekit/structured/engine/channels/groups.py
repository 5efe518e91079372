"""Turn the channel union-find into *groups*: sets of coupled channels that share
producers and are therefore pruned at one ratio (e.g. every conv feeding a residual
stage), each coupled channel being the unit removed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prunekit.structured.engine.channels.context import Propagation
from prunekit.structured.engine.channels.state import Member

__all__ = ["ChannelGraph", "Group", "build_groups"]


@dataclass
class Group:
    """Coupled channels (dense class indices) and the tensor dims they index."""

    index: int
    classes: np.ndarray
    prunable: np.ndarray
    members: list[Member] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.classes.size)

    def member_names(self) -> tuple[str, ...]:
        """``owner.tensor[dim]`` of every member, in graph order."""
        return tuple(
            dict.fromkeys(f"{m.owner}.{m.name}[{m.dim}]".lstrip(".") for m in self.members)
        )


@dataclass
class ChannelGraph:
    """Every member's entries mapped to dense class indices, and the groups."""

    member_classes: dict[tuple[str, str, int], np.ndarray]
    members: dict[tuple[str, str, int], Member]
    groups: list[Group]
    n_classes: int
    dense_of_root: dict[int, int]
    roots: np.ndarray

    def classes_of(self, ids: np.ndarray) -> np.ndarray:
        """Dense class of each id; -1 for ids no tensor is indexed by."""
        return np.array([self.dense_of_root.get(r, -1) for r in self.roots[ids].tolist()])


def build_groups(ctx: Propagation) -> ChannelGraph:
    roots = ctx.uf.roots()
    used = np.unique(
        np.concatenate([m.ids for m in ctx.members.values()] or [np.zeros(0, np.int64)])
    )
    class_roots = np.unique(roots[used])
    dense_of_root = dict(zip(class_roots.tolist(), range(class_roots.size), strict=True))
    member_classes = {
        key: np.array([dense_of_root[r] for r in roots[m.ids].tolist()], dtype=np.int64)
        for key, m in ctx.members.items()
    }
    space_of_class = _space_components(roots, ctx.uf.spaces())[class_roots]
    frozen = np.zeros(class_roots.size, dtype=bool)
    frozen_roots = ctx.uf.frozen_roots()
    frozen[[dense_of_root[r] for r in frozen_roots if r in dense_of_root]] = True
    groups: list[Group] = []
    for comp in np.unique(space_of_class):
        classes = np.nonzero(space_of_class == comp)[0]
        groups.append(Group(len(groups), classes, classes[~frozen[classes]]))
    group_of_class = np.empty(class_roots.size, dtype=np.int64)
    for g in groups:
        group_of_class[g.classes] = g.index
    for key, m in ctx.members.items():
        for gi in np.unique(group_of_class[member_classes[key]]).tolist():
            groups[gi].members.append(m)
    return ChannelGraph(
        member_classes, dict(ctx.members), groups, int(class_roots.size), dense_of_root, roots
    )


def _space_components(roots: np.ndarray, spaces: np.ndarray) -> np.ndarray:
    """For every id, a representative of the connected set of spaces it belongs to
    (spaces are connected when any of their channels are coupled)."""
    n_spaces = int(spaces.max()) + 1 if spaces.size else 0
    parent = list(range(n_spaces))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    pairs = np.unique(np.stack([spaces[roots], spaces]), axis=1)
    for a, b in pairs.T.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comp = np.array([find(s) for s in range(n_spaces)], dtype=np.int64)
    return comp[spaces]
