"""Structured pruners vs torch.ao.pruning._experimental.pruner: same masks, same errors
(as prunekit types that still subclass what the reference raised)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.pruning._experimental import pruner as ref

import prunekit.structured as ps
from prunekit.errors import ConfigError, ConfigKeyError, UnsupportedError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.Linear(12, 4))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 6, 3), nn.Conv2d(6, 5, 1))


CONFIG = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}]


def _masks(pruner) -> dict[str, torch.Tensor]:
    return {k: v["mask"].clone() for k, v in pruner.state.items()}


def _run_both(make_ref, make_ours, model_fn, levels, config=CONFIG):
    ref_model, our_model = model_fn(), model_fn()
    theirs, ours = make_ref(), make_ours()
    theirs.prepare(ref_model, copy.deepcopy(config))
    ours.prepare(our_model, copy.deepcopy(config))
    history = []
    for level in levels:
        for p in (theirs, ours):
            for group in p.groups:
                group["sparsity_level"] = level
            p.step()
        history.append((_masks(theirs), _masks(ours)))
    return history


@pytest.mark.parametrize("model_fn", [_mlp, _convnet])
@pytest.mark.parametrize(
    ("make_ref", "make_ours"),
    [
        (lambda: ref.SaliencyPruner({"sparsity_level": 0.5}),
         lambda: ps.SaliencyPruner({"sparsity_level": 0.5})),
        (lambda: ref.FPGMPruner(0.5), lambda: ps.FPGMPruner(0.5)),
        (lambda: ref.FPGMPruner(0.5, dist=1), lambda: ps.FPGMPruner(0.5, dist=1)),
    ],
    ids=["saliency", "fpgm-l2", "fpgm-l1"],
)
def test_masks_match_reference_over_a_schedule(make_ref, make_ours, model_fn):
    # rising, then falling: the masks never regain rows, in both libraries
    for theirs, ours in _run_both(make_ref, make_ours, model_fn, [0.25, 0.5, 0.75, 0.3]):
        assert theirs.keys() == ours.keys()
        for key in theirs:
            assert ours[key].dtype == torch.bool and ours[key].dim() == 1
            assert torch.equal(theirs[key], ours[key]), key


def test_fpgm_extremes_and_custom_distance():
    def manhattan(x):
        return torch.cdist(x, x, p=1)

    history = _run_both(
        lambda: ref.FPGMPruner(0.5, dist=manhattan), lambda: ps.FPGMPruner(0.5, dist=manhattan),
        _convnet, [0.4, 1.0, 0.0],
    )
    for theirs, ours in history:
        for key in theirs:
            assert torch.equal(theirs[key], ours[key])
    assert not history[1][1]["0.weight"].any() and history[2][1]["0.weight"].all()


def test_saliency_lowering_the_level_keeps_rows_pruned():
    (_, first), (_, second) = _run_both(
        lambda: ref.SaliencyPruner({"sparsity_level": 0}),
        lambda: ps.SaliencyPruner({"sparsity_level": 0}), _mlp, [0.25, 0.0],
    )
    assert int((~second["0.weight"]).sum()) == 4
    assert torch.equal(first["0.weight"], second["0.weight"])


def test_lstm_saliency_masks_match_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(6, 8, num_layers=2))
    config = [{"tensor_fqn": f"0.weight_{k}_l{i}"} for i in range(2) for k in ("ih", "hh")]
    history = _run_both(
        lambda: ref.LSTMSaliencyPruner({"sparsity_level": 0.5}),
        lambda: ps.LSTMSaliencyPruner({"sparsity_level": 0.5}),
        lambda: copy.deepcopy(model), [0.25, 0.5], config,
    )
    for theirs, ours in history:
        for key in theirs:
            assert torch.equal(theirs[key], ours[key]), key
            assert int((~ours[key]).reshape(4, -1).sum(1).unique().numel()) == 1  # per gate


def test_fpgm_distance_is_the_references():
    torch.manual_seed(0)
    weight = torch.randn(7, 3, 2, 2)
    expected = ref.FPGMPruner()._compute_distance(weight)
    assert torch.allclose(ps.FPGMPruner()._compute_distance(weight), expected)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 12), cols=st.integers(1, 6), level=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000), fpgm=st.booleans(),
)
def test_property_masks_match_reference(rows, cols, level, seed, fpgm):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(cols, rows))
    config = [{"tensor_fqn": "0.weight"}]
    if fpgm:
        makers = (lambda: ref.FPGMPruner(level), lambda: ps.FPGMPruner(level))
    else:
        makers = (lambda: ref.SaliencyPruner({"sparsity_level": level}),
                  lambda: ps.SaliencyPruner({"sparsity_level": level}))
    ((theirs, ours),) = _run_both(*makers, lambda: copy.deepcopy(model), [level], config)
    assert torch.equal(theirs["0.weight"], ours["0.weight"])


def test_missing_sparsity_level_is_a_key_error_naming_the_tensor():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigKeyError, match=r"'0.weight' has no 'sparsity_level'") as info:
        ps.SaliencyPruner({}).prepare(model, CONFIG)
    assert isinstance(info.value, KeyError)
    assert not hasattr(model[0], "parametrizations")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_level_and_one_dimensional_weight_are_refused_before_any_change():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ConfigError, match=r"sparsity_level must be in \[0, 1\], got 1.5"):
        ps.SaliencyPruner({"sparsity_level": 1.5}).prepare(model, [{"tensor_fqn": "0.weight"}])
    config = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "1.weight"}]
    with pytest.raises(ConfigError, match=r"'1.weight' has shape \(4,\); structured pruning"):
        ps.SaliencyPruner({"sparsity_level": 0.5}).prepare(model, config)
    assert not hasattr(model[0], "parametrizations")


def test_lstm_saliency_needs_rows_in_four_gates():
    with pytest.raises(ConfigError, match=r"'0.weight' has 6 rows; expected a multiple of 4"):
        ps.LSTMSaliencyPruner({"sparsity_level": 0.5}).prepare(
            nn.Sequential(nn.Linear(3, 6)), [{"tensor_fqn": "0.weight"}]
        )


def test_fpgm_unknown_distance():
    with pytest.raises(UnsupportedError, match="dist must be 1, 2, None or a callable, got 3"):
        ps.FPGMPruner(dist=3)
    with pytest.raises(NotImplementedError):
        ps.FPGMPruner(dist="l2")


def test_mask_in_config_must_be_a_bool_row_mask():
    bad = {"tensor_fqn": "0.weight", "mask": torch.ones(16, 8, dtype=torch.bool)}
    with pytest.raises(ConfigError, match=r"bool tensor of shape \(16,\)"):
        ps.SaliencyPruner({"sparsity_level": 0.5}).prepare(_mlp(), [bad])
    mask = torch.tensor([True, False] * 8)
    pruner = ps.SaliencyPruner({"sparsity_level": 0.0})
    model = _mlp()
    pruner.prepare(model, [{"tensor_fqn": "0.weight", "mask": mask}])
    assert pruner.state["0.weight"]["mask"] is mask
    assert torch.equal(model[0].weight[1], torch.zeros(8))


def test_base_is_abstract_in_update_mask():
    with pytest.raises(TypeError, match="update_mask"):
        ps.BaseStructuredSparsifier({})


def test_auto_config_covers_lstm_weights_and_convs():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.LSTM(4, 8, num_layers=2), nn.Linear(8, 3))
    pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, None)
    assert sorted(g["tensor_fqn"] for g in pruner.groups) == [
        "0.weight", "1.weight_hh_l0", "1.weight_hh_l1", "1.weight_ih_l0", "1.weight_ih_l1",
        "2.weight",
    ]


def test_prepare_moves_biases_behind_a_bias_hook_as_the_reference():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3, bias=False), nn.LSTM(3, 2))
    config = [{"tensor_fqn": "0.weight", "prune_bias": False}, {"tensor_fqn": "1.weight"},
              {"tensor_fqn": "2.weight_ih_l0"}]
    ps.SaliencyPruner({"sparsity_level": 0.5}).prepare(model, config)
    first, second, lstm = model
    assert first.bias is None and isinstance(first._bias, nn.Parameter)
    assert first.prune_bias is False and not hasattr(second, "_bias")
    for module in (first, second):
        (hook,) = module._forward_hooks.values()
        assert isinstance(hook, ps.BiasHook)
        assert hook.param is module.parametrizations.weight[0]
    assert not lstm._forward_hooks
    assert lstm.parametrizations.bias_ih_l0[0].mask is lstm.parametrizations.weight_ih_l0[0].mask
    assert first.parametrizations.weight[0].mask.dtype == torch.bool
    assert first.parametrizations.weight[0].state_dict() == {}


class _DropFirstRow(ps.BaseStructuredSparsifier):
    """Like the reference tests' ImplementedSparsifier, but structured."""

    def update_mask(self, module, tensor_name, **kwargs):
        getattr(module.parametrizations, tensor_name)[0].mask[0] = False
        self.state[kwargs["tensor_fqn"]]["steps"] = self.state[kwargs["tensor_fqn"]].get(
            "steps", 0) + 1


def test_user_subclass_steps_and_prunes():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = _DropFirstRow({})
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    pruner.step()
    assert pruner.state["0.weight"]["steps"] == 2
    pruner.prune()
    assert model[0].out_features == 5 and model[2].in_features == 5


def test_pruners_copy_and_pickle_with_their_patterns_and_distance():
    pruner = ps.FPGMPruner(0.5, dist=1)
    clone = pickle.loads(pickle.dumps(pruner))  # prepared models only pickle via state_dict
    assert clone.patterns.keys() == pruner.patterns.keys() and clone.dist_fn.p == 1
    pruner.prepare(_convnet(), copy.deepcopy(CONFIG))
    pruner.step()
    twin = copy.deepcopy(pruner)
    assert twin.patterns == pruner.patterns
    assert torch.equal(twin.state["0.weight"]["mask"], pruner.state["0.weight"]["mask"])
    twin.prune()
    assert twin.model[0].out_channels == 5 and pruner.model[0].out_channels == 10
