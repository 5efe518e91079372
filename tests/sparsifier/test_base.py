import copy
import pickle

import pytest
import torch
from torch import nn
from torch.ao import pruning as ref
from torch.nn.utils import parametrize

import prunekit
from prunekit import (
    BaseSparsifier,
    ConfigError,
    ConfigTypeError,
    FakeSparsity,
    FqnError,
    StateDictError,
    StateError,
    WeightNormSparsifier,
)
from tests.helpers import MLP, assert_unchanged, snapshot


class RowZeroSparsifier(BaseSparsifier):
    """Like the reference's test helper: each step zeroes row 0 and counts steps."""

    def update_mask(self, module, tensor_name, **kwargs):
        module.parametrizations[tensor_name][0].mask[0] = 0
        state = self.state[kwargs["tensor_fqn"]]
        state["step_count"] = state.get("step_count", 0) + 1


def test_base_is_abstract():
    with pytest.raises(TypeError, match="update_mask"):
        BaseSparsifier()


def test_prepare_without_config_takes_linears_in_reference_order():
    ours, theirs = WeightNormSparsifier(), ref.WeightNormSparsifier()
    ours.prepare(MLP(), None)
    theirs.prepare(MLP(), None)
    assert [g["tensor_fqn"] for g in ours.groups] == [g["tensor_fqn"] for g in theirs.groups]
    assert [sorted(g) for g in ours.groups] == [sorted(g) for g in theirs.groups]


def test_prepare_attaches_bool_masks_and_keeps_state_dict_loadable():
    model = MLP()
    sparsifier = RowZeroSparsifier(defaults={"foo": 1})
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight", "bar": 2}])
    mask = model.seq[0].parametrizations.weight[0].mask
    assert mask.dtype == torch.bool and bool(mask.all())
    assert sparsifier.state["seq.0.weight"]["mask"] is mask
    group = sparsifier.groups[0]
    assert group["module"] is model.seq[0] and group["module_fqn"] == "seq.0"
    assert group["foo"] == 1 and group["bar"] == 2 and group["tensor_name"] == "weight"
    assert "parametrizations.weight.original" in model.seq[0].state_dict()
    model.load_state_dict(model.state_dict())


def test_step_counts_and_masks_like_reference_helper():
    model = MLP()
    sparsifier = RowZeroSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "linear1.weight"}])
    sparsifier.step()
    sparsifier.step()
    assert sparsifier.state["linear1.weight"]["step_count"] == 2
    assert not model.linear1.weight[0].any() and model.linear1.weight[1:].ne(0).all()
    sparsifier.enable_mask_update = False
    sparsifier.step()
    assert sparsifier.state["linear1.weight"]["step_count"] == 2


def test_masked_forward_is_exact_and_gradients_are_masked():
    torch.manual_seed(0)
    model = MLP()
    dense = copy.deepcopy(model)
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.prepare(model, None)
    sparsifier.step()
    x = torch.randn(4, 16)
    with torch.no_grad():
        for name in ["linear1", "seq.0", "seq.2"]:
            mask = model.get_submodule(name).parametrizations.weight[0].mask
            dense.get_submodule(name).weight.mul_(mask)
    assert torch.equal(model(x), dense(x))
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))
    model(x).sum().backward()
    original = model.linear1.parametrizations.weight.original
    mask = model.linear1.parametrizations.weight[0].mask
    assert not original.grad[~mask].any()


def test_no_grad_forward_returns_stored_weight_until_it_changes():
    model = nn.Sequential(nn.Linear(8, 8))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.prepare(model, None)
    sparsifier.step()
    original = model[0].parametrizations.weight.original
    with torch.no_grad():
        assert model[0].weight is original  # the fast path: no recomputation
        original.add_(1.0)  # e.g. an optimizer step: the fast path is off
        mask = model[0].parametrizations.weight[0].mask
        assert torch.equal(model[0].weight, original * mask)
        assert model[0].weight is not original


def test_squash_mask_bakes_masks_and_keeps_params():
    model = MLP()
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.2.weight"}])
    sparsifier.step()
    param = model.seq[0].parametrizations.weight.original
    sparsifier.squash_mask(
        params_to_keep=("sparsity_level",),
        params_to_keep_per_layer={"seq.2": ("sparse_block_shape",)},
    )
    assert not parametrize.is_parametrized(model.seq[0])
    assert model.seq[0].weight is param  # same Parameter object: optimizers stay valid
    assert float((model.seq[0].weight == 0).float().mean()) == 0.5
    assert model.seq[0].sparse_params == {"sparsity_level": 0.5}
    assert model.seq[2].sparse_params == {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)}


def test_squash_matches_reference_weights():
    torch.manual_seed(1)
    ours_model, ref_model = MLP(), MLP()
    ref_model.load_state_dict(ours_model.state_dict())
    ours, theirs = WeightNormSparsifier(0.7, (2, 2)), ref.WeightNormSparsifier(0.7, (2, 2))
    for sparsifier, model in [(ours, ours_model), (theirs, ref_model)]:
        sparsifier.prepare(model, None)
        sparsifier.step()
        sparsifier.step()
        sparsifier.squash_mask()
    for (name, a), (_, b) in zip(
        ours_model.state_dict().items(), ref_model.state_dict().items(), strict=False
    ):
        assert torch.equal(a, b), name


def test_state_dict_is_a_copy_and_load_leaves_source_alone():
    model = MLP()
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.prepare(model, None)
    sparsifier.step()
    sd = sparsifier.state_dict()
    assert set(sd) == {"state", "groups"}
    assert all(set(g) & {"module", "module_fqn", "tensor_name"} == set() for g in sd["groups"])
    saved = sd["state"]["linear1.weight"]["mask"].clone()
    sparsifier.groups[0]["sparsity_level"] = 0.9
    sparsifier.step()
    assert torch.equal(sd["state"]["linear1.weight"]["mask"], saved)

    other_model = MLP()
    other = WeightNormSparsifier()
    other.prepare(other_model, None)
    other.load_state_dict(sd)
    assert torch.equal(sd["state"]["linear1.weight"]["mask"], saved)  # caller's dict intact
    loaded = other_model.linear1.parametrizations.weight[0].mask
    assert torch.equal(loaded, saved) and other.state["linear1.weight"]["mask"] is loaded
    assert other.groups[0]["module"] is other_model.linear1


def test_state_dicts_load_both_ways_with_reference():
    torch.manual_seed(2)
    model, ref_model = MLP(), MLP()
    ours = WeightNormSparsifier(0.5, (1, 4))
    ours.prepare(model, None)
    ours.step()
    theirs = ref.WeightNormSparsifier(0.5, (1, 4))
    theirs.prepare(ref_model, None)
    theirs.load_state_dict(ours.state_dict())
    for fqn in ["linear1", "seq.0", "seq.2"]:
        a = model.get_submodule(fqn).parametrizations.weight[0].mask
        b = ref_model.get_submodule(fqn).parametrizations.weight[0].mask
        assert torch.equal(a, b.bool())

    fresh = ref.WeightNormSparsifier(0.7, (1, 1))  # the loaded one kept no masks (its bug 6)
    fresh_model = MLP()
    fresh.prepare(fresh_model, None)
    fresh.step()
    again = WeightNormSparsifier()
    again_model = MLP()
    again.prepare(again_model, None)
    again.load_state_dict(fresh.state_dict())  # float masks from the reference
    mask = again_model.seq[0].parametrizations.weight[0].mask
    assert mask.dtype == torch.bool and again.groups[0]["sparsity_level"] == 0.7
    assert torch.equal(mask, fresh_model.seq[0].parametrizations.weight[0].mask.bool())


def test_load_state_dict_with_model_argument_registers_masks():
    source_model = MLP()
    source = WeightNormSparsifier(0.5, (1, 1))
    source.prepare(source_model, None)
    source.step()
    fresh_model = MLP()
    fresh = WeightNormSparsifier()
    fresh.load_state_dict(source.state_dict(), model=fresh_model)
    assert prunekit.module_contains_param(fresh_model.seq[0], FakeSparsity)
    assert int((~fresh_model.seq[0].parametrizations.weight[0].mask).sum()) == 128


def test_pickle_and_deepcopy_round_trip():
    """As in the reference, a prepared model pickles only through state_dicts, but a
    squashed sparsifier pickles and a prepared one deep-copies (model included)."""
    model = MLP()
    sparsifier = WeightNormSparsifier(0.5, (1, 1))
    sparsifier.prepare(model, None)
    sparsifier.step()
    copied = copy.deepcopy(sparsifier)
    copied.groups[0]["sparsity_level"] = 0.9
    copied.step()
    assert float((model.linear1.weight == 0).float().mean()) == 0.5  # the copy is separate
    assert int((copied.groups[0]["module"].weight == 0).sum()) == round(0.9 * 256)
    sparsifier.squash_mask()
    restored = pickle.loads(pickle.dumps(sparsifier))
    assert restored.defaults == sparsifier.defaults
    assert [g["tensor_fqn"] for g in restored.groups] == [
        g["tensor_fqn"] for g in sparsifier.groups
    ]
    assert torch.equal(
        restored.state["seq.0.weight"]["mask"], sparsifier.state["seq.0.weight"]["mask"]
    )
    assert "Group 0" in repr(restored)


class MockSparseLinear(nn.Linear):
    @classmethod
    def from_dense(cls, mod):
        new = cls(mod.in_features, mod.out_features)
        new.weight = nn.Parameter(mod.weight.detach().clone())
        return new


def test_convert_swaps_parametrized_modules_and_keeps_hooks():
    model = MLP()
    calls = []
    model.seq[0].register_forward_hook(lambda m, i, o: calls.append(1))
    sparsifier = WeightNormSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}])
    converted = sparsifier.convert(model, mapping={nn.Linear: MockSparseLinear})
    assert type(converted.seq[0]) is MockSparseLinear and type(converted.seq[2]) is nn.Linear
    assert parametrize.is_parametrized(model.seq[0])  # not inplace: original untouched
    converted(torch.randn(2, 16))
    assert calls == [1]
    with pytest.raises(NotImplementedError):
        sparsifier.convert(model)


def _prepared(**kwargs):
    model = MLP()
    sparsifier = WeightNormSparsifier(**kwargs)
    sparsifier.prepare(model, [{"tensor_fqn": "seq.0.weight"}])
    return model, sparsifier


BAD_CONFIGS = [
    ([nn.Linear(2, 2)], ConfigTypeError, r"config\[0\] must be a dict"),
    ({"tensor_fqn": "seq.0.weight"}, ConfigTypeError, "config must be a list"),
    ([{"sparsity_level": 0.5}], ConfigError, r"config\[0\] has no 'tensor_fqn'"),
    ([{"tensor_fqn": "seq.7.weight"}], FqnError, "'seq' has no submodule '7'"),
    ([{"tensor_fqn": "seq.0.wieght"}], FqnError, "did you mean 'weight'"),
    ([{"tensor_fqn": "scale"}], ConfigTypeError, "'scale' is a Tensor, not an nn.Parameter"),
    (
        [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.0.weight"}],
        ConfigError,
        r"config\[1\]: tensor 'seq.0.weight' is already prepared",
    ),
    (
        [{"tensor_fqn": "seq.0.weight", "module_fqn": "seq.2"}],
        ConfigError,
        "module_fqn='seq.2' disagrees",
    ),
    (
        [{"tensor_fqn": "seq.0.weight", "sparsity_level": 1.5}],
        ConfigError,
        r"sparsity_level must be in \[0, 1\], got 1.5",
    ),
    (
        [{"tensor_fqn": "seq.0.weight", "sparsity_level": "half"}],
        ConfigTypeError,
        "must be a number",
    ),
    ([{"tensor_fqn": "seq.0.weight", "sparsity_level": float("nan")}], ConfigError, "got nan"),
    (
        [{"tensor_fqn": "seq.0.weight", "zeros_per_block": 5}],
        ConfigError,
        r"zeros_per_block must be in \[0, 4\]",
    ),
    ([{"tensor_fqn": "seq.0.weight", "zeros_per_block": -1}], ConfigError, "got -1"),
    (
        [{"tensor_fqn": "seq.0.weight", "sparse_block_shape": (0, 4)}],
        ConfigError,
        "must be positive",
    ),
    ([{"tensor_fqn": "seq.0.weight", "sparse_block_shape": 4}], ConfigTypeError, "pair of ints"),
    (
        [{"tensor_fqn": "seq.0.weight", "mask": torch.ones(3)}],
        ConfigError,
        r"has shape \(3,\), expected \(16, 16\)",
    ),
]


@pytest.mark.parametrize(("config", "error", "message"), BAD_CONFIGS)
def test_bad_config_raises_and_leaves_model_unchanged(config, error, message):
    model = MLP()
    sparsifier = WeightNormSparsifier()
    sparsifier.prepare(model, [{"tensor_fqn": "seq.2.weight"}])  # earlier, valid state
    before = snapshot(model)
    with pytest.raises(error, match=message):
        sparsifier.check_config(model, config)  # the same check, without preparing
    with pytest.raises(error, match=message):
        sparsifier.prepare(model, config)
    assert_unchanged(before, model)
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["seq.2.weight"]


def test_check_config_of_a_good_config_changes_nothing():
    model, sparsifier = MLP(), WeightNormSparsifier()
    before = snapshot(model)
    sparsifier.check_config(model, [{"tensor_fqn": "seq.0.weight"}])
    assert_unchanged(before, model)
    assert sparsifier.groups == [] and not parametrize.is_parametrized(model.seq[0], "weight")


def test_preparing_a_tensor_another_sparsifier_owns_is_refused():
    model, _ = _prepared()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="already prepared"):
        WeightNormSparsifier().prepare(model, [{"tensor_fqn": "seq.0.weight"}])
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sparsity_level": -0.1}, ConfigError, r"in \[0, 1\]"),
        ({"sparse_block_shape": (1, -4)}, ConfigError, "positive"),
        ({"zeros_per_block": 9}, ConfigError, r"\[0, 4\]"),
        ({"norm": 3}, prunekit.UnsupportedError, "L-3 is not yet implemented"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        WeightNormSparsifier(**kwargs)


def test_bad_level_set_between_steps_is_refused_before_any_mask_changes():
    model, sparsifier = _prepared(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.step()
    sparsifier.groups[0]["sparsity_level"] = 2.0
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'seq.0.weight'.*got 2.0"):
        sparsifier.step()
    assert_unchanged(before, model)


def test_life_cycle_errors():
    model, sparsifier = _prepared()
    sparsifier.step()
    with pytest.raises(StateDictError, match=r"has no key\(s\) \['nope'\]"):
        sparsifier.squash_mask(params_to_keep=("nope",))
    with pytest.raises(FqnError, match=r"names \['seq.9'\]"):
        sparsifier.squash_mask(params_to_keep_per_layer={"seq.9": ("sparsity_level",)})
    assert parametrize.is_parametrized(model.seq[0])
    sparsifier.squash_mask()
    before = snapshot(model)
    with pytest.raises(StateError, match="squash_mask"):
        sparsifier.step()
    with pytest.raises(StateError, match=r"'seq.0.weight' has no mask any more"):
        sparsifier.squash_mask()
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda sd: sd.pop("groups"), StateDictError, "missing key 'groups'"),
        (lambda sd: sd["state"].update({"seq.5.weight": {}}), StateDictError, "no submodule '5'"),
        (
            lambda sd: sd["state"]["seq.0.weight"].update(mask=torch.ones(2, 2, dtype=torch.bool)),
            StateDictError,
            r"has shape \(2, 2\), expected \(16, 16\)",
        ),
        (
            lambda sd: sd["state"]["seq.0.weight"].update(mask=torch.full((16, 16), 0.5)),
            StateDictError,
            "values other than 0 and 1",
        ),
        (
            lambda sd: sd["groups"].append({"x": 1}),
            StateDictError,
            r"groups\[1\] has no 'tensor_fqn'",
        ),
    ],
)
def test_bad_state_dict_leaves_model_and_sparsifier_unchanged(mutate, error, message):
    model, sparsifier = _prepared(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.step()
    sd = sparsifier.state_dict()
    mutate(sd)
    before, groups = snapshot(model), sparsifier.groups
    with pytest.raises(error, match=message):
        sparsifier.load_state_dict(sd)
    assert_unchanged(before, model)
    assert sparsifier.groups is groups


def test_load_without_model_is_a_clear_error():
    with pytest.raises(StateError, match="call prepare"):
        WeightNormSparsifier().load_state_dict({"state": {}, "groups": []})


def test_non_strict_load_skips_unknown_fqns():
    _model, sparsifier = _prepared(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.step()
    sd = sparsifier.state_dict()
    sd["state"]["ghost.weight"] = {"mask": torch.ones(2, dtype=torch.bool)}
    sd["groups"].append({"tensor_fqn": "ghost.weight", "sparsity_level": 0.5})
    sparsifier.load_state_dict(sd, strict=False)
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["seq.0.weight"]
