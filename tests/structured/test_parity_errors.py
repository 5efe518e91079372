"""prune() refuses what it cannot do exactly, naming the node, and changes nothing; the
BiasHook leaves stored parameters alone; custom patterns and the pattern index work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.utils import MatchAllNode

import prunekit.structured as ps
from prunekit.errors import StateDictError, StateError, UnsupportedError
from prunekit.structured.patterns import PatternIndex


def _prepared(model: nn.Module, fqns, **group):
    pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, [{"tensor_fqn": f"{f}.weight", **group} for f in fqns])
    pruner.step()
    return pruner


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], prepared=()):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for fqn in prepared:
        assert hasattr(model.get_submodule(fqn), "parametrizations")


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) + x)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else self.b(-h)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class LinearNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class LSTMBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.norm, self.fc = nn.LSTM(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.norm(self.lstm(x)[0]))


CASES = {
    "residual add": (Residual, ["a"], r"along 'relu' \(relu\) → 'add' \(add\): node 'add'"),
    "data-dependent control flow": (DataDependent, ["a"], r"torch.fx could not trace DataDep"),
    "shared module": (Shared, ["a"], r"prepared layer 'a' is called 2 times"),
    "layernorm over pruned features": (LinearNorm, ["a"], r"'norm' \(LayerNorm\).*normalises"),
    "grouped conv consumer": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, groups=2)), ["0"],
        r"node '_1' \(Conv2d\) is a grouped convolution \(groups=2\)",
    ),
    "grouped conv producer": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1)), ["0"],
        r"prepared layer '0' is a grouped convolution \(groups=4\)",
    ),
    "flatten from dim 0": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(0),
                              nn.Linear(4, 2)), ["0"], r"\(start_dim, end_dim\)=\(0, -1\)",
    ),
    "batchnorm without running stats": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                              nn.Conv2d(4, 2, 1)), ["0"], r"'_1' \(BatchNorm2d\) after '0'",
    ),
    "batchnorm after an lstm": (LSTMBatchNorm, ["lstm"], r"node 'norm' \(BatchNorm1d\) after LSTM"),
    "lstm layers of different widths": (
        lambda: nn.Sequential(nn.LSTM(3, 4, num_layers=2)), ["0"], None,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_the_node_named_and_model_unchanged(name):
    make, fqns, message = CASES[name]
    model = make()
    if name == "batchnorm after an lstm":
        pruner = ps.LSTMSaliencyPruner({"sparsity_level": 0.5})
        pruner.prepare(model, [{"tensor_fqn": "lstm.weight_ih_l0"}])
    elif name.startswith("lstm"):
        mask = torch.tensor([True, False, True, True]).repeat(4)
        pruner = ps.SaliencyPruner({"sparsity_level": 0.0})
        pruner.prepare(model, [{"tensor_fqn": f"0.weight_{k}_l0", "mask": mask.clone()}
                               for k in ("ih", "hh")])
        message, fqns = r"LSTM '0' would keep \[3, 4\] hidden units per layer", ["0"]
    else:
        pruner = _prepared(model, fqns)
    before = _snapshot(model)
    with pytest.raises(UnsupportedError, match=message):
        pruner.prune()
    _assert_unchanged(model, before, fqns)


def test_prune_before_prepare():
    with pytest.raises(StateError, match=r"call prepare\(model, config\) first"):
        ps.SaliencyPruner({"sparsity_level": 0.5}).prune()


def test_bias_hook_masks_on_the_fly_and_leaves_the_stored_bias():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    bias = model[0].bias.detach().clone()
    pruner = _prepared(model, ["0"])
    mask = pruner.state["0.weight"]["mask"]
    out = model[0](torch.randn(3, 4))
    assert torch.equal(model[0]._bias, bias)  # the reference zeroed it in place here
    assert torch.equal(out[:, ~mask], torch.zeros_like(out[:, ~mask]))
    mask.fill_(True)  # un-pruning brings the bias back
    x = torch.randn(3, 4)
    assert torch.allclose(model[0](x), F.linear(x, model[0].weight, bias))


def test_bias_hook_channel_dim_for_sequences_and_convs():
    linear = nn.Linear(4, 6)
    _prepared(nn.Sequential(linear), ["0"], prune_bias=False)
    x = torch.randn(2, 5, 4)  # (batch, time, features): features are last
    assert torch.allclose(linear(x), F.linear(x, linear.weight, linear._bias))
    conv = nn.Conv1d(3, 4, 1)
    _prepared(nn.Sequential(conv), ["0"], prune_bias=False)
    x = torch.randn(3, 7)  # unbatched (channels, length)
    assert torch.allclose(conv(x), F.conv1d(x, conv.weight, conv._bias))


def test_custom_pattern_function_gets_the_matched_modules():
    seen = []

    def record(first, act, second):
        seen.append((first, act, second))
        ps.prune_linear_activation_linear(first, act, second)

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = ps.SaliencyPruner({"sparsity_level": 0.5}, patterns={
        (nn.Linear, nn.ReLU, MatchAllNode): record,
    })
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    x = torch.randn(2, 4)
    with torch.no_grad():
        masked = model(x)
        pruner.prune()
        assert torch.allclose(model(x), masked, atol=1e-6)
    assert seen == [(model[0], model[1], model[2])]


def test_custom_pattern_cannot_skip_a_batchnorm():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    pruner = ps.SaliencyPruner({"sparsity_level": 0.5},
                               patterns={(nn.Linear, nn.Linear): lambda a, b: None})
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    with pytest.raises(UnsupportedError, match=r"would skip node '_1' \(BatchNorm1d\)"):
        pruner.prune()


def test_pattern_index_lookup():
    index = PatternIndex(ps.default_patterns())
    fn = ps.prune_linear_activation_linear
    assert index.lookup((nn.Linear, F.relu, nn.Linear)) == (3, fn)
    assert index.lookup((nn.Linear, torch.relu, nn.Linear)) is None  # keys are canonical
    assert index.lookup((nn.Linear, nn.Linear, "output")) == (2, ps.prune_linear_linear)
    assert index.lookup((nn.Conv2d, F.relu, nn.Linear)) is None
    wild = PatternIndex({(nn.Linear, MatchAllNode, nn.Linear): fn})
    assert wild.lookup((nn.Linear, nn.Tanh, nn.Linear)) == (3, fn)


def test_prune_twice_is_a_no_op():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = _prepared(model, ["0"])
    pruner.prune()
    assert model[0].out_features == 3 and model[2].in_features == 3
    assert pruner.prune() is model and model[0].out_features == 3
    with pytest.raises(StateError, match=r"step: prune\(\) already removed the masks"):
        pruner.step()


def test_state_dict_round_trip_into_a_prepared_model():
    def prepared(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
        pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
        return model, pruner

    _, pruner = prepared(0)
    pruner.step()
    saved = pruner.state_dict()
    other_model, other = prepared(1)
    other.load_state_dict(saved)
    assert torch.equal(other.state["0.weight"]["mask"], pruner.state["0.weight"]["mask"])
    assert other.state["0.weight"]["mask"] is other_model[0].parametrizations.weight[0].mask
    bad = {"state": {"0.weight": {"mask": torch.ones(6, 4, dtype=torch.bool)}},
           "groups": saved["groups"]}
    with pytest.raises(StateDictError, match=r"row mask for '0.weight' has shape \(6, 4\), "
                                             r"expected \(6,\)"):
        other.load_state_dict(bad)
    with pytest.raises(StateDictError, match="has no FakeStructuredSparsity"):
        ps.SaliencyPruner({"sparsity_level": 0.5}).load_state_dict(
            saved, model=nn.Sequential(nn.Linear(4, 6)))


def test_squash_mask_bakes_rows_and_lstm_bias_masks():
    model = nn.Sequential(nn.LSTM(3, 4))
    mask = torch.tensor([True, False, True, True]).repeat(4)
    pruner = ps.SaliencyPruner({"sparsity_level": 0.0})
    pruner.prepare(model, [{"tensor_fqn": "0.weight_ih_l0", "mask": mask}])
    x = torch.randn(5, 1, 3)
    with torch.no_grad():
        masked = model(x)[0]
        pruner.squash_mask()
        assert torch.allclose(model(x)[0], masked)
    assert not hasattr(model[0], "parametrizations")
    assert torch.equal(model[0].bias_ih_l0[~mask], torch.zeros(4))


def test_load_state_dict_unknown_fqn_strict_and_lenient():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = _prepared(model, ["0"])
    saved = pruner.state_dict()
    saved["groups"].append({"tensor_fqn": "9.weight", "sparsity_level": 0.5})
    with pytest.raises(StateDictError, match=r"9\.weight"):
        pruner.load_state_dict(saved)
    pruner.load_state_dict(saved, strict=False)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["0.weight"]
