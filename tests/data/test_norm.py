import math
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefDNS

from prunekit.data import DataNormSparsifier, data_norm_mask
from prunekit.errors import ConfigError, ConfigTypeError

blocks = st.sampled_from([(1, 1), (1, 2), (1, 4), (2, 2), (4, 1), (2, 4), (3, 3)])
levels = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.95, 1.0])


def reference_mask(data, level, block, zeros, norm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefDNS(
            sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm
        )
        ref.add_data("x", data.clone())
        ref.step()
    return ref.get_mask("x")


def our_mask(data, level, block, zeros, norm):
    s = DataNormSparsifier(
        sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm
    )
    s.add_data("x", data)
    s.step()
    return s.get_mask("x")


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(2, 20),
    cols=st.integers(2, 20),
    block=blocks,
    level=levels,
    norm=st.sampled_from(["L1", "L2"]),
    data=st.data(),
)
def test_masks_identical_to_reference(rows, cols, block, level, norm, data):
    zeros = data.draw(st.integers(0, math.prod(block)))
    x = torch.randn(rows, cols, dtype=torch.float64)
    ours = our_mask(x, level, block, zeros, norm)
    ref = reference_mask(x, level, block, zeros, norm)
    assert ours.dtype == torch.bool and ref.dtype == torch.int8
    assert torch.equal(ours, ref.bool())


@pytest.mark.parametrize("shape", [(12,), (1, 12), (12, 1), (1, 3, 8), (3, 1, 8)])
def test_1d_and_singleton_dims_keep_the_data_shape_and_the_references_selection(shape):
    x = torch.randn(shape)
    ours = our_mask(x, 0.5, (1, 4), 4, "L1")
    ref = reference_mask(x, 0.5, (1, 4), 4, "L1")  # the reference's mask loses the shape
    assert ours.shape == x.shape
    assert torch.equal(ours.flatten(), ref.bool().flatten())


def test_1d_data_reads_back_sparsified():
    x = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 6.0, 7.0, 8.0])
    s = DataNormSparsifier([("bias", x)], sparsity_level=0.5, sparse_block_shape=(1, 4))
    s.step()
    assert s.get_data("bias", return_original=False).tolist() == [0, 0, 0, 0, 0.5, 6, 7, 8]


def test_single_element_data():
    s = DataNormSparsifier([("one", torch.ones(1, 1))], sparsity_level=1.0)
    s.step()
    assert s.get_mask("one").tolist() == [[False]]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 6)),
    block=st.sampled_from([(1, 4), (2, 2), (1, 8)]),
    level=levels,
)
def test_exact_number_of_pruned_blocks_no_block_spared(shape, block, level):
    rows, cols = shape[0] * block[0], shape[1] * block[1]
    keep = our_mask(torch.randn(rows, cols), level, block, None, "L2")
    per_block = keep.view(shape[0], block[0], shape[1], block[1]).sum((1, 3))
    n_blocks = per_block.numel()
    assert int((per_block == 0).sum()) == round(level * n_blocks)
    assert set(per_block.unique().tolist()) <= {0, math.prod(block)}


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 16), groups=st.integers(1, 8), m=st.sampled_from([2, 4, 8]), data=st.data()
)
def test_n_zeros_in_every_block_at_full_level(rows, groups, m, data):
    zeros = data.draw(st.integers(0, m))
    keep = our_mask(torch.randn(rows, groups * m), 1.0, (1, m), zeros, "L1")
    assert (keep.view(rows, groups, m).sum(-1) == m - zeros).all()


def test_no_clamp_to_n_minus_one_unlike_weight_norm():
    x = torch.randn(1, 40)  # 10 blocks: round(0.95 * 10) = 10 (all of them)
    assert not our_mask(x, 0.95, (1, 4), 4, "L1").any()


def test_scores_use_the_unmasked_data_so_masks_can_relax():
    x = torch.randn(8, 16)
    s = DataNormSparsifier([("x", x)], sparsity_level=0.75)
    s.step()
    s.data_groups["x"]["sparsity_level"] = 0.25
    s.step()
    assert torch.equal(s.get_mask("x"), data_norm_mask(x, 0.25, (1, 4)))
    assert float(s.get_mask("x").float().mean()) == 0.75


def test_step_leaves_the_callers_tensor_alone_and_mask_identity_fixed():
    x = torch.randn(8, 8)
    before = x.clone()
    s = DataNormSparsifier([("x", x)])
    mask = s.get_mask("x")
    s.step()
    assert torch.equal(x, before)
    assert s.get_mask("x") is mask
    assert s.get_data("x") is x


def test_fp16_and_bf16_data():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(8, 16).to(dtype)
        keep = our_mask(x, 0.5, (1, 4), 4, "L2")
        assert torch.equal(keep, data_norm_mask(x.float(), 0.5, (1, 4), 4, "L2"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm": "L3"}, ConfigError, "norm must be 'L1' or 'L2', got 'L3'"),
        ({"sparsity_level": 1.5}, ConfigError, "sparsity_level must be in"),
        ({"sparse_block_shape": (0, 4)}, ConfigError, "sparse_block_shape must be positive"),
        ({"sparse_block_shape": 4}, ConfigTypeError, "pair of ints"),
        ({"zeros_per_block": 5}, ConfigError, r"zeros_per_block must be in \[0, 4\]"),
        ({"zeros_per_block": -1}, ConfigError, r"zeros_per_block must be in \[0, 4\]"),
    ],
)
def test_bad_defaults(kwargs, error, match):
    with pytest.raises(error, match=match):
        DataNormSparsifier(**kwargs)


def test_3d_and_integer_data_rejected_by_add_data_without_change():
    s = DataNormSparsifier([("ok", torch.randn(4, 4))])
    with pytest.raises(ConfigError, match=r"data 'cube'.*got shape \(2, 3, 4\)"):
        s.add_data("cube", torch.randn(2, 3, 4))
    with pytest.raises(ConfigTypeError, match=r"data 'ints'.*floating-point.*torch.int64"):
        s.add_data("ints", torch.arange(8).view(2, 4))
    with pytest.raises(ConfigError, match=r"data 'bad'.*zeros_per_block"):
        s.add_data("bad", torch.randn(4, 4), zeros_per_block=9)
    assert list(s.data_groups) == ["ok"] and list(s.state) == ["ok"]
    assert list(s._container.state_dict()) == ["parametrizations.ok.original"]


def test_bad_config_set_later_fails_step_before_any_mask_changes():
    s = DataNormSparsifier([("a", torch.randn(4, 8)), ("b", torch.randn(4, 8))])
    s.data_groups["b"]["sparsity_level"] = 2.0
    with pytest.raises(ConfigError, match=r"data 'b'.*sparsity_level"):
        s.step()
    assert s.get_mask("a").all()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(2, 16),
    cols=st.integers(2, 16),
    block=blocks,
    norm=st.sampled_from(["L1", "L2"]),
    data=st.data(),
)
def test_ties_within_blocks_break_like_the_reference(rows, cols, block, norm, data):
    """Dequantized or rounded tables have many equal values; in a block the reference's
    (stable) sort zeroes the first of them. (Ties between whole blocks have no defined
    order in the reference's sort; ours zeroes the last, which is what it does on big
    tables, see benchmarks/data.py.)"""
    zeros = data.draw(st.integers(0, math.prod(block)))
    x = torch.randint(-3, 4, (rows, cols)).float()
    ours = our_mask(x, 1.0, block, zeros, norm)
    assert torch.equal(ours, reference_mask(x, 1.0, block, zeros, norm).bool())


def test_ties_between_blocks_go_to_the_last():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0]])
    assert our_mask(x, 0.4, (1, 1), 1, "L1").tolist() == [[True, True, False, False, True]]
