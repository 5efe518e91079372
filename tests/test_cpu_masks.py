"""The NumPy fast path must give exactly the masks of the torch path (and so of the
reference): sampled selection, chunks, threads, ties, NaN and in-place zeroing."""

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from prunekit import _cpu_masks
from prunekit.masks import lowest_k, square, weight_norm_mask
from prunekit.parametrization import FakeSparsity


def torch_path(weight, level, block, zeros, norm):
    """The same mask computed by the torch code: an equivalent norm that is not one of
    the built-ins never takes the fast path."""
    return weight_norm_mask(weight, level, block, zeros, lambda t: norm(t))


@pytest.fixture(scope="class")
def tiny_chunks():
    """Shrink chunks, samples and the exact-partition cut-off so that small tensors take
    every branch of the fast path: many chunks, two threads, sampled bounds."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_cpu_masks, "CHUNK", 16)
        patch.setattr(_cpu_masks, "EXACT_BELOW", 32)
        patch.setattr(_cpu_masks, "SAMPLE", 24)
        torch.set_num_threads(2)
        yield
    torch.set_num_threads(threads)


def weights(draw_int, rows, cols, kind):
    generator = torch.Generator().manual_seed(draw_int)
    w = torch.randn(rows, cols, generator=generator)
    if kind == "ties":  # few distinct values: thresholds fall inside runs of ties
        w = torch.randint(-3, 4, (rows, cols), generator=generator).float()
    elif kind == "pruned":  # the second step of a schedule: half the weights are zero
        w[torch.rand(rows, cols, generator=generator) < 0.5] = 0
    elif kind == "nan":
        w.view(-1)[torch.randint(0, rows * cols, (3,), generator=generator)] = float("nan")
        w.view(-1)[torch.randint(0, rows * cols, (2,), generator=generator)] = float("inf")
    return w


blocks = st.sampled_from([(1, 1), (1, 2), (1, 4), (2, 2), (4, 1), (1, 8), (2, 4), (1, 16), (1, 3)])
kinds = st.sampled_from(["random", "ties", "pruned", "nan"])


@pytest.mark.usefixtures("tiny_chunks")
class TestWithTinyChunks:
    @settings(max_examples=120, deadline=None)
    @given(
        seed=st.integers(0, 2**16),
        grid=st.tuples(st.integers(1, 12), st.integers(1, 6)),
        block=blocks,
        level=st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.95, 1.0]),
        kind=kinds,
        data=st.data(),
    )
    def test_fast_path_equals_torch_path(self, seed, grid, block, level, kind, data):
        rows, cols = grid[0] * block[0], grid[1] * block[1]
        zeros = data.draw(st.integers(1, block[0] * block[1]))
        norm = data.draw(st.sampled_from([square, torch.abs]))
        w = weights(seed, rows, cols, kind)
        fast = weight_norm_mask(w, level, block, zeros, norm)
        assert torch.equal(fast, torch_path(w, level, block, zeros, norm))

    @settings(max_examples=60, deadline=None)
    @given(seed=st.integers(0, 2**16), n=st.integers(2, 300), kind=kinds, data=st.data())
    def test_sampled_lowest_k_is_exact(self, seed, n, kind, data):
        values = weights(seed, 1, n, kind).view(-1)
        k = data.draw(st.integers(1, n - 1))
        chosen = lowest_k(values, k)
        assert int(chosen.sum()) == k
        array = values.numpy()
        threshold = np.sort(array)[k - 1]  # NaN sorts last: it ranks above every number
        if np.isnan(threshold):
            below, tied = ~np.isnan(array), np.flatnonzero(np.isnan(array))
        else:
            below, tied = array < threshold, np.flatnonzero(array == threshold)
        assert chosen.numpy()[below].all()
        taken = torch.from_numpy(tied[chosen.numpy()[tied]])
        tied = torch.from_numpy(tied)
        assert int(chosen.sum()) - int(below.sum()) == len(taken)
        assert torch.equal(taken, tied[len(tied) - len(taken) :])  # the highest tied indices


def test_large_tensor_takes_the_sampled_path_and_matches(monkeypatch):
    """Default sizes: a 1024 x 512 weight is sampled (EXACT_BELOW = 2**17)."""
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(0))
    w[:, ::3] = 0  # a run of equal lowest scores
    calls = []
    kth = _cpu_masks._kth
    monkeypatch.setattr(_cpu_masks, "_kth", lambda v, r: calls.append(v.size) or kth(v, r))
    for level in (0.2, 0.5, 0.8):
        assert torch.equal(
            weight_norm_mask(w, level, (1, 1), 1), torch_path(w, level, (1, 1), 1, square)
        )
    assert calls and max(calls) < w.numel() // 4  # only the scores near the threshold


def test_block_rows_of_every_word_width_expand_exactly():
    chosen = np.random.default_rng(0).random((6, 5)) < 0.5
    for block in [(1, 2), (3, 4), (2, 8), (2, 3)]:
        keep = _cpu_masks.keep_outside(chosen.copy(), block)
        assert (keep == ~np.kron(chosen, np.ones(block, dtype=bool))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_zeroing_in_place_is_exact_for_nan_and_inf(dtype):
    w = torch.tensor([[1.0, float("nan"), float("inf"), -2.0], [float("-inf"), 3.0, 4.0, 0.5]])
    w = torch.nn.Parameter(w.to(dtype))
    keep = torch.tensor([[True, False, False, True], [False, True, False, True]])
    expected = w.detach().masked_fill(~keep, 0)
    version = w._version
    with torch.no_grad():
        assert _cpu_masks.zero_masked_(w, keep)
    assert torch.equal(w.detach(), expected) and w._version > version


def test_zeroing_leaves_other_layouts_to_torch():
    w = torch.randn(4, 4).t()  # not contiguous
    assert not _cpu_masks.zero_masked_(w, torch.ones(4, 4, dtype=torch.bool))


def test_fake_sparsity_zeroes_through_the_fast_path_and_bumps_the_version():
    w = torch.randn(64, 64)
    keep = w.abs() > 0.5
    sparsity = FakeSparsity(keep.clone())
    version = w._version
    sparsity.apply_(w)
    assert w._version > version and bool((w[~keep] == 0).all())
    with torch.no_grad():
        assert sparsity(w) is w  # the identity fast path holds after the NumPy write


def test_mask_copy_bumps_the_version_and_falls_back_for_other_dtypes():
    mask = torch.zeros(8, dtype=torch.bool)
    version = mask._version
    _cpu_masks.copy_mask_(mask, torch.ones(8, dtype=torch.bool))
    assert mask.all() and mask._version > version
    floats = torch.zeros(8)
    _cpu_masks.copy_mask_(floats, torch.ones(8, dtype=torch.bool))
    assert floats.eq(1).all()
