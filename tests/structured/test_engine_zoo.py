"""Equivalence on the zoo: ratio 0 changes nothing; at ratio > 0 the shrunk model equals
the masked one, still trains, exports, and a saved plan replays on a fresh copy."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunekit.structured.engine import PrunePlan, prune
from tests.structured.zoo import check_equivalent, small_zoo

ZOO = small_zoo()


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make_model, make_input = ZOO[name]
    return make_model().eval(), make_input()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ratio_zero_changes_nothing(name: str) -> None:
    model, x = _build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prune(model, x, ratio=0.0)
    assert plan.slices == []
    assert plan.totals["params_after"] == plan.totals["params_before"]
    plan.apply()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_shrunk_equals_masked_and_trains_and_exports(name: str) -> None:
    model, x = _build(name)
    out_shape = model(x).shape
    plan = check_equivalent(model, x, ratio=0.5)
    assert plan.totals["params_after"] < 0.6 * plan.totals["params_before"]
    assert plan.totals["macs_after"] < 0.6 * plan.totals["macs_before"]
    assert sum(p.numel() for p in model.parameters()) == plan.totals["params_after"]
    model.train()
    out = model(x)
    assert out.shape == out_shape  # output layers keep their width
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    model.eval()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "vit", "lstm"])
def test_plan_json_round_trip_replays_on_fresh_copy(name: str) -> None:
    model, x = _build(name)
    twin = copy.deepcopy(model)
    plan = prune(model, x, ratio=0.3)
    data = json.loads(json.dumps(plan.to_dict()))
    plan.apply()
    PrunePlan.from_dict(twin, data).apply()
    assert {k: v.shape for k, v in twin.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    torch.testing.assert_close(twin(x), model(x))


def test_print_shows_groups_kept_channels_and_savings() -> None:
    model, x = _build("resnet18")
    plan = prune(model, x, ratio=0.5)
    text = str(plan)
    assert text.startswith("PrunePlan (not applied):")
    assert f"{len(plan.groups)} groups" in text
    first = plan.groups[0]
    assert f"group {first.index}: {first.width} -> {len(first.kept)} channels" in text
    assert "stem.0.weight[0]" in text
    assert all(g.params_saved > 0 and g.macs_saved > 0 for g in plan.groups)
    residual = next(g for g in plan.groups if "stem.0.weight[0]" in g.members)
    assert {
        "stages.0.conv2.weight[0]",
        "stages.1.conv2.weight[0]",
        "stages.2.conv1.weight[1]",
        "stages.2.down.0.weight[1]",
    } <= set(residual.members)  # stem + stage-1 residual
