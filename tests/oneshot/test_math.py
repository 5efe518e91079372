"""The pure one-shot functions: Wanda scores, row / N:M selection, the SparseGPT and
ADMM solvers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import ConfigError
from prunekit.masks import lowest_k
from prunekit.sparsifier.oneshot_math import (
    admm_prune,
    damped_cholesky,
    damped_inverse_cholesky,
    masked_least_squares,
    prune_count,
    row_keep_mask,
    sparsegpt_prune,
    sparsegpt_reconstruct,
    wanda_keep_mask,
    wanda_scores,
)


def correlated(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated and of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) * torch.logspace(0, -2, width)[:, None]
    return torch.randn(tokens, width, generator=g) @ mix


def rel_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).norm() / (x @ w.T).norm())


def test_wanda_scores_are_weight_magnitude_times_input_norm():
    w = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    sq = torch.tensor([4.0, 9.0])
    assert torch.equal(wanda_scores(w, sq), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))


def test_row_keep_mask_compares_within_each_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    keep = row_keep_mask(scores, 0.5)
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_row_keep_mask_gives_the_remainder_to_the_first_rows():
    keep = row_keep_mask(torch.arange(12.0).view(3, 4), 5 / 12)  # 5 of 12: rows drop 2, 2, 1
    assert (~keep).sum(1).tolist() == [2, 2, 1]


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 17),
    sparsity=st.floats(0, 1),
    seed=st.integers(0, 1000),
)
def test_row_keep_mask_reaches_the_exact_count(rows, cols, sparsity, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    keep = row_keep_mask(scores, sparsity)
    assert int((~keep).sum()) == prune_count(rows * cols, sparsity)
    assert int((~keep).sum(1).max() - (~keep).sum(1).min()) <= 1


@settings(max_examples=20, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]),
    seed=st.integers(0, 99),
)
def test_wanda_nm_keeps_n_in_every_group_of_m(nm, seed):
    g = torch.Generator().manual_seed(seed)
    n, m = nm
    w = torch.randn(6, 4 * m, generator=g)
    keep = wanda_keep_mask(w, torch.rand(4 * m, generator=g), 0.5, nm)
    assert keep.view(6, 4, m).sum(-1).eq(n).all()


def test_damped_inverse_cholesky_factors_the_damped_inverse():
    x = correlated(64, 12).double()
    h = x.T @ x
    upper = damped_inverse_cholesky(h, 0.01).double()
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(12, dtype=h.dtype)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-3, atol=1e-6)
    assert torch.equal(upper, upper.triu()) and upper.is_contiguous()


@pytest.mark.parametrize("factor", ["inverse", "direct"])
def test_an_indefinite_hessian_is_damped_until_it_factors_and_left_as_it_was(factor):
    """Eigenvalues 4 and -2 (mean diagonal 1): damping 0.01, 0.1 and 1 fail, 10 works.
    Each try factors a fresh damped copy, since a failed in-place one leaves garbage."""
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    before = h.clone()
    damped = (h + 10.0 * torch.eye(2)).double()
    if factor == "inverse":
        upper = damped_inverse_cholesky(h, 0.01).double()
        torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))
    else:
        upper = damped_cholesky(h, 0.01)
        torch.testing.assert_close(upper.T @ upper, damped)
    assert torch.equal(upper, upper.triu())
    assert torch.equal(h, before)


@pytest.mark.parametrize(
    "hessian",
    [torch.zeros(8, 8), torch.ones(8, 8), torch.diag(torch.tensor([1.0] + [0.0] * 7))],
    ids=["zero", "rank-1", "dead-inputs"],
)
def test_singular_hessians_give_finite_weights(hessian):
    w = torch.randn(4, 8)
    new, keep = sparsegpt_prune(w, hessian, 0.5, blocksize=4)
    assert torch.isfinite(new).all()
    assert int((~keep).sum()) == 16
    assert torch.equal(new == 0, ~keep | (w == 0))


@pytest.mark.parametrize("where", [(0, 1), (79, 3)], ids=["first-rows", "last-rows"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hessians_are_refused(where, value):
    h = torch.eye(80)
    h[where] = value
    with pytest.raises(ConfigError, match="NaN or inf"):
        damped_inverse_cholesky(h, 0.01)


_PEAK_MEMORY = """
import torch
from pathlib import Path
from prunekit.sparsifier import oneshot_math as m
torch.set_num_threads(1)
def kib(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(key + ":"))
    return int(line.split()[1])
n = 1536
x = torch.randn(2 * n, n)
h = x.T @ x
h64 = h.double()
w = torch.randn(576, n)
keep = w.abs() > 0.7
damped = h + torch.eye(n) * float(h.diagonal().mean())
run = lambda: {call}
run()  # first use loads LAPACK's code pages
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
run()
print((kib("VmHWM") - before) * 1024)
"""


def peak_bytes(call: str) -> float:
    """Peak resident memory of ``call`` beyond its inputs: a 1536² float32 Hessian
    ``h`` (``h64`` in float64, ``damped`` with damping), a (576, 1536) weight ``w`` and
    its mask ``keep``. A fresh process with glibc mapping every tensor on its own, so
    freed memory is not reused unseen."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY.replace("{call}", call)],
                         env=env, capture_output=True, text=True, check=True)
    return float(run.stdout)


HESSIAN, WEIGHT = 1536 * 1536 * 4, 576 * 1536 * 4  # bytes of h and w in peak_bytes


needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize("call, matrix", [("m.damped_inverse_cholesky(h, 0.01)", HESSIAN),
                                          ("m.damped_cholesky(h64, 0.01)", 2 * HESSIAN)],
                         ids=["inverse", "direct"])
def test_the_factor_is_computed_in_one_matrix(call, matrix):
    """Factoring a 1536² Hessian takes one working matrix of its dtype. LAPACK writing
    into row-major memory, or a whole-matrix isfinite, would each add one or two more."""
    assert peak_bytes(call) < 1.3 * matrix


@needs_proc
@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["50%", "2:4"])
def test_admm_holds_one_working_matrix_and_a_few_weights(nm):
    """ADMM on a 1536² Hessian: one float32 working matrix for its ridge inverses and
    six or seven weight-sized buffers (3.4 Hessians here). Its float64 eigendecomposition
    needed 9.7 (matrix, eigenvectors, LAPACK's workspace)."""
    assert peak_bytes(f"m.admm_prune(w, h, 0.5, {nm}, iters=6)") < HESSIAN + 7 * WEIGHT


@needs_proc
def test_the_exact_update_holds_four_weights():
    """Conjugate gradients keep four weight-sized buffers and a fifth for a moment (the
    returned weight is one): 5.2 here. A float mask, a weight-sized preconditioner and
    separate buffers for the product and the preconditioned residual needed 10."""
    assert peak_bytes("m.masked_least_squares(w, w, damped, keep)") < 5.5 * WEIGHT


def naive_obs(w: torch.Tensor, h: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """Column-by-column OBS with an explicit inverse of the remaining columns' Hessian
    at every step: slow and obviously right."""
    w, h = w.double().clone(), h.double()
    cols = w.shape[1]
    n, m = nm
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i in range(cols):
        inv = torch.linalg.inv(h[i:, i:])
        if i % m == 0:
            d = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(i, i + m)])
            scores = w[:, i : i + m].square() / d
            idx = scores.topk(m - n, dim=1, largest=False).indices
            pruned[:, i : i + m].scatter_(1, idx, True)
        err = torch.where(pruned[:, i], w[:, i], 0.0) / inv[0, 0]
        w[:, i:] -= err[:, None] * inv[0][None, :]
    return w.masked_fill(pruned, 0.0)


def test_sparsegpt_matches_naive_obs_whatever_the_blocksize():
    x = correlated(256, 16).double()
    h = x.T @ x
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(16, dtype=h.dtype)
    w = torch.randn(5, 16, dtype=torch.float64)
    expected = naive_obs(w, damped, (2, 4))
    for blocksize in (4, 6, 8, 16):  # 6 is rounded down to 4
        got, keep = sparsegpt_prune(w, h, 0.5, nm=(2, 4), blocksize=blocksize, percdamp=0.01)
        torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)
        assert keep.view(5, 4, 4).sum(-1).eq(2).all()


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    sparsity=st.floats(0, 1),
    blocksize=st.integers(1, 16),
)
def test_sparsegpt_reaches_the_exact_sparsity(rows, cols, sparsity, blocksize):
    x = correlated(64, cols)
    new, keep = sparsegpt_prune(torch.randn(rows, cols), x.T @ x, sparsity, blocksize=blocksize)
    assert int((~keep).sum()) == prune_count(rows * cols, sparsity)
    assert torch.isfinite(new).all() and not new[~keep].any()


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    x = correlated(2048, 64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    for nm in (None, (2, 4)):
        sgpt, _ = sparsegpt_prune(w, x.T @ x, 0.5, nm=nm)
        wanda = w * wanda_keep_mask(w, x.square().sum(0), 0.5, nm)
        magnitude = w * wanda_keep_mask(w, torch.ones(64), 0.5, nm)
        errors = [rel_error(x, w, v) for v in (sgpt, wanda, magnitude)]
        assert errors[0] < errors[1] < errors[2], (nm, errors)


def test_sparsegpt_keeps_the_weights_at_sparsity_zero():
    w = torch.randn(4, 8)
    x = correlated(32, 8)
    new, keep = sparsegpt_prune(w, x.T @ x, 0.0)
    assert keep.all() and torch.equal(new, w)


def test_sparsegpt_checks_shapes_and_patterns():
    upper = torch.eye(8)
    with pytest.raises(ConfigError, match=r"factor shape \(8, 8\) does not match weight \(2, 6\)"):
        sparsegpt_reconstruct(torch.randn(2, 6), upper, 0.5)
    with pytest.raises(ConfigError, match="2:4 needs M to divide the input width, got 6"):
        sparsegpt_reconstruct(torch.randn(2, 6), torch.eye(6), 0.5, nm=(2, 4))


def test_block_selection_drops_the_lowest_obs_errors():
    # a column block prunes exactly its share, chosen by lowest w^2 / d^2
    w = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    _, keep = sparsegpt_prune(w, torch.eye(4), 0.5, blocksize=4)
    assert torch.equal(keep, ~lowest_k(w.square(), 2))


def damped(x: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """``XᵀX + λI`` with SparseGPT's damping, the Hessian its solutions are exact for."""
    u = damped_inverse_cholesky(x.T @ x, percdamp)
    return torch.cholesky_inverse(u.double(), upper=True)


def objective(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    delta = (w_hat - w).double()
    return float((delta @ h * delta).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_masked_least_squares_is_the_exact_solution_per_row(nm):
    """Every row solved directly (``H[S, S] ŵ_S = (H w)_S`` on its kept set ``S``) is
    what CG reaches from SparseGPT's solution, with the same mask and exact zeros: at the
    default tolerance in objective, at a tight one in every weight."""
    x, w = correlated(512, 32), torch.randn(12, 32)
    obs, keep = sparsegpt_prune(w, x.T @ x, 0.5, nm)
    h = damped(x)
    oracle = torch.zeros(12, 32, dtype=torch.float64)
    for i, kept in enumerate(keep):
        oracle[i, kept] = torch.linalg.solve(h[kept][:, kept], (h @ w[i].double())[kept])
    exact = masked_least_squares(obs, w, h, keep)
    assert torch.equal(exact != 0, keep)
    best = objective(w, oracle, h)
    assert best <= objective(w, exact, h) <= best * (1 + 1e-4) < 0.8 * objective(w, obs, h)
    tight = masked_least_squares(obs, w, h, keep, tol=1e-6)
    torch.testing.assert_close(tight.double(), oracle, rtol=1e-3, atol=2e-4)


def test_masked_least_squares_leaves_an_optimum_and_empty_rows_alone():
    x, w = correlated(256, 16, seed=1), torch.randn(4, 16)
    h = damped(x)
    keep = torch.rand(4, 16) > 0.5
    keep[2] = False  # a row with nothing kept stays zero, no NaN
    once = masked_least_squares(w * keep, w, h, keep, tol=1e-7)
    again = masked_least_squares(once, w, h, keep, tol=1e-7)
    start = w * keep
    assert masked_least_squares(start, w, h, keep, tol=1e-7, in_place=True) is start
    assert torch.equal(start, once)
    assert bool(torch.isfinite(again).all()) and not bool(again[2].any())
    torch.testing.assert_close(again, once, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_admm_beats_exact_sparsegpt_and_its_weights_are_exact_for_its_mask(nm):
    """On correlated inputs ADMM's layer error is below SparseGPT's with the exact update,
    and its kept weights are the least-squares optimum for its own mask (per-row direct
    solve with ADMM's damping: ``percdamp`` times each input's own diagonal)."""
    x = correlated(1024, 64)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    h = (x.T @ x).double()
    obs, obs_keep = sparsegpt_prune(w, x.T @ x, 0.5, nm)
    sparsegpt = masked_least_squares(obs, w, damped(x), obs_keep)
    admm, keep = admm_prune(w, x.T @ x, 0.5, nm)
    # over 40 random layers: unstructured 0.35x at worst, 2:4 0.96x (the mask is tighter)
    assert objective(w, admm, h) < (0.9 if nm is None else 1.0) * objective(w, sparsegpt, h)
    assert torch.equal(admm != 0, keep)
    before = h.clone()
    assert torch.equal(admm_prune(w, h, 0.5, nm)[1], keep)  # float64 in: worked on a copy
    assert torch.equal(h, before)
    own = h + torch.diag(0.01 * h.diagonal())
    oracle = torch.zeros(48, 64, dtype=torch.float64)
    for i, kept in enumerate(keep):
        oracle[i, kept] = torch.linalg.solve(own[kept][:, kept], (own @ w[i].double())[kept])
    assert objective(w, admm, own) <= objective(w, oracle, own) * (1 + 1e-4)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 10), sparsity=st.floats(0, 1),
       nm=st.sampled_from([None, (2, 4), (1, 4), (4, 8)]), seed=st.integers(0, 99))
def test_admm_reaches_the_exact_sparsity_or_pattern(rows, groups, sparsity, nm, seed):
    cols = groups * 8
    x = correlated(64, cols, seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    new, keep = admm_prune(w, x.T @ x, sparsity, nm)
    assert torch.isfinite(new).all() and not new[~keep].any()
    if nm is None:
        assert int((~keep).sum()) == prune_count(rows * cols, sparsity)
    else:
        assert keep.view(rows, -1, nm[1]).sum(-1).eq(nm[0]).all()


@pytest.mark.parametrize("hessian", [torch.zeros(8, 8), torch.ones(8, 8),
                                     torch.diag(torch.tensor([0.0, 1, 2, 0, 3, 4, 0, 5]))])
def test_admm_handles_singular_hessians(hessian):
    new, keep = admm_prune(torch.randn(4, 8), hessian, 0.5)
    assert torch.isfinite(new).all() and int((~keep).sum()) == 16


def test_admm_refuses_a_nan_hessian_and_too_few_iterations():
    h = torch.eye(4)
    h[0, 1] = float("nan")
    with pytest.raises(ConfigError, match="ADMM: the Hessian holds NaN or inf"):
        admm_prune(torch.randn(2, 4), h, 0.5)
    with pytest.raises(ConfigError, match="iters must be at least 2, got 1"):
        admm_prune(torch.randn(2, 4), torch.eye(4), 0.5, iters=1)
