"""The pure index arithmetic of the channel propagation, checked against torch itself."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.structured.engine.channels.shapes import (
    follow_index,
    follow_reduce,
    follow_reshape,
    follow_split,
)
from prunekit.structured.engine.channels.unionfind import ChannelUnionFind


def _labelled(shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """A tensor whose value is its index along ``dim``."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim]).reshape(view).expand(shape)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.data())
def test_follow_reshape_matches_torch_flatten(shape: list[int], data: st.DataObject) -> None:
    dim = data.draw(st.integers(0, len(shape) - 1))
    start = data.draw(st.integers(0, len(shape) - 1))
    end = data.draw(st.integers(start, len(shape) - 1))
    x = _labelled(tuple(shape), dim)
    y = x.flatten(start, end)
    moved = follow_reshape(tuple(shape), tuple(y.shape), dim, np.arange(shape[dim]))
    assert moved is not None
    j, ids = moved
    assert ids.size == y.shape[j]
    expected = torch.as_tensor(ids).reshape([-1 if d == j else 1 for d in range(y.dim())])
    assert torch.equal(y, expected.expand(y.shape))


def test_follow_reshape_refuses_a_split_that_follow_split_finds() -> None:
    assert follow_reshape((2, 5, 12), (2, 5, 3, 4), 2, np.arange(12)) is None
    assert follow_split((2, 5, 12), (2, 5, 3, 4), 2) == (2, 3)
    assert follow_split((2, 12, 5), (2, 5, 12), 1) is None


def test_follow_index_and_reduce() -> None:
    ids = np.arange(4)
    assert follow_index((slice(None), 0), 3, 2, ids)[0] == 1
    assert follow_index((Ellipsis, None, slice(None)), 3, 2, ids)[0] == 3
    assert follow_index((slice(None), slice(0, 2)), 2, 1, ids) is None  # literal width
    assert follow_index((slice(None), 1), 2, 1, ids) is None
    assert follow_reduce((2, 3), False, 4, 1) == 1
    assert follow_reduce(-1, True, 3, 2) is None
    assert follow_reduce(0, False, 3, 2) == 1


def test_union_find_joins_elementwise_and_tracks_frozen_and_spaces() -> None:
    uf = ChannelUnionFind()
    a, b = uf.fresh(3), uf.fresh(3)
    uf.union(a, b[::-1])
    uf.freeze(a[:1])
    roots = uf.roots()
    assert roots[a[0]] == roots[b[2]] and roots[a[1]] == roots[b[1]]
    assert len(set(roots.tolist())) == 3
    assert uf.frozen_roots() == {int(roots[a[0]])}
    assert uf.spaces().tolist() == [0, 0, 0, 1, 1, 1]
