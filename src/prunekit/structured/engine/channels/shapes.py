"""Pure index arithmetic: where a channel dimension goes through reshapes, indexing
and permutations. No graph, no torch: easy to test on its own."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["follow_index", "follow_reduce", "follow_reshape", "follow_split"]


def follow_reshape(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int, ids: np.ndarray
) -> tuple[int, np.ndarray] | None:
    """Channel dim and ids after a view/reshape/flatten/(un)squeeze, or ``None`` when the
    channel dimension is split (e.g. into heads) and cannot be followed."""
    before = math.prod(in_shape[:dim])
    prefix = 1
    for j, size in enumerate(out_shape):
        if prefix == before and size == in_shape[dim]:
            return j, ids
        if prefix > before:
            break
        merged = _merged_range(in_shape, prefix, prefix * size, dim)
        if merged is not None:
            start, stop = merged
            grid = [1] * (stop - start)
            grid[dim - start] = ids.size
            block = np.broadcast_to(ids.reshape(grid), in_shape[start:stop])
            return j, np.ascontiguousarray(block).reshape(-1)
        prefix *= size
    return None


def follow_split(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int
) -> tuple[int, int] | None:
    """``(j, outer)`` when a reshape splits channel dim ``dim`` into out dims j, j+1
    (e.g. width -> heads x head_dim); ``None`` otherwise."""
    before = math.prod(in_shape[:dim])
    prefix = 1
    for j in range(len(out_shape) - 1):
        if (
            prefix == before
            and out_shape[j] * out_shape[j + 1] == in_shape[dim]
            and out_shape[j] not in (1, in_shape[dim])
        ):
            return j, out_shape[j]
        prefix *= out_shape[j]
        if prefix > before:
            break
    return None


def _merged_range(in_shape: tuple[int, ...], lo: int, hi: int, dim: int) -> tuple[int, int] | None:
    """The input dims [start, stop) whose product spans elements lo..hi, if they
    contain ``dim`` and line up exactly with dimension boundaries."""
    prefixes = [math.prod(in_shape[:k]) for k in range(len(in_shape) + 1)]
    if lo not in prefixes or hi not in prefixes:
        return None
    start = prefixes.index(lo)
    stop = len(prefixes) - 1 - prefixes[::-1].index(hi)
    if start <= dim < stop and stop - start > 1:
        return start, stop
    return None


def follow_index(index: Any, ndim: int, dim: int, ids: np.ndarray) -> tuple[int, np.ndarray] | None:
    """Channel dim and ids after ``x[index]`` (ints, slices, None, Ellipsis only)."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        return None
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    src = out = 0
    for item in items:
        if item is Ellipsis:
            skip = ndim - consumed
            if src <= dim < src + skip:
                return out + dim - src, ids
            src, out = src + skip, out + skip
        elif item is None:
            out += 1
        elif src == dim:  # sizes in the code are constants: only a full slice survives pruning
            return (out, ids) if _is_full(item, ids.size) else None
        else:
            out += 0 if isinstance(item, int) else 1
            src += 1
    return out + dim - src, ids


def _is_full(item: Any, size: int) -> bool:
    return (
        isinstance(item, slice)
        and item.indices(size) == (0, size, 1)
        and (item.stop is None or item.stop >= size)
        and item.start in (None, 0)
    )


def follow_reduce(dims: Any, keepdim: bool, ndim: int, dim: int) -> int | None:
    """Channel dim after a reduction over ``dims``; ``None`` if the channels are reduced."""
    if dims is None:
        return None
    reduced = {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if dim in reduced:
        return None
    return dim if keepdim else dim - sum(1 for d in reduced if d < dim)
