"""Bad input: a prunekit error that names the module/node/value, and the model unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError, FqnError, PruneKitError, StateError
from prunekit.structured.engine import CaptureError, PrunePlan, prune
from tests.helpers import assert_unchanged, snapshot
from tests.structured.zoo import ResNet, check_equivalent


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ResNet("basic", (1, 1), width=8, classes=5)


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        (
            DataDependent(),
            {"example_inputs": torch.randn(2, 4)},
            CaptureError,
            r"torch.fx could not trace DataDependent: .*control flow on tensor values",
        ),
        (
            _model(),
            {"example_inputs": torch.randn(1, 5, 16, 16)},
            CaptureError,
            r"module 'stem.0' .*expected input\[1, 5, 16, 16\] to have 3 channels",
        ),
        (_model(), {"example_inputs": (X, X)}, CaptureError, r"example_inputs do not run"),
        (
            _model(),
            {"example_inputs": X, "ratio": 1.0},
            ConfigError,
            r"ratio must be .*\[0, 1\), got 1.0",
        ),
        (_model(), {"example_inputs": X, "ratio": -0.1}, ConfigError, r"got -0.1"),
        (
            _model(),
            {"example_inputs": X, "ignored_layers": ["stages.0.conv"]},
            FqnError,
            r"'stages.0.conv' is not a module of the model; did you mean \[.*'stages.0.conv1'",
        ),
        (
            _model(),
            {"example_inputs": X, "ignored_layers": [nn.Linear(2, 2)]},
            FqnError,
            r"ignored layer Linear is not a submodule",
        ),
        (
            _model(),
            {"example_inputs": X, "round_to": 32},
            ConfigError,
            r"round_to=32 cannot be met by the group of width 8 "
            r"\(first member stem.0.weight\[0\]\)",
        ),
        (_model(), {"example_inputs": X, "round_to": 0}, ConfigError, r"round_to must be .* got 0"),
        (
            _model(),
            {"example_inputs": X, "importance": "l3"},
            ConfigError,
            r"unknown importance 'l3'; expected one of \['bn_scale', 'fpgm', 'l1', 'l2'",
        ),
        (_model(), {"example_inputs": X, "importance": 3}, ConfigTypeError, r"got int"),
        (
            _model(),
            {"example_inputs": X, "importance": "taylor"},
            ConfigError,
            r"stem.0.weight has no .grad; run loss.backward\(\)",
        ),
        (_model(), {"example_inputs": X, "min_channels": 0}, ConfigError, r"min_channels .* got 0"),
    ],
)
def test_bad_input_raises_and_leaves_model_unchanged(
    model: nn.Module, kwargs: dict, error: type[Exception], match: str
) -> None:
    model.train()
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        prune(model, **kwargs)
    assert isinstance(info.value, PruneKitError)
    assert_unchanged(before, model)
    assert model.training and all(m.training for m in model.modules())


def test_capture_keeps_batchnorm_statistics() -> None:
    model = _model().train()
    before = snapshot(model)
    prune(model, X, ratio=0.5)
    assert_unchanged(before, model)


def test_apply_twice_or_on_a_changed_model_refuses_without_changing_it() -> None:
    model = _model()
    plan = prune(model, X, ratio=0.5)
    data = plan.to_dict()
    plan.apply()
    before = snapshot(model)
    with pytest.raises(StateError, match="applied already"):
        plan.apply()
    with pytest.raises(
        StateError, match=r"plan entry stem.0.weight expects dim 0 of size 8 but .* \(4, 3, 7, 7\)"
    ):
        PrunePlan.from_dict(model, data).apply()
    assert_unchanged(before, model)
    with pytest.raises(ConfigError, match=r"not a version-1 prunekit\.structured\.plan"):
        PrunePlan.from_dict(model, {"format": "other"})


def test_a_model_neither_fx_nor_export_can_capture_names_both_reasons() -> None:
    """fx fails on the control flow, so torch.export is tried; it fails on the same
    data-dependent branch, and the error says why each one gave up."""
    model = DataDependent().train()
    before = snapshot(model)
    with pytest.raises(
        CaptureError,
        match=r"torch.fx could not trace DataDependent: TraceError: .*; torch.export "
        r"\(non-strict\) could not capture it either: \w+: .*control flow on tensor values",
    ):
        prune(model, torch.randn(2, 4), ratio=0.5)
    assert_unchanged(before, model)
    assert model.training


def test_an_ignored_untraceable_submodule_becomes_an_opaque_leaf() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.inner, self.b = nn.Linear(4, 4), DataDependent(), nn.Linear(4, 8)
            self.c = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(self.inner(self.a(x)))))

    torch.manual_seed(0)
    model = Outer()
    with pytest.raises(CaptureError, match=r"torch\.fx could not trace Outer"):
        prune(model, torch.randn(2, 4))
    check_equivalent(model, torch.randn(2, 4), ratio=0.5, ignored_layers=["inner"])
    assert (model.a.out_features, model.inner.fc.in_features, model.b.out_features) == (4, 4, 4)


def test_a_tied_tensor_cut_two_ways_is_refused_before_anything_changes() -> None:
    from prunekit.structured.engine.apply import Slice, apply_slices

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    before = snapshot(model)
    cuts = [Slice("0", "weight", 0, 4, (0, 1)), Slice("1", "weight", 0, 4, (2, 3))]
    with pytest.raises(StateError, match=r"1.weight cuts a tensor it shares .* differently"):
        apply_slices(model, cuts)
    assert_unchanged(before, model)
    apply_slices(model, [Slice("0", "weight", 0, 4, (0, 1))])  # the other name follows
    assert model[1].weight is model[0].weight and model[0].weight.shape == (2, 4)
