import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch.ao import pruning as ref

import prunekit
from prunekit import ConfigError, ConfigTypeError, CubicSL, LambdaSL, StateDictError
from tests.helpers import MLP


def _pair(level=0.8):
    ours, theirs = prunekit.WeightNormSparsifier(level), ref.WeightNormSparsifier(level)
    ours.prepare(MLP(), None)
    theirs.prepare(MLP(), None)
    return ours, theirs


def _levels(scheduler, sparsifier, epochs):
    out = []
    for _ in range(epochs):
        sparsifier.step()
        scheduler.step()
        out.append(scheduler.get_last_sl())
    return out


@settings(max_examples=40, deadline=None)
@given(
    init_sl=st.floats(0, 0.5),
    target=st.floats(0.5, 1),
    init_t=st.integers(0, 5),
    delta_t=st.integers(1, 4),
    total_t=st.integers(1, 6),
    initially_zero=st.booleans(),
)
def test_cubic_matches_reference_when_increasing(
    init_sl, target, init_t, delta_t, total_t, initially_zero
):
    ours, theirs = _pair(target)
    kwargs = dict(
        init_sl=init_sl,
        init_t=init_t,
        delta_t=delta_t,
        total_t=total_t,
        initially_zero=initially_zero,
    )
    a, b = CubicSL(ours, **kwargs), ref.CubicSL(theirs, **kwargs)
    assert a.get_last_sl() == b.get_last_sl() and a._step_count == b._step_count == 1
    assert _levels(a, ours, 30) == _levels(b, theirs, 30)
    assert [g["sparsity_level"] for g in ours.groups] == [
        g["sparsity_level"] for g in theirs.groups
    ]


def test_cubic_reproduces_the_documented_curve():
    sparsifier = prunekit.WeightNormSparsifier(0.8)
    sparsifier.prepare(MLP(), None)
    sched = CubicSL(sparsifier, init_sl=0.1, init_t=3, delta_t=2, total_t=5, initially_zero=True)
    levels = [round(sched.get_last_sl()[0], 4)]
    levels += [round(lv[0], 4) for lv in _levels(sched, sparsifier, 15)]
    assert levels == [
        0,
        0,
        0,
        0.1,
        0.2897,
        0.4416,
        0.5599,
        0.6488,
        0.7125,
        0.7552,
        0.7811,
        0.7944,
        0.7993,
        0.8,
        0.8,
        0.8,
    ]


def test_cubic_decreasing_schedule_works():
    """Reference bug 1: 0.8 -> 0.2 stays at 0.8 forever."""
    sparsifier = prunekit.WeightNormSparsifier(0.2)
    sparsifier.prepare(MLP(), None)
    sched = CubicSL(sparsifier, init_sl=0.8, delta_t=1, total_t=4)
    levels = [lv[0] for lv in _levels(sched, sparsifier, 6)]
    assert levels[0] < 0.8 and levels == sorted(levels, reverse=True) and levels[-1] == 0.2


def test_lambda_matches_reference_and_clamps():
    ours, theirs = _pair(0.5)
    a, b = LambdaSL(ours, lambda e: e / 10), ref.LambdaSL(theirs, lambda e: e / 10)
    assert _levels(a, ours, 5) == _levels(b, theirs, 5)
    ours, theirs = _pair(0.5)
    a, b = LambdaSL(ours, lambda e: 5 * e), ref.LambdaSL(theirs, lambda e: 5 * e)
    ours_levels, ref_levels = _levels(a, ours, 3), _levels(b, theirs, 3)
    assert ref_levels[-1][0] > 1  # the reference's bug 2
    assert ours_levels[-1] == [1.0, 1.0, 1.0]
    a2 = LambdaSL(ours, lambda e: -1.0)
    assert a2.get_last_sl() == [0.0, 0.0, 0.0]


def test_per_group_lists_and_state_dict_round_trip():
    sparsifier = prunekit.WeightNormSparsifier(0.6)
    sparsifier.prepare(MLP(), None)
    sched = CubicSL(sparsifier, init_sl=[0.0, 0.1, 0.2], delta_t=1, total_t=[2, 3, 4])
    assert sched.init_sl == [0.0, 0.1, 0.2] and sched.delta_t == [1, 1, 1]
    _levels(sched, sparsifier, 2)
    state = sched.state_dict()
    assert "sparsifier" not in state and state["last_epoch"] == 2
    other = CubicSL(sparsifier, delta_t=1, total_t=9)
    other.load_state_dict(state)
    assert other.total_t == [2, 3, 4] and other.last_epoch == 2


def test_warns_when_scheduler_steps_before_sparsifier():
    sparsifier = prunekit.WeightNormSparsifier(0.5)
    sparsifier.prepare(MLP(), None)
    sched = LambdaSL(sparsifier, lambda e: 1.0)
    with pytest.warns(UserWarning, match=r"before `sparsifier.step\(\)`"):
        sched.step()
    sparsifier = prunekit.WeightNormSparsifier(0.5)
    sparsifier.prepare(MLP(), None)
    sched = LambdaSL(sparsifier, lambda e: 1.0)
    sparsifier.step()
    assert sparsifier._step_count == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()
    with pytest.warns(UserWarning, match="get_last_sl"):
        sched.get_sl()


def test_bad_scheduler_input():
    with pytest.raises(
        ConfigTypeError, match=r"Linear is not an instance of prunekit\.BaseSparsifier"
    ):
        CubicSL(torch.nn.Linear(2, 2))
    diag = prunekit.NearlyDiagonalSparsifier(3)
    diag.prepare(MLP(), None)
    with pytest.raises(StateDictError, match="has no 'sparsity_level'"):
        CubicSL(diag)
    sparsifier = prunekit.WeightNormSparsifier(0.5)
    sparsifier.prepare(MLP(), None)
    with pytest.raises(ConfigError, match="Expected variable of length 3, but got 2"):
        CubicSL(sparsifier, init_sl=[0.1, 0.2])
    with pytest.raises(ConfigError, match="delta_t and total_t must be positive"):
        CubicSL(sparsifier, total_t=0)
    with pytest.raises(ConfigError, match="expected 3 sl_lambdas"):
        LambdaSL(sparsifier, [lambda e: 1.0])
    with pytest.raises(ConfigTypeError, match=r"sl_lambda\[0\] must be callable"):
        LambdaSL(sparsifier, 0.5)
    assert all(g["sparsity_level"] == 0.5 for g in sparsifier.groups)
