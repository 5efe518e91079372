import copy
import pickle

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from prunekit.data import DataNormSparsifier
from prunekit.data.packed import PackedMask, PackedSparsity, pack_bits, unpack_bits
from prunekit.errors import ConfigError, ConfigTypeError


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 100))
def test_pack_round_trip(shape, seed):
    torch.manual_seed(seed)
    mask = torch.rand(shape) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(bits, mask.shape), mask)


def test_bit_order_is_little_endian_within_a_byte():
    assert pack_bits(
        torch.tensor([True, False, False, False, False, False, False, True])
    ).tolist() == [129]


def sparsifiers(**config):
    torch.manual_seed(0)
    table = nn.Embedding(100, 16)
    plain = DataNormSparsifier(**config)
    plain.add_data("emb", copy.deepcopy(table))
    packed = DataNormSparsifier(**config)
    packed.add_data("emb", table, parametrization=PackedSparsity)
    return plain, packed, table


@pytest.mark.parametrize("config", [{}, {"sparsity_level": 1.0, "zeros_per_block": 2}])
def test_packed_items_get_the_same_masks_in_an_eighth_of_the_memory(config):
    plain, packed, _ = sparsifiers(**config)
    plain.step()
    packed.step()
    stored = packed.state["emb"]["mask"]
    assert isinstance(stored, PackedMask) and stored.nbytes == 100 * 16 // 8
    assert packed.get_mask("emb").dtype == torch.bool
    assert torch.equal(packed.get_mask("emb"), plain.get_mask("emb"))
    assert torch.equal(
        packed.get_data("emb", return_original=False), plain.get_data("emb", return_original=False)
    )
    assert torch.equal(
        packed.state_dict()["state"]["emb"]["mask"].to_dense(), plain.get_mask("emb")
    )


def test_packed_squash_state_dict_and_pickle():
    _, packed, table = sparsifiers()
    packed.step()
    copied = pickle.loads(pickle.dumps(packed))
    assert isinstance(copied.state["emb"]["mask"], PackedMask)
    assert torch.equal(copied.get_mask("emb"), packed.get_mask("emb"))
    loaded = DataNormSparsifier()
    loaded.load_state_dict(packed.state_dict())
    assert isinstance(loaded.state["emb"]["mask"], PackedMask)
    packed.squash_mask()
    assert torch.equal(table.weight != 0, packed.get_mask("emb"))
    with pytest.warns(UserWarning, match="replacing"):
        packed.add_data("emb", torch.randn(100, 16))  # reuses the packed mask
    assert isinstance(packed.state["emb"]["mask"], PackedMask)


def test_packed_mask_shape_is_checked():
    with pytest.raises(ConfigError, match=r"shape \(2,\) cannot replace one of shape \(3,\)"):
        PackedMask(torch.ones(3, dtype=torch.bool)).copy_(torch.ones(2, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"PackedSparsity: mask shape \(3,\)"):
        PackedSparsity(torch.ones(3, dtype=torch.bool))(torch.ones(4))


def test_bad_parametrization_changes_nothing():
    _, packed, table = sparsifiers()
    with pytest.raises(ConfigTypeError, match=r"add_data\('emb'\): parametrization must be"):
        packed.add_data("emb", torch.randn(100, 16), parametrization="bits")
    assert packed.get_data("emb") is table.weight
