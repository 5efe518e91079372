"""Mask arithmetic: pure functions from tensors to bool keep-masks (True = keep).

This is the hot path every sparsifier shares, so it is written to touch each weight a
few times at most and to bound its temporaries: scores are computed chunk by chunk, the
threshold of the k lowest scores comes from a linear-time selection, not a sort, and
no float mask is ever materialised. Any weight is scored as a matrix ``(out, in*k...)``,
so Linear and Conv1d/2d/3d weights are handled alike; a 1-D tensor is one row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prunekit import _cpu_masks

__all__ = [
    "as_matrix",
    "block_means",
    "lowest_k",
    "nearly_diagonal_mask",
    "nm_mask",
    "weight_norm_mask",
]

NormFn = Callable[[torch.Tensor], torch.Tensor]

# Elements scored at once; bounds the transient memory of a step to a few MiB per chunk.
_CHUNK_ELEMENTS = 1 << 21


def square(t: torch.Tensor) -> torch.Tensor:
    """The L2 score of the reference (``w * w``)."""
    return t * t


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as ``(rows, cols)``: 1-D as one row, N-D as ``(dim0, rest)``."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _row_chunks(rows: int, cols: int, block_rows: int) -> range:
    """Row offsets of chunks holding whole blocks and about ``_CHUNK_ELEMENTS`` elements."""
    per_chunk = max(1, _CHUNK_ELEMENTS // max(cols, 1) // block_rows) * block_rows
    return range(0, rows, per_chunk)


def _scores(chunk: torch.Tensor, norm_fn: NormFn) -> torch.Tensor:
    """Score a chunk in float32 at least, so fp16/bf16 weights rank like fp32 ones."""
    if chunk.dtype != torch.float64:
        chunk = chunk.float()
    return norm_fn(chunk).to(chunk.dtype)


def block_means(
    matrix: torch.Tensor, norm_fn: NormFn, block_shape: tuple[int, int]
) -> torch.Tensor:
    """Mean score of every ``block_shape`` block of ``matrix`` (partial edge blocks are
    averaged over their valid elements); shape ``(ceil(rows/bh), ceil(cols/bw))``."""
    bh, bw = block_shape
    rows, cols = matrix.shape
    if bh * bw == 1:
        return _scores(matrix, norm_fn)
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    out = torch.empty(-(-rows // bh), -(-cols // bw), dtype=dtype, device=matrix.device)
    chunks = _row_chunks(rows, cols, bh)
    for r0 in chunks:
        s = _scores(matrix[r0 : r0 + chunks.step], norm_fn)
        means = F.avg_pool2d(s[None, None], block_shape, block_shape, ceil_mode=True)[0, 0]
        out[r0 // bh : r0 // bh + means.shape[0]] = means
    return out


def _kth_smallest_(values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) entry of a 1-D tensor, reordering ``values`` in place.

    NumPy's in-place ``partition`` is a SIMD introselect, an order of magnitude faster than
    ``torch.kthvalue`` on the CPU and free of an extra copy; other devices use torch.
    """
    lowest = values.min()
    n_lowest = int((values == lowest).count_nonzero())  # e.g. entries already masked
    if k <= n_lowest:
        return float(lowest)
    if n_lowest * 8 > values.numel():  # selection slows down on long runs of equal values
        values, k = values[values != lowest], k - n_lowest
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        array = values.numpy()
        array.partition(k - 1)
        return float(array[k - 1])
    return float(torch.kthvalue(values, k).values)


def _select(values: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    """Bool mask of exactly the ``k`` lowest ``values`` given the k-th smallest value.

    Ties at the threshold go to the highest indices, as the reference's topk picks them;
    NaN ranks above every number.
    """
    flat = values.reshape(-1)
    nan = math.isnan(threshold)
    chosen = ~flat.isnan() if nan else flat < threshold
    missing = k - int(chosen.count_nonzero())
    if missing > 0:
        ties = flat.isnan() if nan else flat == threshold
        if int(ties.count_nonzero()) == missing:
            chosen |= ties  # e.g. blocks pruned at an earlier step, all at score 0
        else:
            chosen[ties.nonzero().squeeze(1)[-missing:]] = True
    return chosen.view(values.shape)


def lowest_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of ``values``) marking exactly its ``k`` lowest entries."""
    n = values.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    values = values.detach()
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        array = values.contiguous().numpy()
        return torch.from_numpy(_cpu_masks.elementwise_lowest_k(array, k, None))
    threshold = _kth_smallest_(values.flatten().clone(), k)
    return _select(values, k, threshold)


def _blocks_to_prune(n_blocks: int, sparsity_level: float, clamp_blocks: bool) -> int:
    """``round(sl * n_blocks)``; with ``clamp_blocks``, never all of them unless
    ``sparsity_level >= 1``."""
    k = round(sparsity_level * n_blocks)
    if sparsity_level >= 1 or (not clamp_blocks and k >= n_blocks):
        return n_blocks
    return max(0, min(n_blocks - 1, k))


def _pruned_blocks(
    matrix: torch.Tensor,
    norm_fn: NormFn,
    block_shape: tuple[int, int],
    sparsity_level: float,
    clamp_blocks: bool = True,
) -> torch.Tensor:
    """Tensor level: which blocks are chosen for pruning (see ``_blocks_to_prune``)."""
    grid = (-(-matrix.shape[0] // block_shape[0]), -(-matrix.shape[1] // block_shape[1]))
    n_blocks = grid[0] * grid[1]
    k = _blocks_to_prune(n_blocks, sparsity_level, clamp_blocks)
    if k in (0, n_blocks):
        return torch.full(grid, k > 0, dtype=torch.bool, device=matrix.device)
    means = block_means(matrix, norm_fn, block_shape)
    shares_weight = means.untyped_storage().data_ptr() == matrix.untyped_storage().data_ptr()
    if block_shape[0] * block_shape[1] == 1 and not shares_weight:
        # the scores are the weight's own size: reorder them in place, then score again
        threshold = _kth_smallest_(means.reshape(-1), k)
        del means  # free the reordered copy before scoring again
        means = block_means(matrix, norm_fn, block_shape)
    else:
        threshold = _kth_smallest_(means.flatten().clone(), k)
    return _select(means, k, threshold)


def _fast_keep(
    matrix: torch.Tensor,
    norm_fn: NormFn,
    block_shape: tuple[int, int],
    zeros: int,
    sparsity_level: float,
    clamp_blocks: bool,
) -> torch.Tensor | None:
    """``weight_norm_mask`` through the NumPy kernels (same result), or None where they
    do not apply: another device, dtype or norm, or a width not a multiple of the block."""
    norm = _cpu_masks.fast_norm(matrix, norm_fn, square)
    bh, bw = block_shape
    rows, cols = matrix.shape
    if norm is None or rows % bh or cols % bw:
        return None
    if zeros < bh * bw and (bh != 1 or bw > _NETWORK_MAX_BLOCK):
        return None
    n_blocks = (rows // bh) * (cols // bw)
    k = _blocks_to_prune(n_blocks, sparsity_level, clamp_blocks)
    array = matrix.numpy()
    if zeros == bh * bw:
        chosen = _cpu_masks.lowest_blocks(array, norm, block_shape, k)
        return torch.from_numpy(_cpu_masks.keep_outside(chosen, block_shape))
    network = _sorting_network(1 << (bw - 1).bit_length())
    keep = _cpu_masks.lowest_in_row_blocks(
        array,
        norm,
        bw,
        zeros,
        None if k == n_blocks else _cpu_masks.lowest_blocks(array, norm, block_shape, k),
        network,
        lambda blocks: _lowest_by_network(blocks, zeros, False),
    )
    return torch.from_numpy(keep)


def _expand_blocks(
    blocks: torch.Tensor, block_shape: tuple[int, int], shape: torch.Size
) -> torch.Tensor:
    """Repeat a per-block bool map to element resolution and crop it to ``shape``."""
    bh, bw = block_shape
    nbr, nbc = blocks.shape
    full = blocks[:, None, :, None].expand(nbr, bh, nbc, bw).reshape(nbr * bh, nbc * bw)
    return full[: shape[0], : shape[1]]


def _lowest_in_blocks(
    chunk: torch.Tensor,
    norm_fn: NormFn,
    block_shape: tuple[int, int],
    zeros_per_block: int,
    in_block_ties_first: bool = False,
) -> torch.Tensor:
    """Block level, for one chunk of block rows: the ``zeros_per_block`` lowest elements of
    every block (elements of partial edge blocks that lie outside the matrix rank last;
    ``in_block_ties_first`` breaks ties towards lower positions, as a stable sort does)."""
    bh, bw = block_shape
    rows, cols = chunk.shape
    nbr, nbc = -(-rows // bh), -(-cols // bw)
    scores = _scores(chunk, norm_fn)
    if (nbr * bh, nbc * bw) != (rows, cols):
        scores = F.pad(scores, (0, nbc * bw - cols, 0, nbr * bh - rows), value=math.nan)
    blocks = scores.view(nbr, bh, nbc, bw).permute(0, 2, 1, 3).reshape(nbr, nbc, bh * bw)
    if bh * bw <= _NETWORK_MAX_BLOCK:
        lowest = _lowest_by_network(blocks, zeros_per_block, in_block_ties_first)
    else:
        if in_block_ties_first:
            idx = blocks.sort(dim=-1, stable=True).indices[..., :zeros_per_block]
        else:
            idx = blocks.topk(zeros_per_block, dim=-1, largest=False).indices
        lowest = torch.zeros(blocks.shape, dtype=torch.bool, device=chunk.device)
        lowest.scatter_(-1, idx, True)
    return lowest.view(nbr, nbc, bh, bw).permute(0, 2, 1, 3).reshape(nbr * bh, nbc * bw)


# Blocks up to this size select their lowest elements with a sorting network over the
# block's columns (element-wise min/max), several times faster than topk + scatter.
_NETWORK_MAX_BLOCK = 16


def _sorting_network(n: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs of Batcher's odd-even merge sort for ``n`` (a power of 2)."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _lowest_by_network(blocks: torch.Tensor, zeros: int, ties_first: bool) -> torch.Tensor:
    """Bool mask of the ``zeros`` lowest entries along the last (small) dim of ``blocks``.

    The ``zeros``-th smallest value comes from a sorting network; among entries tied with
    it, the highest positions are taken first (as topk does) or the lowest with
    ``ties_first`` (as a stable sort does). NaN ranks above every number.
    """
    size = blocks.shape[-1]
    if zeros <= 0:
        return torch.zeros(blocks.shape, dtype=torch.bool, device=blocks.device)
    inf = torch.tensor(math.inf, dtype=blocks.dtype, device=blocks.device)
    cols = [torch.where(c.isnan(), inf, c) for c in blocks.unbind(-1)]
    ordered = cols + [inf.expand_as(cols[0])] * ((1 << (size - 1).bit_length()) - size)
    for a, b in _sorting_network(len(ordered)):
        ordered[a], ordered[b] = (
            torch.minimum(ordered[a], ordered[b]),
            torch.maximum(ordered[a], ordered[b]),
        )
    threshold = ordered[zeros - 1]
    less = [c < threshold for c in cols]
    need = zeros - torch.stack(less).sum(0, dtype=torch.int16)
    chosen = list(less)
    for i in range(size) if ties_first else reversed(range(size)):
        take = (cols[i] == threshold) & (need > 0)
        chosen[i] = less[i] | take
        need -= take.to(torch.int16)
    return torch.stack(chosen, dim=-1)


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a sharded ``DTensor`` (an all-gather every rank joins, so
    all ranks score the same values and get the same mask); other tensors as they are."""
    full_tensor = getattr(weight, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else weight


def weight_norm_mask(
    weight: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm_fn: NormFn = square,
    *,
    clamp_blocks: bool = True,
    in_block_ties_first: bool = False,
) -> torch.Tensor:
    """Keep-mask of ``WeightNormSparsifier`` for ``weight`` (any rank, scored as a matrix).

    The ``round(sparsity_level * n_blocks)`` blocks of lowest mean score are chosen; in
    each chosen block the ``zeros_per_block`` lowest elements are dropped (all of them
    when it equals the block size). N:M sparsity is ``sparsity_level=1``,
    ``sparse_block_shape=(1, M)``, ``zeros_per_block=M-N``. ``clamp_blocks=False`` lets
    a level below 1 round up to every block (``DataNormSparsifier``); by default at
    least one block survives, as in the reference's ``WeightNormSparsifier``.
    ``in_block_ties_first`` drops the first of equal elements inside a block (a stable
    sort, as the reference's ``DataNormSparsifier``) instead of the last (its ``topk``).

    >>> m = weight_norm_mask(torch.randn(8, 8), 1.0, (1, 4), 2)
    >>> int(m.view(8, 2, 4).sum(-1).min())
    2
    """
    bh, bw = sparse_block_shape
    block_size = bh * bw
    zeros = block_size if zeros_per_block is None else zeros_per_block
    weight = _dense(weight)
    if sparsity_level <= 0 or zeros == 0 or weight.numel() == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    if sparsity_level >= 1 and zeros == block_size:
        return torch.zeros_like(weight, dtype=torch.bool)
    matrix = as_matrix(weight.detach())
    if not in_block_ties_first:
        fast = _fast_keep(matrix, norm_fn, (bh, bw), zeros, sparsity_level, clamp_blocks)
        if fast is not None:
            return fast.view(weight.shape)
    pruned = _pruned_blocks(matrix, norm_fn, (bh, bw), sparsity_level, clamp_blocks)
    if zeros == block_size:
        return ~_expand_blocks(pruned, (bh, bw), matrix.shape).reshape(weight.shape)
    keep = torch.empty(matrix.shape, dtype=torch.bool, device=weight.device)
    rows, cols = matrix.shape
    chunks = _row_chunks(rows, cols, bh)
    for r0 in chunks:
        chunk = matrix[r0 : r0 + chunks.step]
        lowest = _lowest_in_blocks(chunk, norm_fn, (bh, bw), zeros, in_block_ties_first)
        chosen = _expand_blocks(pruned[r0 // bh : (r0 + chunks.step) // bh], (bh, bw), lowest.shape)
        keep[r0 : r0 + chunks.step] = ~(lowest & chosen)[: chunk.shape[0], :cols]
    return keep.view(weight.shape)


def nm_mask(weight: torch.Tensor, n: int, m: int, norm_fn: NormFn = torch.abs) -> torch.Tensor:
    """Keep-mask with at most ``n`` non-zeros in every ``m`` consecutive elements of a row."""
    return weight_norm_mask(weight, 1.0, (1, m), m - n, norm_fn)


def nearly_diagonal_mask(
    shape: tuple[int, int], nearliness: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Keep-mask of the band ``|row - col| <= nearliness // 2`` (all False if ``<= 0``)."""
    rows, cols = shape
    if nearliness <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    return (r - c).abs() <= nearliness // 2
