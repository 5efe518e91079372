"""Global budgets: LAMP scores, water-filling with bounds, parity with global magnitude."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune as tprune

from prunekit.accuracy.allocation import global_levels, lamp_scores
from prunekit.errors import ConfigError, ConfigTypeError


def test_lamp_scores_by_hand() -> None:
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    # sorted squares 0.25, 1, 4, 9; tails 14.25, 14, 13, 9
    expected = torch.tensor([[1 / 14, 4 / 13], [1.0, 0.25 / 14.25]])
    assert torch.allclose(lamp_scores(w), expected)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 50), st.floats(0.01, 100.0))
def test_lamp_orders_like_magnitude_and_tops_at_one(n: int, scale: float) -> None:
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    scores = lamp_scores(w)
    assert float(scores.max()) == pytest.approx(1.0)
    assert torch.equal(torch.argsort(scores), torch.argsort(w.abs()))
    assert torch.allclose(lamp_scores(w * 7.0), scores, atol=1e-6)  # scale-free


def _layers(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 6, generator=g), "b": torch.randn(30, generator=g) * 0.1,
            "c": torch.randn(4, 3, 3, generator=g) * 3}


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000), st.floats(0.0, 1.0), st.sampled_from(["magnitude", "lamp"]))
def test_levels_meet_the_global_target(seed: int, target: float, score: str) -> None:
    weights = _layers(seed)
    levels = global_levels(weights, target, score)
    pruned = sum(levels[n] * w.numel() for n, w in weights.items())
    assert pruned == pytest.approx(round(target * 114))
    assert all(0 <= v <= 1 for v in levels.values())


def test_magnitude_matches_torch_global_unstructured() -> None:
    weights = _layers(3)
    modules = [torch.nn.Module() for _ in weights]
    for m, w in zip(modules, weights.values(), strict=True):
        m.weight = torch.nn.Parameter(w.clone())
    tprune.global_unstructured([(m, "weight") for m in modules], tprune.L1Unstructured,
                               amount=0.7)
    levels = global_levels(weights, 0.7)
    for m, (name, w) in zip(modules, weights.items(), strict=True):
        assert levels[name] * w.numel() == int((m.weight_mask == 0).sum())


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 1000), st.floats(0.2, 0.8))
def test_bounds_are_honoured(seed: int, target: float) -> None:
    weights = _layers(seed)
    levels = global_levels(weights, target, min_level={"a": 0.2}, max_level={"b": 0.5, "c": 0.9})
    assert levels["a"] >= 0.2 - 1e-9
    assert levels["b"] <= 0.5 + 1e-9
    assert levels["c"] <= 0.9 + 1e-9
    assert sum(levels[n] * w.numel() for n, w in weights.items()) == pytest.approx(
        round(target * 114))


def test_lamp_keeps_a_small_scale_layer_alive() -> None:
    weights = {"big": torch.randn(100, 100), "tiny": torch.randn(10, 10) * 1e-3}
    assert global_levels(weights, 0.95)["tiny"] == 1.0  # magnitude wipes it out
    assert global_levels(weights, 0.95, "lamp")["tiny"] < 1.0


def test_ties_split_exactly() -> None:
    weights = {"a": torch.ones(10), "b": torch.ones(10)}
    levels = global_levels(weights, 0.25)
    assert levels["a"] * 10 + levels["b"] * 10 == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"score": "l3"}, ConfigError, "score must be one of ('magnitude', 'lamp'), got 'l3'"),
        ({"target": 1.5}, ConfigError, "global target must be a level in [0, 1], got 1.5"),
        ({"max_level": {"zz": 0.5}}, ConfigError, "max_level names unknown layers ['zz']"),
        ({"min_level": "x"}, ConfigTypeError, "min_level must be a number or a dict"),
        ({"min_level": {"a": 2}}, ConfigError, "min_level['a'] must be a level in [0, 1], got 2"),
        ({"min_level": 0.6, "max_level": 0.4}, ConfigError, "min_level 0.6 is above max_level"),
        ({"max_level": 0.2}, ConfigError, "global target 0.5 cannot be met within the per-layer"),
    ],
)
def test_bad_input(kwargs: dict, error: type, message: str) -> None:
    args = {"target": 0.5, **kwargs}
    with pytest.raises(error) as info:
        global_levels(_layers(0), **args)
    assert message in str(info.value)
