"""Pure tensor functions of one-shot pruning: Wanda scores, N:M and per-row selection,
the SparseGPT layer-wise reconstruction (OBS over column blocks), its exact masked
least-squares refinement, and ADMM pruning.

No modules and no state: every function maps tensors to tensors, so each is tested
alone. Weights are ``(out, in)`` matrices acting on the last dimension of the input;
masks are bool keep-masks (True = keep), as everywhere in prunekit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from prunekit.errors import ConfigError
from prunekit.masks import lowest_k, nm_mask

__all__ = [
    "admm_prune",
    "damped_cholesky",
    "damped_inverse_cholesky",
    "masked_least_squares",
    "prune_count",
    "row_keep_mask",
    "sparsegpt_prune",
    "sparsegpt_reconstruct",
    "wanda_keep_mask",
    "wanda_scores",
]

# Extra damping tried, as multiples of the mean Hessian diagonal, when Cholesky fails.
_DAMP_RETRIES = (1e-2, 1e-1, 1.0, 10.0)

# ADMM's penalty: its start (unit-diagonal Hessian) and growth per iteration.
_ADMM_RHO, _ADMM_GROWTH = 0.3, 1.05


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a layer at ``sparsity`` drops: exactly ``round``."""
    return max(0, min(numel, round(sparsity * numel)))


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (Sun et al. 2023), from the summed squares of each input
    feature over all calibration tokens; float32 at least so low precision ranks alike."""
    w = weight.detach()
    w = w if w.dtype == torch.float64 else w.float()
    return w.abs() * input_sq_norms.to(w).clamp_min(0).sqrt()


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the lowest scores of every row, ``prune_count(numel, sparsity)`` in all.

    When the count does not split evenly, the first rows drop one more, so the layer
    reaches its sparsity exactly while every row is compared only with itself.
    """
    rows = scores.shape[0]
    base, extra = divmod(prune_count(scores.numel(), sparsity), rows)
    k = base + (extra > 0)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return keep
    idx = scores.topk(k, dim=1, largest=False, sorted=True).indices
    drop = torch.ones(rows, k, dtype=torch.bool, device=scores.device)
    if extra:
        drop[extra:, -1] = False
    return keep.scatter_(1, idx, ~drop)


def wanda_keep_mask(
    weight: torch.Tensor,
    input_sq_norms: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Keep-mask of Wanda: per output row (unstructured) or per group of M inputs (N:M)."""
    scores = wanda_scores(weight, input_sq_norms)
    if nm is not None:  # |scores| is scores: torch.abs takes nm_mask's NumPy path
        return nm_mask(scores, nm[0], nm[1], torch.abs)
    return row_keep_mask(scores, sparsity)


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` with ``λ = percdamp * mean(diag H)``.

    Inputs that never fired (zero diagonal) get a unit diagonal, so a singular or even
    all-zero Hessian is handled; if the factorisation still fails, damping grows tenfold
    a few times before giving up with an error (never NaN weights).
    """
    return _damped_factor(hessian, percdamp, torch.float32, _inverse_upper_factor)


def damped_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H + λI`` itself (float64, for
    ``torch.cholesky_solve(..., upper=True)``), damped as in ``damped_inverse_cholesky``."""

    def upper(h: torch.Tensor) -> torch.Tensor | None:
        return h if _upper_cholesky_in_place(h) else None

    return _damped_factor(hessian, percdamp, torch.float64, upper)


def _damped_factor(
    hessian: torch.Tensor,
    percdamp: float,
    dtype: torch.dtype,
    factor: Callable[[torch.Tensor], torch.Tensor | None],
) -> torch.Tensor:
    """``factor(H + λI)`` in ``dtype`` for the first damping, from ``percdamp`` up, at
    which it works (None from ``factor``: not positive definite). ``factor`` may
    overwrite its argument: one working matrix besides ``hessian``, refilled per try."""
    hessian = hessian.detach()
    if not _all_finite(hessian):
        raise ConfigError(
            "SparseGPT: the Hessian holds NaN or inf; the calibration inputs "
            "of this layer are not finite"
        )
    dead = hessian.diagonal() <= 0
    undamped = hessian.diagonal().to(dtype).masked_fill(dead, 1.0)
    scale = float(undamped.mean())
    h = torch.empty_like(hessian, dtype=dtype)
    for damp in (percdamp, *(d for d in _DAMP_RETRIES if d > percdamp)):
        h.copy_(hessian)
        h.diagonal().copy_(undamped).add_(damp * scale)
        result = factor(h)
        if result is not None:
            return result
    raise ConfigError(
        f"SparseGPT: the damped Hessian ({h.shape[0]} inputs) is not positive "
        f"definite even with damping {_DAMP_RETRIES[-1]}; check the calibration data"
    )


def _upper_cholesky_in_place(h: torch.Tensor) -> bool:
    """Overwrite the symmetric, row-major ``h`` by its upper Cholesky factor ``U``
    (``UᵀU = H``); False if ``h`` is not positive definite.

    LAPACK works on column-major memory, and a row-major ``out=`` costs a temporary
    copy of the matrix. ``h.mT`` is the same symmetric matrix stored column-major, and
    its lower factor ``L = Uᵀ``, written there, is ``U`` in ``h``'s own layout."""
    info = torch.empty((), dtype=torch.int32, device=h.device)
    column_major = h.mT
    torch.linalg.cholesky_ex(column_major, out=(column_major, info))
    return int(info) == 0


def _inverse_in_place(h: torch.Tensor) -> bool:
    """Overwrite the symmetric, row-major ``h`` by ``H⁻¹`` (its Cholesky factor, then the
    inverse from that, both in ``h``'s own memory); False if ``h`` is not positive
    definite."""
    if not _upper_cholesky_in_place(h):
        return False
    column_major = h.mT  # holds L = Uᵀ, lower; its inverse product is H⁻¹, symmetric
    torch.cholesky_inverse(column_major, out=column_major)
    return True


def _inverse_upper_factor(h: torch.Tensor) -> torch.Tensor | None:
    """Upper ``U`` with ``UᵀU = H⁻¹``, computed in ``h`` itself (the inverse in place, then
    its upper Cholesky factor), without a copy: the layer's Hessians are the peak of
    SparseGPT's memory. None if ``H`` is not positive definite."""
    if not (_inverse_in_place(h) and _upper_cholesky_in_place(h)):
        return None
    return h if _all_finite(h) else None


def _all_finite(matrix: torch.Tensor, rows: int = 64) -> bool:
    """``torch.isfinite(matrix).all()``, a few rows at a time: the whole-matrix check
    allocates two temporaries the size of the matrix."""
    return all(bool(torch.isfinite(chunk).all()) for chunk in matrix.split(rows))


def _block_prune_mask(wt: torch.Tensor, d: torch.Tensor, count: int) -> torch.Tensor:
    """Unstructured: the ``count`` weights of a column block (given transposed, one
    input per row) with least OBS error ``w² / d²``, compared across the whole block."""
    pruned = torch.zeros_like(wt, dtype=torch.bool)
    if count > 0:
        scores = (wt.square() / d[:, None].square()).flatten()
        pruned.view(-1)[scores.topk(count, largest=False, sorted=False).indices] = True
    return pruned


def _nm_group_mask(wt: torch.Tensor, d: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """N:M: in one group of M inputs (rows of ``wt``), the M-N weights of every output
    with least OBS error, chosen once the earlier groups' errors have reached them."""
    scores = wt.square() / d[:, None].square()
    idx = scores.topk(nm[1] - nm[0], dim=0, largest=False).indices
    return torch.zeros_like(wt, dtype=torch.bool).scatter_(0, idx, True)


# Inputs updated one by one before a lazy matrix product inside a column block.
_CHUNK = 16


def _obs_block(
    wt: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor, nm: tuple[int, int] | None
) -> torch.Tensor:
    """OBS over one column block, in place: ``wt`` is the block transposed ``(inputs,
    outputs)`` so a column of ``W`` is a contiguous row. Each pruned weight's error is
    pushed onto the inputs after it, rank-1 within a chunk of a few inputs and by one
    matrix product onto the rest of the block. Returns the error terms (scaled by
    ``1/[H⁻¹]_ii``) that the caller spreads over the later blocks."""
    width = wt.shape[0]
    errors = torch.empty_like(wt)
    d = hinv.diagonal()
    step = _CHUNK if nm is None else nm[1] * max(1, _CHUNK // nm[1])
    for c0 in range(0, width, step):
        c1 = min(c0 + step, width)
        for i in range(c0, c1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                pruned[group] = _nm_group_mask(wt[group], d[group], nm)
            err = errors[i]
            torch.mul(wt[i], pruned[i], out=err).div_(d[i])
            wt[i:c1].addr_(hinv[i, i:c1], err, alpha=-1.0)
        wt[c1:].addmm_(hinv[c0:c1, c1:].T, errors[c0:c1], alpha=-1.0)
    return errors


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune ``weight`` and update the kept weights
    to minimise ``||WX - ŴX||²`` for the inputs summarised by ``hessian = Σ x xᵀ``.

    Returns ``(new_weight, keep_mask)``; see ``sparsegpt_reconstruct``.
    """
    upper = damped_inverse_cholesky(hessian, percdamp)
    return sparsegpt_reconstruct(weight, upper, sparsity, nm, blocksize)


def sparsegpt_reconstruct(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SparseGPT solver given ``U = damped_inverse_cholesky(H)``.

    Columns are processed in blocks of ``blocksize``; within a block every pruned
    weight's error is spread over the columns to its right through the inverse Hessian
    (OBS), and the whole block's error reaches the later blocks in one lazy matrix
    product. The new weight is float32 and zero where the mask is False. Unstructured
    sparsity is exact per layer: each block drops its share of
    ``prune_count(numel, sparsity)``; with ``nm`` every group of M consecutive inputs of
    a row keeps N (M must divide the width; ``blocksize`` is rounded down to a multiple
    of M).
    """
    cols = weight.shape[1]
    if hinv_upper.shape != (cols, cols):
        raise ConfigError(
            f"SparseGPT: factor shape {tuple(hinv_upper.shape)} does not match "
            f"weight {tuple(weight.shape)}; expected ({cols}, {cols})"
        )
    if nm is not None and cols % nm[1]:
        raise ConfigError(
            f"SparseGPT: pattern {nm[0]}:{nm[1]} needs M to divide the input width, got {cols}"
        )
    if nm is not None:  # N:M groups must not straddle two blocks
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    wt = weight.detach().to(torch.float32).T.contiguous()  # (in, out): columns as rows
    total = prune_count(wt.numel(), sparsity)
    pruned = torch.zeros_like(wt, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        hinv = hinv_upper[start:end, start:end]
        if nm is None:
            count = round(total * end / cols) - round(total * start / cols)
            pruned[start:end] = _block_prune_mask(wt[start:end], hinv.diagonal(), count)
        errors = _obs_block(wt[start:end], hinv, pruned[start:end], nm)
        wt[end:].addmm_(hinv_upper[start:end, end:].T, errors, alpha=-1.0)
    wt.masked_fill_(pruned, 0.0)
    return wt.T.contiguous(), (~pruned).T.contiguous()


def masked_least_squares(
    weight: torch.Tensor,
    target: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    max_iters: int = 100,
    tol: float = 1e-4,
    in_place: bool = False,
) -> torch.Tensor:
    """The kept weights that minimise ``tr((Ŵ - T) H (Ŵ - T)ᵀ)`` exactly, with ``Ŵ`` zero
    where ``keep`` is False: what SparseGPT's OBS pass only approximates (it moves the
    weights to the right of each pruned one, never those to its left).

    Every row is its own problem ``H[S, S] ŵ_S = (H t)_S``; all rows are solved at once
    by conjugate gradients with a Jacobi preconditioner, warm-started at ``weight`` (the
    OBS solution), in float32, until every row's residual is below ``tol`` times its
    right-hand side or ``max_iters``. ``hessian`` must be positive definite (damped).
    The objective never rises: each CG step lowers it for every row.

    Four weight-sized float32 buffers (the matrix product and the preconditioned
    residual share one), updated in place, and a fifth for a moment at each dot
    product: they are the peak of an exact update. With ``in_place`` the iterate is
    ``weight`` itself (float32, the caller's to overwrite).
    """
    h = hessian.to(torch.float32)
    drop = ~keep
    w = weight if in_place else weight.to(torch.float32, copy=True)
    w.masked_fill_(drop, 0.0)
    residual = (target.to(torch.float32) @ h).masked_fill_(drop, 0.0)  # the right-hand side
    limit = tol * residual.norm(dim=1, keepdim=True)
    scratch = torch.mm(w, h).masked_fill_(drop, 0.0)
    residual.sub_(scratch)  # zero off the mask, and so is every update below
    inverse_diag = h.diagonal().clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
    direction = torch.mul(residual, inverse_diag, out=scratch).clone()
    rz = _row_dot(residual, direction)
    for _ in range(max_iters):
        if bool((residual.norm(dim=1, keepdim=True) <= limit).all()):
            break
        product = torch.mm(direction, h, out=scratch).masked_fill_(drop, 0.0)
        curvature = _row_dot(direction, product)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), 0.0)
        w.addcmul_(alpha, direction)
        residual.addcmul_(alpha, product, value=-1.0)
        z = torch.mul(residual, inverse_diag, out=scratch)  # the product is spent
        rz_next = _row_dot(residual, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), 0.0)
        direction.mul_(beta).add_(z)
        rz = rz_next
    return w


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row's dot product, summed as ``(a * b).sum`` sums: a batched ``bmm`` needs no
    temporary but sums in another order, and SparseGPT's exact update then moves."""
    return (a * b).sum(1, keepdim=True)


def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    percdamp: float = 0.01,
    iters: int = 60,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune by ADMM with gradual mask selection, then solve the kept weights exactly
    (after Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models").

    Minimises ``tr((Ŵ - W) H (Ŵ - W)ᵀ)`` over weights that are zero off the mask by
    alternating a ridge solve towards a masked copy (with ``rho`` growing 5% per
    iteration from 0.3) with the projection onto the mask. Inputs are scaled to unit
    ``diag H`` first, so weight magnitudes are Wanda scores and ``percdamp`` damps every
    input alike. In the first half of the ``iters`` iterations the mask is re-chosen
    every third one from the ADMM iterate, its sparsity rising on a cubic schedule to
    ``sparsity`` (unstructured: the lowest of the whole layer, exactly ``prune_count``;
    N:M: the M-N lowest of every group). Unlike SparseGPT's single left-to-right pass,
    a weight dropped early can come back.
    Returns ``(weight, keep)``, ``weight`` float32 and zero where ``keep`` is False.
    """
    if iters < 2:
        raise ConfigError(f"ADMM: iters must be at least 2, got {iters}")
    hessian = hessian.detach()
    if not _all_finite(hessian):
        raise ConfigError("ADMM: the Hessian holds NaN or inf; the calibration inputs of "
                          "this layer are not finite")
    scale = hessian.diagonal().to(torch.float32).clamp_min(0).sqrt()
    scale[scale == 0] = 1.0  # dead inputs: only the damping holds their weights
    original = weight.detach().to(torch.float32) * scale
    unit = _UnitHessian(hessian, scale, percdamp)
    z, drop = _admm_iterations(original, unit, sparsity, nm, iters)
    keep = drop.logical_not_()
    new = masked_least_squares(z, original, unit.ridge(0.0), keep, in_place=True)
    return new.div_(scale), keep


class _UnitHessian:
    """``Hₙ = D⁻¹ H D⁻¹ + percdamp I`` (``D`` the input scales) and the ridge steps
    through ``Hₙ + rho I``, all made in one float32 working matrix from the caller's
    ``H``: ADMM holds no other matrix of the layer's width. ``rho`` changes every
    iteration, so each step factorises afresh; one float64 eigendecomposition, reused,
    would take about ten float32 matrices' memory (the copy, the eigenvectors,
    LAPACK's workspace)."""

    def __init__(self, hessian: torch.Tensor, scale: torch.Tensor, percdamp: float) -> None:
        self.hessian, self.scale, self.percdamp = hessian, scale, percdamp
        self.work = torch.empty(hessian.shape, dtype=torch.float32, device=hessian.device)

    def ridge(self, rho: float) -> torch.Tensor:
        """``Hₙ + rho I`` in the working matrix."""
        torch.div(self.hessian, self.scale[:, None], out=self.work)
        self.work.div_(self.scale[None, :]).diagonal().add_(self.percdamp + rho)
        return self.work

    def ridge_step(
        self, original: torch.Tensor, residual: torch.Tensor, rho: float, spare: torch.Tensor
    ) -> torch.Tensor:
        """``original + rho · residual (Hₙ + rho I)⁻¹``, for ``rho > 0``, written in
        ``residual`` or in ``spare`` (the one returned; the other is spent).

        Both routes start from the Cholesky factor ``U``. A layer with fewer outputs
        than inputs (down_proj, k/v) solves ``residual`` against ``Uᵀ U`` in place, two
        triangular solves; the others invert the factor and multiply: more arithmetic,
        but one matrix product, which is faster there (576 x 576: 10 against 13 ms a
        step on one core)."""
        h = self.ridge(rho)
        if not _upper_cholesky_in_place(h):  # Hₙ is positive semi-definite and rho > 0
            raise ConfigError(f"ADMM: the Hessian plus {rho:.3g} I is not positive "
                              f"definite ({h.shape[0]} inputs); check the calibration data")
        if residual.shape[0] < residual.shape[1]:
            torch.linalg.solve_triangular(h, residual, upper=True, left=False, out=residual)
            torch.linalg.solve_triangular(h.mT, residual, upper=False, left=False,
                                          out=residual)
            return residual.mul_(rho).add_(original)
        torch.cholesky_inverse(h.mT, out=h.mT)
        return torch.addmm(original, residual, h, alpha=rho, out=spare)


def _admm_iterations(
    original: torch.Tensor,
    unit: _UnitHessian,
    sparsity: float,
    nm: tuple[int, int] | None,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final masked iterate of ADMM on ``‖(Ŵ - W) Hₙ^½‖²`` and the weights it drops.
    Three weight-sized buffers besides ``original`` (the iterate, the dual and the
    masked copy), updated in place: the ridge step ``w = (W Hₙ + rho (z - u)) (Hₙ + rho
    I)⁻¹`` is computed as ``W + rho (z - u - W) (Hₙ + rho I)⁻¹``, which needs no
    ``W Hₙ``."""
    updates = -(-(iters // 2) // 3)  # mask choices, every third of the first half

    def select(iterate: torch.Tensor, update: int) -> torch.Tensor:
        """The weights to drop, by ``|iterate|``, which it may overwrite."""
        if nm is not None:  # NumPy's |x| per group, no |x| copy
            return nm_mask(iterate, nm[0], nm[1], torch.abs).logical_not_()
        ramp = sparsity * (1.0 - (1.0 - update / updates) ** 3)
        return lowest_k(iterate.abs_(), prune_count(iterate.numel(), ramp))

    w, dual, z = original.clone(), torch.zeros_like(original), torch.empty_like(original)
    rho = _ADMM_RHO
    for it in range(iters):
        if it % 3 == 0 and it // 3 < updates:
            drop = select(torch.add(w, dual, out=z), it // 3 + 1)
        torch.add(w, dual, out=z).masked_fill_(drop, 0.0)
        dual.add_(w).sub_(z)
        if it == iters - 1:
            break
        torch.sub(z, dual, out=w).sub_(original)
        step = unit.ridge_step(original, w, rho, spare=z)
        w, z = step, (z if step is w else w)  # z is spent until the next iteration
        rho *= _ADMM_GROWTH
    return z, drop
