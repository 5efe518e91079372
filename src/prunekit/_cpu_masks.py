"""NumPy fast paths of the mask hot path, for contiguous float32/float64 CPU tensors.

A pruning step on a large layer is a handful of passes over its weights, so each pass
has to run at memory speed. NumPy's kernels do (torch's CPU comparisons, bool fills and
selection are several times slower); the work goes in chunks of cache size, spread over
``torch.get_num_threads()`` threads (NumPy releases the GIL inside its kernels).
Results are bit-identical to the torch code in ``masks.py``, which stays the path for
every other device, dtype or norm: the same scores (``w*w`` or ``|w|``; block means
summed in ``avg_pool2d``'s order), the same k lowest entries, ties at the threshold
going to the highest indices, NaN ranking above every number.

The k-th smallest score comes from a sample (Floyd and Rivest's selection): bounds
around the k-th value are read off a sorted random sample, one pass counts the scores
below the lower bound and keeps those between the bounds, and only those few are
partitioned. Should the bounds miss (vanishingly unlikely), the exact partition of all
scores is used instead, so the result never depends on the sample.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "copy_mask_",
    "elementwise_lowest_k",
    "fast_norm",
    "keep_outside",
    "lowest_blocks",
    "lowest_in_row_blocks",
    "zero_masked_",
]

# Elements handled per task: fits in the L2 cache with its temporaries.
CHUNK = 1 << 18
# Inputs below this size are partitioned whole; larger ones are sampled this many times.
EXACT_BELOW = 1 << 17
SAMPLE = 1 << 16

Norm = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (values, out) -> out
Scores = Callable[[int, int], np.ndarray]  # flat [start, stop) -> their scores
T = TypeVar("T")


def _square(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.multiply(x, x, out=out)


def _abs(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.absolute(x, out=out)


def fast_norm(t: torch.Tensor, norm_fn: Callable, square: Callable) -> Norm | None:
    """The NumPy twin of ``norm_fn`` when ``t`` can take the fast path, else None."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    if not t.is_contiguous() or t.requires_grad:
        return None
    if norm_fn is square:
        return _square
    return _abs if norm_fn is torch.abs else None


_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _parallel(fn: Callable[[int, int], T], n: int, step: int = CHUNK) -> list[T]:
    """``fn(start, stop)`` over ``[0, n)`` in steps, results in order; each of torch's
    threads takes one run of consecutive steps. The pool is remade after a fork or a
    change of ``torch.set_num_threads``."""
    global _pool
    starts = range(0, n, step)
    workers = min(torch.get_num_threads(), len(starts))

    def run(share: range) -> list[T]:
        return [fn(a, min(a + step, n)) for a in share]

    if workers <= 1:
        return run(starts)
    if _pool is None or _pool[:2] != (os.getpid(), workers):
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=False)  # a new thread count: the old threads go
        _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, "prunekit-masks"))
    per = -(-len(starts) // workers)
    shares = [starts[i : i + per] for i in range(0, len(starts), per)]
    return [r for results in _pool[2].map(run, shares) for r in results]


def _scores_of(flat: np.ndarray, norm: Norm | None) -> Scores:
    if norm is None:
        return lambda a, b: flat[a:b]
    return lambda a, b: norm(flat[a:b], np.empty(b - a, dtype=flat.dtype))


def _nan_aware_less(s: np.ndarray, threshold: float, out: np.ndarray) -> np.ndarray:
    if math.isnan(threshold):
        return np.logical_not(np.isnan(s, out=out), out=out)
    return np.less(s, threshold, out=out)


def _nan_aware_equal(s: np.ndarray, threshold: float) -> np.ndarray:
    return np.isnan(s) if math.isnan(threshold) else s == threshold


def _sample_bounds(sample: np.ndarray, k: int, n: int) -> tuple[float, float] | None:
    """Scores bracketing the k-th smallest with overwhelming probability (5 sigma of the
    sample's rank spread, plus a margin); None if the bracket would be NaN."""
    sample.sort()
    m = sample.size
    q = k / n
    spread = 5.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_i, hi_i = math.floor(q * m - spread), math.ceil(q * m + spread)
    lo = float(sample[lo_i]) if lo_i >= 0 else -math.inf
    hi = float(sample[hi_i]) if hi_i < m else math.inf
    if math.isnan(lo):
        return None
    return lo, (math.inf if math.isnan(hi) else hi)


def _kth(values: np.ndarray, rank: int) -> float:
    """The ``rank``-th smallest (1-based) of ``values``, reordering them. Runs of the
    lowest value (pruned entries, all scoring 0) are skipped: introselect crawls on them."""
    lowest = values.min()
    n_lowest = int(np.count_nonzero(values == lowest))
    if rank <= n_lowest:
        return float(lowest)
    if n_lowest * 8 > values.size:
        values, rank = values[values != lowest], rank - n_lowest
    return float(np.partition(values, rank - 1)[rank - 1])


def _counted(values: np.ndarray, threshold: float, below: int) -> tuple[float, int, int]:
    """(threshold, scores below it, scores equal to it) given ``below`` plus ``values``."""
    scratch = np.empty(values.size, dtype=bool)
    less = below + int(np.count_nonzero(_nan_aware_less(values, threshold, scratch)))
    return threshold, less, int(np.count_nonzero(_nan_aware_equal(values, threshold)))


def _bracket(scores: Scores, lo: float, hi: float) -> Callable[[int, int], tuple]:
    """Per chunk: (scores below lo, scores equal to lo, scores in (lo, hi])."""

    def count(a: int, b: int) -> tuple[int, int, np.ndarray]:
        s = scores(a, b)
        below = s < lo
        at_or_below = s <= lo
        n_below = int(np.count_nonzero(below))
        n_at = int(np.count_nonzero(at_or_below)) - n_below
        within = np.greater(s <= hi, at_or_below, out=below)
        return n_below, n_at, s[within]

    return count


def _threshold(
    n: int, k: int, scores: Scores, sample: Callable[[np.ndarray], np.ndarray]
) -> tuple[float, int, int]:
    """(k-th smallest score, number of scores below it, number equal to it)."""
    if n >= EXACT_BELOW:
        index = np.random.default_rng(n * 1_000_003 + k).integers(0, n, SAMPLE)
        bounds = _sample_bounds(sample(index), k, n)
        if bounds is not None:
            lo, hi = bounds
            parts = _parallel(_bracket(scores, lo, hi), n)
            below = sum(p[0] for p in parts)
            at_lo = sum(p[1] for p in parts)
            rank = k - below
            if 1 <= rank <= at_lo:  # e.g. the zeros of entries pruned before
                return lo, below, at_lo
            near = np.concatenate([p[2] for p in parts])
            rank -= at_lo
            if 1 <= rank <= near.size:
                return _counted(near, _kth(near.copy(), rank), below + at_lo)
    everything = np.concatenate(_parallel(lambda a, b: scores(a, b).copy(), n))
    return _counted(everything, _kth(everything.copy(), k), 0)


def _lowest_k_into(
    out: np.ndarray, k: int, scores: Scores, sample: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Set the flat bool ``out`` True at exactly the ``k`` (``0 < k < out.size``) lowest
    scores; ties at the threshold go to the highest indices."""
    threshold, n_less, n_equal = _threshold(out.size, k, scores, sample)
    missing = k - n_less
    ties_all_chosen = n_equal == missing

    def mark(a: int, b: int) -> np.ndarray | None:
        s, part = scores(a, b), out[a:b]
        if ties_all_chosen and not math.isnan(threshold):
            np.less_equal(s, threshold, out=part)
            return None
        _nan_aware_less(s, threshold, part)
        if ties_all_chosen:
            part |= np.isnan(s)
            return None
        return np.flatnonzero(_nan_aware_equal(s, threshold)) + a

    tied = [t for t in _parallel(mark, out.size) if t is not None]
    if tied:
        out[np.concatenate(tied)[-missing:]] = True
    return out


def elementwise_lowest_k(values: np.ndarray, k: int, norm: Norm | None) -> np.ndarray:
    """Bool array (shape of ``values``): the ``k`` lowest of ``norm(values)`` (or of the
    values themselves)."""
    flat = values.reshape(-1)
    out = np.empty(flat.size, dtype=bool)

    def sample(index: np.ndarray) -> np.ndarray:
        picked = flat[index]
        return picked if norm is None else norm(picked, picked)

    return _lowest_k_into(out, k, _scores_of(flat, norm), sample).reshape(values.shape)


def _row_step(cols: int, block_rows: int) -> int:
    """Rows per task: whole blocks, about ``CHUNK`` elements."""
    return max(1, CHUNK // max(cols, 1) // block_rows) * block_rows


def lowest_blocks(
    matrix: np.ndarray, norm: Norm, block_shape: tuple[int, int], k: int
) -> np.ndarray:
    """Bool grid ``(rows/bh, cols/bw)`` marking the ``k`` blocks of lowest mean score (the
    shape must be a multiple of the block: ``avg_pool2d``'s edge rule is not repeated)."""
    bh, bw = block_shape
    rows, cols = matrix.shape
    grid = (rows // bh, cols // bw)
    if k <= 0 or k >= grid[0] * grid[1]:
        return np.full(grid, k > 0)
    if bh * bw == 1:
        return elementwise_lowest_k(matrix, k, norm)
    means = np.empty(grid, dtype=matrix.dtype)

    def average(r0: int, r1: int) -> None:
        part = matrix[r0:r1]
        s = norm(part, np.empty(part.shape, dtype=part.dtype))
        blocks = s.reshape(part.shape[0] // bh, bh, grid[1], bw)
        total = means[r0 // bh : r1 // bh]
        np.copyto(total, blocks[:, 0, :, 0])
        for i in range(bh):  # summed in avg_pool2d's order, so means are bit-identical
            for j in range(bw):
                if i or j:
                    total += blocks[:, i, :, j]
        total /= bh * bw

    _parallel(average, rows, _row_step(cols, bh))
    return elementwise_lowest_k(means, k, None)


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def keep_outside(chosen: np.ndarray, block_shape: tuple[int, int]) -> np.ndarray:
    """Element keep-mask that drops every element of the chosen blocks."""
    bh, bw = block_shape
    nbr, nbc = chosen.shape
    kept = np.logical_not(chosen, out=chosen)
    if bh * bw == 1:
        return kept
    keep = np.empty((nbr, bh, nbc * bw), dtype=bool)
    if bw in _WORDS:  # a block row of bw bools is one machine word: 0 or 0x0101...
        word = _WORDS[bw]
        ones = word(int.from_bytes(b"\x01" * bw, "little"))
        np.multiply(kept[:, None, :], ones, out=keep.view(word), casting="unsafe")
    else:
        np.copyto(keep.reshape(nbr, bh, nbc, bw), kept[:, None, :, None])
    return keep.reshape(nbr * bh, nbc * bw)


def _selection_network(rank: int, network: list[tuple[int, int]]) -> list[tuple]:
    """The compare-exchanges of ``network`` that its ``rank``-th output needs, each with
    which of its two outputs (min, max) is used later."""
    needed = {rank}
    steps: list[tuple] = []
    for a, b in reversed(network):
        want_min, want_max = a in needed, b in needed
        if want_min or want_max:
            steps.append((a, b, want_min, want_max))
            needed |= {a, b}
    return steps[::-1]


def lowest_in_row_blocks(
    matrix: np.ndarray,
    norm: Norm,
    width: int,
    zeros: int,
    chosen_blocks: np.ndarray | None,
    network: list[tuple[int, int]],
    exact: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """Keep-mask dropping the ``zeros`` lowest elements of every ``(1, width)`` block
    (only of the blocks marked in ``chosen_blocks``, if given); ``cols % width == 0``.

    The ``zeros``-th smallest of each block comes from the part of the sorting
    ``network`` (over ``width`` rounded up to a power of 2) that it needs; a block where
    more than ``zeros`` elements reach it (ties, NaN) is redone by ``exact`` (the torch
    selection, given a ``(blocks, width)`` score tensor, returning its lowest elements).
    """
    rows, cols = matrix.shape
    steps = _selection_network(zeros - 1, network)
    padding = [np.full(1, np.inf, dtype=matrix.dtype)] * ((1 << (width - 1).bit_length()) - width)
    keep = np.empty((rows, cols), dtype=bool)

    def select(r0: int, r1: int) -> None:
        part = matrix[r0:r1]
        s = norm(part, np.empty(part.shape, dtype=part.dtype)).reshape(-1, width)
        wires: list = [s[:, i] for i in range(width)] + padding
        for a, b, want_min, want_max in steps:
            low = np.minimum(wires[a], wires[b]) if want_min else None
            if want_max:
                wires[b] = np.maximum(wires[a], wires[b])
            wires[a] = low
        out = keep[r0:r1].reshape(-1, width)
        np.greater(s.reshape(-1), np.repeat(wires[zeros - 1], width), out=out.reshape(-1))
        if int(np.count_nonzero(out)) != out.size - zeros * out.shape[0]:
            redo = np.flatnonzero(np.count_nonzero(out, axis=1) != width - zeros)
            out[redo] = ~exact(torch.from_numpy(s[redo])).numpy()
        if chosen_blocks is not None:
            out |= ~chosen_blocks[r0:r1].reshape(-1, 1)

    _parallel(select, rows, _row_step(cols, 1))
    return keep


_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def zero_masked_(original: torch.Tensor, keep: torch.Tensor) -> bool:
    """Zero ``original`` where ``keep`` is False, in place, with NaN and Inf becoming 0 as
    with ``masked_fill_``; False (nothing done) when the tensors need the torch path.

    The weight's bit pattern is multiplied by 0 or 1 as an integer: exact for every value,
    and several times faster than torch's mixed-dtype fill on the CPU.
    """
    if (
        original.device.type != "cpu"
        or keep.device.type != "cpu"
        or original.dtype not in _BITS
        or not (original.is_contiguous() and keep.is_contiguous())
    ):
        return False
    words = original.detach().view(_BITS[original.dtype]).numpy().reshape(-1)
    flags = keep.numpy().reshape(-1)

    def zero(a: int, b: int) -> None:
        np.multiply(words[a:b], flags[a:b], out=words[a:b])

    _parallel(zero, words.size, 4 * CHUNK)
    torch.autograd.graph.increment_version(original)
    return True


def copy_mask_(mask: torch.Tensor, keep: torch.Tensor) -> None:
    """``mask.copy_(keep)``, through NumPy for contiguous bool CPU tensors (torch's copy
    of a large bool tensor is several times slower)."""
    if (
        mask.dtype == keep.dtype == torch.bool
        and mask.shape == keep.shape
        and mask.device.type == keep.device.type == "cpu"
        and mask.is_contiguous()
        and keep.is_contiguous()
    ):
        np.copyto(mask.numpy(), keep.numpy())
        torch.autograd.graph.increment_version(mask)
    else:
        mask.copy_(keep)
