"""GlobalSparsifier: one budget over all tensors, schedules, bounds, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao import pruning as ao

import prunekit
from prunekit.errors import ConfigError, ConfigTypeError


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 32),
                         nn.Linear(32, 4))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _zeros(model: nn.Module) -> float:
    ws = _weights(model)
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize("score", ["magnitude", "lamp"])
def test_global_level_over_convs_and_linears(score: str) -> None:
    model = _model()
    s = prunekit.GlobalSparsifier(sparsity_level=0.8, score=score)
    s.prepare(model, None)
    s.step()
    assert sorted(s.levels) == ["0.weight", "2.weight", "3.weight"]
    assert _zeros(model) == pytest.approx(0.8, abs=1e-3)
    assert len(set(s.levels.values())) > 1  # the layers got different levels
    s.squash_mask()
    assert not hasattr(model[2], "parametrizations")
    assert _zeros(model) == pytest.approx(0.8, abs=1e-3)


def test_one_tensor_equals_the_reference_weight_norm_sparsifier() -> None:
    ours, ref = nn.Sequential(nn.Linear(16, 16)), nn.Sequential(nn.Linear(16, 16))
    ref.load_state_dict(ours.state_dict())
    s = prunekit.GlobalSparsifier(sparsity_level=0.6)
    s.prepare(ours, None)
    s.step()
    r = ao.WeightNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 1), zeros_per_block=1)
    r.prepare(ref, None)
    r.step()
    assert torch.equal(ours[0].weight != 0, ref[0].weight != 0)


def test_cubic_schedule_reaches_the_target_and_bounds_hold() -> None:
    model = _model()
    s = prunekit.GlobalSparsifier(sparsity_level=0.9, score="magnitude")
    s.prepare(model, [{"tensor_fqn": "0.weight", "max_level": 0.5},
                      {"tensor_fqn": "2.weight"}, {"tensor_fqn": "3.weight"}])
    sched = prunekit.CubicSL(s, init_sl=0.0, delta_t=1, total_t=4)
    s.step()
    seen = []
    for _ in range(5):
        sched.step()
        s.step()
        seen.append(_zeros(model))
    assert seen == sorted(seen)
    assert seen[-1] == pytest.approx(0.9, abs=1e-3)
    assert s.levels["0.weight"] <= 0.5


def test_infeasible_bounds_leave_the_masks_unchanged() -> None:
    model = _model()
    s = prunekit.GlobalSparsifier(sparsity_level=0.5, max_level=0.6)
    s.prepare(model, None)
    s.step()
    before = [w.detach().clone() for w in _weights(model)]
    for g in s.groups:
        g["sparsity_level"] = 0.9
    with pytest.raises(ConfigError, match=r"global target 0\.9 cannot be met"):
        s.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"score": "l1"}, ConfigError, "score must be one of ('magnitude', 'lamp'), got 'l1'"),
        ({"sparsity_level": 2.0}, ConfigError, "sparsity_level must be in [0, 1], got 2.0"),
        ({"min_level": "a"}, ConfigTypeError, "min_level must be a number in [0, 1], got 'a'"),
        ({"min_level": 0.7, "max_level": 0.2}, ConfigError, "min_level 0.7 is above max_level"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        prunekit.GlobalSparsifier(**kwargs)
    assert message in str(info.value)


def test_bad_group_bound_refused_before_prepare_changes_anything() -> None:
    model = _model()
    s = prunekit.GlobalSparsifier()
    with pytest.raises(ConfigError, match=r"'2\.weight'.*max_level must be in"):
        s.prepare(model, [{"tensor_fqn": "2.weight", "max_level": 3}])
    assert not hasattr(model[2], "parametrizations")
