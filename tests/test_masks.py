import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch.ao.pruning import WeightNormSparsifier as RefWNS

from prunekit.masks import (
    as_matrix,
    block_means,
    lowest_k,
    nearly_diagonal_mask,
    nm_mask,
    square,
    weight_norm_mask,
)


def reference_mask(weight, sparsity_level, block, zeros, norm=None):
    """Mask the reference computes for one 2-D weight (as bool)."""
    model = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model[0].weight.data.copy_(weight)
    sparsifier = RefWNS(sparsity_level, block, zeros, norm)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    return model[0].parametrizations.weight[0].mask.bool()


shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
blocks = st.sampled_from([(1, 1), (1, 2), (1, 4), (2, 2), (4, 1), (2, 4), (4, 4)])
levels = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, block=blocks, level=levels, data=st.data())
def test_matches_reference_where_shapes_are_multiples(shape, block, level, data):
    rows = shape[0] * block[0]
    cols = shape[1] * block[1]
    zeros = data.draw(st.integers(0, block[0] * block[1]))
    norm = data.draw(st.sampled_from([None, 1]))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    weight = torch.randn(rows, cols)
    ours = weight_norm_mask(weight, level, block, zeros, torch.abs if norm == 1 else square)
    assert torch.equal(ours, reference_mask(weight, level, block, zeros, norm))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, block=blocks, level=levels)
def test_exact_number_of_pruned_blocks(shape, block, level):
    weight = torch.randn(shape)
    keep = weight_norm_mask(weight, level, block, None)
    n_blocks = math.ceil(shape[0] / block[0]) * math.ceil(shape[1] / block[1])
    pruned = (~keep).float()
    pooled = torch.nn.functional.max_pool2d(pruned[None, None], block, block, ceil_mode=True)
    expected = n_blocks if level >= 1 else min(n_blocks - 1, round(level * n_blocks))
    if level <= 0:
        expected = 0
    assert int(pooled.sum()) == expected
    # blocks are aligned: a block is pruned entirely or not at all
    padded_min = -torch.nn.functional.max_pool2d(-pruned[None, None], block, block, ceil_mode=True)
    assert torch.equal(pooled, padded_min)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 16), groups=st.integers(1, 16), m=st.sampled_from([2, 4, 8]), data=st.data()
)
def test_n_m_holds_in_every_group(rows, groups, m, data):
    n = data.draw(st.integers(0, m))
    weight = torch.randn(rows, groups * m)
    keep = nm_mask(weight, n, m)
    assert torch.equal(keep.view(rows, groups, m).sum(-1), torch.full((rows, groups), n))
    # the kept ones are the largest in magnitude of their group
    kept_min = weight.abs().masked_fill(~keep, math.inf).view(rows, groups, m).amin(-1)
    dropped_max = weight.abs().masked_fill(keep, -math.inf).view(rows, groups, m).amax(-1)
    assert bool((kept_min >= dropped_max).all())


@pytest.mark.parametrize("shape", [(7, 10), (5, 6), (3, 13)])
@pytest.mark.parametrize("level", [0.5, 1.0])
def test_widths_not_multiple_of_block(shape, level):
    """Reference bug 3: crashes or returns a padded mask; ours keeps the weight's shape."""
    weight = torch.randn(shape)
    keep = weight_norm_mask(weight, level, (1, 4), 2)
    assert keep.shape == weight.shape
    full_groups = keep[:, : shape[1] // 4 * 4].reshape(shape[0], -1, 4)
    if level >= 1:
        assert bool((full_groups.sum(-1) == 2).all())
        tail = shape[1] % 4
        if tail:  # a partial block of t valid elements drops min(2, t) of them
            assert bool((keep[:, -tail:].sum(-1) == max(0, tail - 2)).all())


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (6, 4, 5), (4, 2, 2, 2, 2)])
def test_conv_weights_scored_as_out_by_in_k(shape):
    weight = torch.randn(shape)
    keep = weight_norm_mask(weight, 0.5, (1, 1), 1)
    assert keep.shape == weight.shape
    assert int((~keep).sum()) == round(0.5 * weight.numel())
    flat = weight_norm_mask(as_matrix(weight), 0.5, (1, 1), 1)
    assert torch.equal(keep, flat.view(shape))


def test_one_dim_and_half_precision():
    bias = torch.randn(10)
    assert int((~weight_norm_mask(bias, 0.3, (1, 1), 1)).sum()) == 3
    weight = torch.randn(16, 16)
    for dtype in (torch.float16, torch.bfloat16):
        keep = weight_norm_mask(weight.to(dtype), 0.5, (1, 4), 4)
        assert keep.dtype == torch.bool and int((~keep).sum()) == 128


def test_lowest_k_exact_with_ties_and_nan():
    values = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, float("nan")])
    assert lowest_k(values, 2).tolist() == [False, False, True, True, False, False]
    assert int(lowest_k(values, 5).sum()) == 5 and not lowest_k(values, 5)[-1]
    assert lowest_k(values, 6).all() and not lowest_k(values, 0).any()


def test_block_means_average_valid_elements_only():
    scores = block_means(torch.ones(2, 6), lambda t: t, (2, 4))
    assert torch.equal(scores, torch.ones(1, 2))


def test_scores_do_not_touch_the_weight():
    weight = torch.randn(8, 8)
    before = weight.clone()
    weight_norm_mask(weight, 0.5, (1, 1), 1, norm_fn=lambda t: t)
    assert torch.equal(weight, before)


def test_nearly_diagonal_band():
    keep = nearly_diagonal_mask((4, 6), 3)
    expected = torch.tensor([[abs(r - c) <= 1 for c in range(6)] for r in range(4)])
    assert torch.equal(keep, expected)
    assert not nearly_diagonal_mask((3, 3), 0).any()
