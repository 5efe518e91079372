"""Pickle-free checkpoints: bit-identical round trips, structural replay, refusals."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit
from prunekit.errors import ConfigError, ConfigTypeError, StateDictError, StateError
from prunekit.tool.checkpoint import STRUCTURE, WEIGHTS, read_structure, record_plan
from prunekit.tool.digits import DigitsCNN


def _shrink_linear(model: nn.Sequential, index: int, keep: int) -> None:
    """A hand-made structural change: keep the first ``keep`` outputs of layer ``index``."""
    layer, nxt = model[index], model[index + 2]
    layer.weight = nn.Parameter(layer.weight.detach()[:keep].clone())
    layer.bias = nn.Parameter(layer.bias.detach()[:keep].clone())
    layer.out_features = keep
    nxt.weight = nn.Parameter(nxt.weight.detach()[:, :keep].clone())
    nxt.in_features = keep


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.LayerNorm(4))


def test_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    model.features[1].running_mean.normal_()
    prunekit.save(model, tmp_path / "ckpt")
    loaded = prunekit.load(DigitsCNN, tmp_path / "ckpt").eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [STRUCTURE, WEIGHTS]


def test_hand_shrunk_model_is_replayed(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    _shrink_linear(model, 0, 3)
    prunekit.save(model, tmp_path / "c")
    structure = read_structure(tmp_path / "c")
    assert structure["modules"]["0"]["attrs"]["out_features"] == 3
    assert structure["modules"]["2"]["tensors"]["weight"]["shape"] == [4, 3]
    loaded = prunekit.load(_mlp, tmp_path / "c")
    assert (loaded[0].out_features, loaded[2].in_features) == (3, 3)
    x = torch.randn(7, 6)
    assert torch.equal(loaded(x), model(x))


def test_structured_plan_is_recorded_and_replayed(tmp_path):
    engine = pytest.importorskip("prunekit.structured.engine")
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    plan = engine.prune(model, (x[:1],), ratio=0.5)
    plan.apply()
    record_plan(model, plan.to_dict())
    prunekit.save(model, tmp_path / "c")
    assert read_structure(tmp_path / "c")["plans"][0]["format"] == "prunekit.structured.plan"
    loaded = prunekit.load(DigitsCNN(), tmp_path / "c").eval()
    assert loaded.features[0].out_channels == model.features[0].out_channels == 16
    assert torch.equal(loaded(x), model(x))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    def tied() -> nn.Sequential:
        model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        model[1].weight = model[0].weight
        return model

    model = tied()
    prunekit.save(model, tmp_path / "c")
    assert read_structure(tmp_path / "c")["aliases"] == {"1.weight": "0.weight"}
    loaded = prunekit.load(tied, tmp_path / "c")
    assert loaded[1].weight is loaded[0].weight
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_load_never_unpickles(tmp_path, monkeypatch):
    model = _mlp()
    prunekit.save(model, tmp_path / "c")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = prunekit.load(_mlp, tmp_path / "c")
    assert torch.equal(loaded[0].weight, model[0].weight)
    assert b"\x80\x04" not in (tmp_path / "c" / STRUCTURE).read_bytes()


def test_save_refuses_parametrized_models_and_existing_paths(tmp_path):
    model = _mlp()
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, config=None)
    with pytest.raises(StateError, match=r"module '0' still has parametrizations on weight"):
        prunekit.save(model, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    sparsifier.squash_mask()
    prunekit.save(model, tmp_path / "c")
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        prunekit.save(model, tmp_path / "c")
    prunekit.save(model, tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging left behind


def test_load_errors_name_the_problem(tmp_path):
    model = _mlp()
    prunekit.save(model, tmp_path / "c")
    with pytest.raises(StateDictError, match=r"module '0' is Embedding in the fresh model"):
        prunekit.load(lambda: nn.Sequential(nn.Embedding(6, 8), nn.ReLU(), nn.Linear(8, 4),
                                            nn.LayerNorm(4)), tmp_path / "c")
    with pytest.raises(StateDictError, match=r"modules \['3'\] that the fresh model lacks"):
        prunekit.load(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
                      tmp_path / "c")
    with pytest.raises(ConfigError, match="is not a prunekit checkpoint"):
        prunekit.load(_mlp, tmp_path)
    with pytest.raises(ConfigTypeError, match="factory returned int"):
        prunekit.load(lambda: 3, tmp_path / "c")
    with pytest.raises(ConfigTypeError, match=r"expected an nn.Module or a callable"):
        prunekit.load("model", tmp_path / "c")


def test_corrupt_files_are_one_line_errors(tmp_path):
    prunekit.save(_mlp(), tmp_path / "c")
    (tmp_path / "c" / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match=r"cannot read .*weights.safetensors"):
        prunekit.load(_mlp, tmp_path / "c")
    (tmp_path / "c" / STRUCTURE).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ConfigError, match="has format 'other/9'; expected 'prunekit-checkpoint/1'"):
        prunekit.load(_mlp, tmp_path / "c")


def test_failed_load_leaves_a_given_model_unchanged(tmp_path):
    small = _mlp()
    _shrink_linear(small, 0, 3)
    prunekit.save(small, tmp_path / "c")
    structure = read_structure(tmp_path / "c")
    structure["modules"]["2"]["tensors"]["weight"]["shape"] = [4, 5]  # disagrees with weights
    (tmp_path / "c" / STRUCTURE).write_text(json.dumps(structure))
    target = _mlp()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(StateDictError, match=r"tensor '2.weight' has shape \[4, 3\]"):
        prunekit.load(target, tmp_path / "c")
    assert target[0].out_features == 8
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_record_plan_needs_json():
    with pytest.raises(ConfigTypeError, match="not JSON-serialisable"):
        record_plan(_mlp(), {"tensor": torch.ones(1)})


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(2, 9), min_size=2, max_size=4), data=st.data())
def test_any_hand_shrunk_mlp_round_trips(widths, data, tmp_path_factory):
    def build() -> nn.Sequential:
        layers: list[nn.Module] = []
        for a, b in zip([5, *widths[:-1]], widths, strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], 3))

    torch.manual_seed(0)
    model = build()
    for i in range(len(widths)):
        _shrink_linear(model, 2 * i, data.draw(st.integers(1, model[2 * i].out_features)))
    folder = tmp_path_factory.mktemp("ckpt") / "c"
    prunekit.save(model, folder)
    loaded = prunekit.load(build, folder)
    x = torch.randn(4, 5)
    assert torch.equal(loaded(x), model(x))
    assert [m.out_features for m in loaded if isinstance(m, nn.Linear)] == \
        [m.out_features for m in model if isinstance(m, nn.Linear)]
