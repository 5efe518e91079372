import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefDNS

from prunekit.data import BaseDataSparsifier, DataNameError, DataNormSparsifier
from prunekit.errors import ConfigError, ConfigTypeError, StateDictError, StateError
from prunekit.parametrization import FakeSparsity


def sparsifier_with_data():
    torch.manual_seed(0)
    data = {
        "tensor": torch.randn(6, 8),
        "param": nn.Parameter(torch.randn(4, 12)),
        "emb": nn.Embedding(10, 8),
        "bag": nn.EmbeddingBag(5, 4),
    }
    s = DataNormSparsifier(list(data.items()), sparsity_level=0.5)
    return s, data


def test_every_supported_type_shares_storage_with_the_caller():
    s, data = sparsifier_with_data()
    for name, item in data.items():
        tensor = item.weight if isinstance(item, nn.Module) else item
        assert s.get_data(name) is tensor
        assert s._extract_weight(item) is tensor
        assert s.get_mask(name).dtype == torch.bool and s.get_mask(name).all()
    assert isinstance(s._container.parametrizations["emb"][0], FakeSparsity)


def test_add_data_returns_the_masked_view():
    s = DataNormSparsifier(sparsity_level=1.0)
    x = torch.randn(4, 4)
    assert torch.equal(s.add_data("x", x), x)
    s.step()
    assert not s.get_data("x", return_original=False).any()


def test_abstract_and_prepare():
    with pytest.raises(TypeError, match="update_mask"):
        BaseDataSparsifier()
    with pytest.raises(NotImplementedError):
        DataNormSparsifier().prepare(nn.Linear(2, 2), None)


@pytest.mark.parametrize("data", [[1.0, 2.0], nn.Linear(2, 2), "tensor"])
def test_unsupported_types_name_the_item_and_change_nothing(data):
    s, _ = sparsifier_with_data()
    before = s.state_dict()
    with pytest.raises(
        ConfigTypeError, match=rf"add_data\('new'\): data of type {type(data).__name__}"
    ):
        s.add_data("new", data)
    assert list(s.data_groups) == list(before["data_groups"])


@pytest.mark.parametrize("name", ["emb.weight", "", 3, "training", "parametrizations"])
def test_unusable_names(name):
    s = DataNormSparsifier()
    with pytest.raises(DataNameError, match="add_data") as info:
        s.add_data(name, torch.randn(2, 4))
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert s.data_groups == {} and len(s.state) == 0


def test_replace_warns_keeps_config_and_mask():
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("x", torch.randn(4, 8), sparsity_level=0.75)
    s.step()
    mask = s.get_mask("x")
    kept = mask.clone()
    new = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="replacing existing data 'x'"):
        s.add_data("x", new, zeros_per_block=2)
    assert s.data_groups["x"]["sparsity_level"] == 0.75
    assert s.data_groups["x"]["zeros_per_block"] == 2
    assert s.get_mask("x") is mask and torch.equal(mask, kept)
    assert s.get_data("x") is new
    with pytest.warns(UserWarning):
        s.add_data("x", torch.randn(2, 2), reuse_mask=False)
    assert s.get_mask("x").shape == (2, 2) and s.get_mask("x").all()


def test_reuse_mask_shape_mismatch_is_our_error_and_changes_nothing():
    x = torch.randn(4, 8)
    s = DataNormSparsifier([("x", x)])
    s.step()
    mask = s.get_mask("x").clone()
    with pytest.raises(ConfigError, match=r"add_data\('x'\): reuse_mask=True.*\(4, 8\).*\(3, 8\)"):
        s.add_data("x", torch.randn(3, 8))
    assert s.get_data("x") is x and torch.equal(s.get_mask("x"), mask)


def test_user_masks_are_checked_and_stored_as_bool():
    s = DataNormSparsifier()
    s.add_data("x", torch.randn(2, 4), mask=torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]]))
    assert s.get_mask("x").dtype == torch.bool
    assert s.get_data("x", return_original=False)[0, 1] == 0
    with pytest.raises(ConfigError, match="values other than 0 and 1"):
        s.add_data("y", torch.randn(2, 2), mask=torch.full((2, 2), 0.5))
    with pytest.raises(ConfigError, match=r"mask has shape \(3,\)"):
        s.add_data("y", torch.randn(2, 2), mask=torch.ones(3))
    assert list(s.data_groups) == ["x"]


def test_unknown_names_are_value_errors_naming_the_item():
    s, _ = sparsifier_with_data()
    for call in (
        lambda: s.get_data("nope"),
        lambda: s.get_mask("nope"),
        lambda: s.squash_mask(names=["nope"]),
    ):
        with pytest.raises(ValueError, match="'nope'"):
            call()


def test_squash_zeroes_the_callers_tensor_in_place():
    s, data = sparsifier_with_data()
    s.step()
    masks = {name: s.get_mask(name).clone() for name in data}
    s.squash_mask(names=["emb", "tensor"])
    weight = data["emb"].weight
    assert isinstance(weight, nn.Parameter) and torch.equal(weight != 0, masks["emb"])
    assert torch.equal(data["tensor"] != 0, masks["tensor"])
    assert data["bag"].weight.all()  # not squashed
    with pytest.raises(StateError, match=r"get_data.*'emb'.*squashed"):
        s.get_data("emb")
    assert s.get_data("emb", return_original=False) is weight
    with pytest.raises(StateError, match="squash_mask: data 'emb'"):
        s.squash_mask(names=["bag", "emb"])
    with pytest.raises(StateError, match="step: data 'tensor'"):
        s.step()
    assert parametrized(s, "bag")  # failed calls changed nothing


def parametrized(s, name):
    return torch.nn.utils.parametrize.is_parametrized(s._container, name)


def test_squash_without_leaving_parametrized_restores_the_data():
    x = torch.randn(4, 8)
    before = x.clone()
    s = DataNormSparsifier([("x", x)])
    s.step()
    s.squash_mask(leave_parametrized=False)
    assert torch.equal(x, before) and not parametrized(s, "x")


def test_enable_mask_update_false_skips_step():
    s = DataNormSparsifier([("x", torch.randn(4, 8))])
    s.enable_mask_update = False
    s.step()
    assert s.get_mask("x").all()


def test_state_dict_layout_and_copies():
    s, _ = sparsifier_with_data()
    s.step()
    s.squash_mask(names=["tensor"])
    sd = s.state_dict()
    assert set(sd) == {"state", "data_groups", "_container"}
    assert sd["state"]["emb"]["mask"].layout == torch.sparse_coo
    assert torch.equal(sd["state"]["emb"]["mask"].to_dense(), s.get_mask("emb"))
    assert sd["data_groups"]["emb"] == {
        "sparsity_level": 0.5,
        "sparse_block_shape": (1, 4),
        "zeros_per_block": 4,
    }
    assert "tensor" in sd["_container"] and "parametrizations.emb.original" in sd["_container"]
    sd["data_groups"]["emb"]["sparsity_level"] = 0.1
    assert s.data_groups["emb"]["sparsity_level"] == 0.5


def test_load_state_dict_strict_and_non_strict():
    s, data = sparsifier_with_data()
    s.step()
    s.squash_mask(names=["tensor"])
    sd = s.state_dict()
    other = DataNormSparsifier([("extra", torch.randn(2, 4))])
    other.load_state_dict(sd)
    assert sorted(other.data_groups) == sorted(data)
    for name in data:
        assert torch.equal(other.get_mask(name), s.get_mask(name))
    assert not parametrized(other, "tensor") and parametrized(other, "emb")
    other.squash_mask(names=["emb"])  # the loaded data is a copy
    assert data["emb"].weight.all()
    merged = DataNormSparsifier([("extra", torch.randn(2, 4)), ("emb", torch.randn(3, 4))])
    merged.load_state_dict(sd, strict=False)
    assert sorted(merged.data_groups) == sorted([*data, "extra"])
    assert merged.get_data("emb").shape == (3, 4)  # the current item wins


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda sd: sd.pop("_container"), "missing key '_container'"),
        (lambda sd: sd["data_groups"].pop("emb"), "'emb' has no entry in 'data_groups'"),
        (lambda sd: sd["state"].pop("emb"), r"data_groups \['emb'\] have no entry in 'state'"),
        (lambda sd: sd["_container"].pop("parametrizations.emb.original"), "neither 'emb'"),
        (
            lambda sd: sd["state"]["emb"].update(mask=torch.ones(2, 2)),
            r"'emb'.*mask has shape \(2, 2\)",
        ),
    ],
)
def test_bad_state_dicts_change_nothing(mutate, match):
    s, _ = sparsifier_with_data()
    sd = s.state_dict()
    mutate(sd)
    target = DataNormSparsifier([("keep", torch.randn(2, 4))])
    with pytest.raises((StateDictError, ConfigError), match=match):
        target.load_state_dict(sd)
    assert list(target.data_groups) == ["keep"] and parametrized(target, "keep")


def test_reference_state_dict_loads_into_ours_and_ours_into_the_reference():
    torch.manual_seed(1)
    x, emb = torch.randn(8, 16), nn.Embedding(12, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefDNS([("x", x.clone()), ("emb", copy.deepcopy(emb))], sparsity_level=0.5)
        ref.step()
        ref_sd = ref.state_dict()
    ours = DataNormSparsifier()
    ours.load_state_dict(ref_sd)
    for name in ("x", "emb"):
        assert torch.equal(ours.get_mask(name), ref.get_mask(name).bool())
    mine = DataNormSparsifier([("x", x.clone()), ("emb", copy.deepcopy(emb))], sparsity_level=0.5)
    mine.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = RefDNS()
        back.load_state_dict(mine.state_dict())
        for name in ("x", "emb"):
            assert torch.equal(back.get_mask(name).bool(), mine.get_mask(name))
            assert torch.equal(
                back.get_data(name, return_original=False),
                mine.get_data(name, return_original=False),
            )
        back.step()  # the reference keeps working on our masks
        assert torch.equal(back.get_mask("x").bool(), mine.get_mask("x"))


@pytest.mark.parametrize("clone", [pickle.loads, copy.deepcopy])
def test_pickle_and_deepcopy_round_trip(clone):
    s, data = sparsifier_with_data()
    s.data_groups["emb"]["sparsity_level"] = 0.75
    s.step()
    copied = clone(pickle.dumps(s)) if clone is pickle.loads else clone(s)
    assert copied.norm == s.norm and copied.enable_mask_update
    assert copied.data_groups == s.data_groups
    for name in data:
        assert torch.equal(copied.get_mask(name), s.get_mask(name))
    copied.data_groups["emb"]["sparsity_level"] = 0.25
    copied.step()
    assert float(copied.get_mask("emb").float().mean()) == 0.75


def test_repr_lists_data():
    s, _ = sparsifier_with_data()
    text = repr(s)
    assert (
        text.startswith("DataNormSparsifier (")
        and "name: emb" in text
        and "sparsity_level: 0.5" in text
    )


def test_malformed_data_list():
    with pytest.raises(ConfigTypeError, match="data_list must be a list"):
        DataNormSparsifier(data_list={"x": torch.randn(2, 4)})
    with pytest.raises(ConfigTypeError, match=r"data_list\[0\] must be a \(name, data\) pair"):
        DataNormSparsifier(data_list=[torch.randn(2, 4)])


def test_reference_float_masks_before_step_load_as_bool():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefDNS([("x", torch.randn(4, 8))])
        ref.add_data("y", torch.randn(2, 4), mask=torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1]]))
        sd = ref.state_dict()
    assert sd["state"]["x"]["mask"].dtype == torch.float32
    ours = DataNormSparsifier()
    ours.load_state_dict(sd)
    assert ours.get_mask("x").dtype == torch.bool and ours.get_mask("x").all()
    assert ours.get_mask("y").tolist() == [[True, False, True, True], [False, True, True, True]]
