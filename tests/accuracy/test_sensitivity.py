"""sensitivity_scan prunes one layer at a time and always undoes it; allocate meets targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError, ConfigTypeError, FqnError


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _zeros_in(name: str):
    """An eval_fn whose metric is minus the zero count of one layer: exact expectations."""
    return lambda m: -float((m.get_submodule(name).weight == 0).sum())


def test_scan_values_and_the_model_is_restored() -> None:
    model = _model()
    snap = _snapshot(model)
    table = prunekit.sensitivity_scan(model, _zeros_in("2"), levels=(0.5, 0.25))
    assert table.levels == (0.25, 0.5)
    assert table.baseline == 0.0
    assert table.metrics["2"] == [-256.0, -512.0]  # 1024 weights
    assert table.metrics["0"] == [0.0, 0.0]
    assert table.sizes == {"0": 256, "2": 1024, "4": 128}
    assert table.drops("2") == [256.0, 512.0]
    assert _same(model, snap)


def test_table_prints_serialises_and_plots(tmp_path) -> None:
    table = prunekit.sensitivity_scan(_model(), _zeros_in("0"), levels=(0.5,), layers=["0", "4"])
    text = str(table)
    assert "layer" in text and "50%" in text and "-128" in text
    assert table.to_dict() == {"levels": [0.5], "baseline": 0.0,
                               "metrics": {"0": [-128.0], "4": [0.0]},
                               "sizes": {"0": 256, "4": 128}, "higher_is_better": True}
    path = tmp_path / "scan.png"
    table.plot(str(path))
    assert path.stat().st_size > 1000


def test_an_eval_fn_that_raises_leaves_the_model_as_it_was() -> None:
    model = _model()
    snap = _snapshot(model)
    calls = []

    def eval_fn(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        prunekit.sensitivity_scan(model, eval_fn)
    assert _same(model, snap)


@pytest.mark.parametrize("value", ["0.9", None, float("nan"), torch.ones(2), True])
def test_an_eval_fn_returning_a_non_number_is_refused(value: object) -> None:
    model = _model()
    snap = _snapshot(model)
    calls = []

    def eval_fn(m: nn.Module) -> object:
        calls.append(1)
        return 1.0 if len(calls) == 1 else value

    with pytest.raises(ConfigTypeError, match=r"eval_fn must return a number, got .* at 30%"):
        prunekit.sensitivity_scan(model, eval_fn)
    assert _same(model, snap)


def test_tensor_metrics_are_accepted() -> None:
    table = prunekit.sensitivity_scan(_model(), lambda m: torch.tensor(2.0), levels=(0.5,))
    assert table.metrics["4"] == [2.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layers": ["0", "lin"]}, FqnError, "layer 'lin' is not a Linear/Conv module"),
        ({"layers": "0"}, ConfigTypeError, "layers must be a list of module names"),
        ({"levels": (0.5, 1.0)}, ConfigError, "levels must be numbers in (0, 1)"),
        ({"levels": ()}, ConfigError, "levels must be numbers in (0, 1), got ()"),
        ({"eval_fn": 3}, ConfigTypeError, "eval_fn must be callable, got int"),
    ],
)
def test_bad_input(kwargs: dict, error: type, message: str) -> None:
    args = {"eval_fn": lambda m: 1.0, **kwargs}
    with pytest.raises(error) as info:
        prunekit.sensitivity_scan(_model(), **args)
    assert message in str(info.value)


def _table() -> prunekit.SensitivityTable:
    # layer "a" is fragile, "b" robust; "b" is twice as big
    return prunekit.SensitivityTable(
        levels=(0.3, 0.5, 0.7, 0.9), baseline=90.0,
        metrics={"a": [85.0, 70.0, 50.0, 20.0], "b": [90.0, 89.9, 89.5, 88.0]},
        sizes={"a": 100, "b": 200})


@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_allocate_meets_the_target_and_spares_the_fragile_layer(target: float) -> None:
    levels = prunekit.allocate(_table(), target)
    assert (levels["a"] * 100 + levels["b"] * 200) / 300 == pytest.approx(target)
    assert levels["a"] < levels["b"] <= 0.9


def test_allocate_honours_bounds() -> None:
    levels = prunekit.allocate(_table(), 0.5, min_level={"a": 0.3}, max_level=0.6)
    assert levels["a"] >= 0.3 - 1e-9 and levels["b"] <= 0.6 + 1e-9
    assert (levels["a"] * 100 + levels["b"] * 200) / 300 == pytest.approx(0.5)


def test_allocate_lower_is_better_metrics() -> None:
    table = _table()
    table.higher_is_better = False
    table.metrics = {"a": [1.0, 1.1, 1.2, 1.3], "b": [1.0, 3.0, 6.0, 9.0]}
    table.baseline = 1.0
    levels = prunekit.allocate(table, 0.5)
    assert levels["a"] > levels["b"]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((0.95,), ConfigError, "global target 0.95 cannot be met"),
        ((0.5, None, 0.95), ConfigError, "above the highest scanned level 0.9"),
        ((0.5, {"c": 0.1}), ConfigError, "min_level names unknown layers ['c']"),
        ((-0.1,), ConfigError, "target must be a level in [0, 1], got -0.1"),
    ],
)
def test_allocate_bad_input(args: tuple, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        prunekit.allocate(_table(), *args)
    assert message in str(info.value)


def test_allocate_wants_a_table() -> None:
    with pytest.raises(ConfigTypeError, match="scan must be a SensitivityTable, got dict"):
        prunekit.allocate({}, 0.5)
