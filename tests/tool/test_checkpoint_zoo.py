"""Save/load on every model of the structured-pruning zoo: dense, and shrunk by a plan."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.tool.checkpoint import read_structure, record_plan

engine = pytest.importorskip("prunekit.structured.engine")
zoo = pytest.importorskip("tests.structured.zoo")
MODELS = zoo.small_zoo()


def _assert_identical(model: torch.nn.Module, loaded: torch.nn.Module, x: torch.Tensor) -> None:
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_round_trip(name, tmp_path):
    factory, example = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    prunekit.save(model, tmp_path / name)
    _assert_identical(model, prunekit.load(factory, tmp_path / name), example())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_round_trip_replays_the_plan(name, tmp_path):
    factory, example = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = example()
    plan = engine.prune(model, x, ratio=0.5)
    plan.apply()
    record_plan(model, plan.to_dict())
    prunekit.save(model, tmp_path / name)
    assert read_structure(tmp_path / name)["plans"][0]["slices"]
    _assert_identical(model, prunekit.load(factory, tmp_path / name), x)
