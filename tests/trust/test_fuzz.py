"""Fuzzing: random configurations, valid or not, of the sparsifiers and schedulers.

Every call either works or raises a ``prunekit.PruneKitError`` with a message, and a
refused call leaves the model (parameters, buffers, parametrizations) and the
sparsifier's groups exactly as they were. Each property runs ``FAST`` examples in the
default run and ``LONG`` with ``-m slow``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit
from tests.trust._helpers import assert_same_model, model_snapshot

FAST, LONG = 75, 1000


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values three times in four, so many examples get past prepare to step."""
    return st.one_of(valid, valid, valid, invalid)


JUNK = st.one_of(st.none(), st.text(max_size=2), st.lists(st.integers(0, 3), max_size=2))
LEVEL = mostly(
    st.one_of(st.floats(0, 1), st.sampled_from([0, 1, 0.0, 1.0])),
    st.one_of(st.floats(-0.5, 1.5), st.floats(), st.integers(-2, 3), st.booleans(), JUNK),
)
BLOCK = mostly(
    st.tuples(st.integers(1, 4), st.integers(1, 4)),
    st.one_of(
        st.tuples(st.integers(-1, 5), st.integers(-1, 5)),
        st.lists(st.integers(1, 4), max_size=3),
        st.tuples(st.floats(0, 3), st.integers(1, 3)),
        JUNK,
    ),
)
ZEROS = mostly(
    st.one_of(st.none(), st.integers(0, 4)),
    st.one_of(st.integers(-2, 26), st.floats(0, 4), st.booleans(), JUNK),
)
NORM = mostly(st.sampled_from([None, 1, 2, torch.abs]), st.sampled_from([3, 0, -1, "l2"]))
FQN = mostly(
    st.sampled_from(["0.weight", "2.weight", "3.weight", "0.bias", ".2.weight"]),
    st.one_of(st.sampled_from(["1.weight", "x.weight", "", "0", "0.weight.x"]), JUNK),
)
MASK = st.builds(
    lambda shape, kind: torch.ones(shape, dtype=kind),
    st.sampled_from([(8, 6), (5, 8), (3,), (0, 6)]),
    st.sampled_from([torch.bool, torch.float32]),
)
ENTRY = mostly(
    st.fixed_dictionaries(
        {"tensor_fqn": FQN},
        optional={
            "sparsity_level": LEVEL,
            "sparse_block_shape": BLOCK,
            "zeros_per_block": ZEROS,
            "nearliness": mostly(st.sampled_from([-1, 0, 1, 3, 5]), st.integers(-2, 9) | LEVEL),
            "mask": MASK,
            "module_fqn": st.sampled_from(["0", "2", "nope"]),
        },
    ),
    JUNK,
)
CONFIG = mostly(st.none() | st.lists(ENTRY, max_size=3, unique_by=lambda e: str(e)), JUNK)


def fuzz_model() -> nn.Sequential:
    """Linear, activation, Linear and a 4-D conv weight; none of it needs a forward."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Conv2d(2, 3, 3))


def attempt(call: Callable[[], Any], model: nn.Module, sparsifier: Any, what: str) -> bool:
    """Run ``call``; on a prunekit error check that nothing changed. True if it worked.

    Outcomes are hypothesis events (``--hypothesis-show-statistics`` shows how many
    examples got how far)."""
    before = model_snapshot(model)
    groups = copy.copy(sparsifier.groups) if sparsifier is not None else None
    levels = [g.get("sparsity_level") for g in groups or []]
    try:
        call()
    except prunekit.PruneKitError as err:
        event(f"{what}: {type(err).__name__}")
        assert str(err), f"{type(err).__name__} without a message"
        assert isinstance(err, (ValueError, TypeError, KeyError, NotImplementedError))
        assert_same_model(before, model)
        if sparsifier is not None:
            assert sparsifier.groups == groups
            assert [g.get("sparsity_level") for g in groups] == levels
        return False
    event(f"{what}: ok")
    return True


def fuzz_variants(body: Callable[..., None], **strategies: Any) -> tuple[Any, Any]:
    """The same property twice: FAST examples by default, LONG under ``-m slow``."""
    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    fast = settings(max_examples=FAST, **common)(given(**strategies)(body))
    long = settings(max_examples=LONG, **common)(given(**strategies)(body))
    return fast, pytest.mark.slow(long)


def _sparsifier_life_cycle(data: st.DataObject) -> None:
    model = fuzz_model()
    kind = data.draw(st.sampled_from(["weight_norm", "nearly_diagonal"]))
    if kind == "weight_norm":
        kwargs = data.draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "sparsity_level": LEVEL,
                    "sparse_block_shape": BLOCK,
                    "zeros_per_block": ZEROS,
                    "norm": NORM,
                },
            )
        )
        factory: Any = prunekit.WeightNormSparsifier
    else:
        nearliness = mostly(st.sampled_from([-1, 0, 1, 3, 5]), st.integers(-2, 9) | LEVEL)
        kwargs = data.draw(st.fixed_dictionaries({}, optional={"nearliness": nearliness}))
        factory = prunekit.NearlyDiagonalSparsifier
    holder: list[Any] = []
    if not attempt(lambda: holder.append(factory(**kwargs)), model, None, "init"):
        return
    sparsifier = holder[0]
    config = data.draw(CONFIG)
    if not attempt(lambda: sparsifier.prepare(model, config), model, sparsifier, "prepare"):
        return
    for _ in range(data.draw(st.integers(0, 2))):
        attempt(sparsifier.step, model, sparsifier, "step")
    keep = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(["sparsity_level", "x"]))))
    per_layer = data.draw(
        st.one_of(st.none(), st.dictionaries(st.sampled_from(["0", "9"]), st.just(("tensor_fqn",))))
    )
    attempt(lambda: sparsifier.squash_mask(keep, per_layer), model, sparsifier, "squash")


test_sparsifier_life_cycle, test_sparsifier_life_cycle_long = fuzz_variants(
    _sparsifier_life_cycle, data=st.data()
)


SCHEDULER_ARGS = {
    "init_sl": LEVEL,
    "init_t": mostly(st.integers(0, 5), st.one_of(st.integers(-3, -1), st.floats(), JUNK)),
    "delta_t": mostly(st.integers(1, 4), st.one_of(st.integers(-2, 0), st.floats(), JUNK)),
    "total_t": mostly(st.integers(1, 6), st.one_of(st.integers(-2, 0), st.floats(), JUNK)),
    "initially_zero": mostly(st.booleans(), JUNK),
    "last_epoch": mostly(st.integers(-1, 4), st.one_of(st.floats(), JUNK)),
}
LAMBDAS = st.sampled_from(
    [lambda e: e / 4, lambda e: -1.0, lambda e: float("nan"), lambda e: float("inf"), lambda e: 2]
)


def _scheduler_run(data: st.DataObject) -> None:
    model = fuzz_model()
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=data.draw(st.floats(0, 1)))
    sparsifier.prepare(model, None)
    if data.draw(st.booleans()):
        kwargs = data.draw(st.fixed_dictionaries({}, optional=SCHEDULER_ARGS))
        for key in ("init_sl", "delta_t"):  # per-group lists, sometimes of the wrong length
            if key in kwargs and data.draw(st.booleans()):
                kwargs[key] = [kwargs[key]] * data.draw(st.integers(1, 3))
        factory: Any = prunekit.CubicSL
    else:
        lambdas = st.one_of(LAMBDAS, st.lists(LAMBDAS, max_size=3), JUNK)
        kwargs = {"sl_lambda": data.draw(lambdas)}
        factory = prunekit.LambdaSL
    holder: list[Any] = []
    if not attempt(
        lambda: holder.append(factory(sparsifier, **kwargs)), model, sparsifier, "scheduler"
    ):
        return
    for _ in range(data.draw(st.integers(1, 4))):
        attempt(sparsifier.step, model, sparsifier, "step")
        holder[0].step()
        for group in sparsifier.groups:
            assert 0 <= group["sparsity_level"] <= 1, group["sparsity_level"]


test_scheduler_run, test_scheduler_run_long = fuzz_variants(_scheduler_run, data=st.data())


def _corrupt(state_dict: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """One random corruption of a valid sparsifier state_dict."""
    sd = copy.deepcopy(state_dict)
    how = data.draw(st.sampled_from(["drop", "shape", "values", "type", "fqn", "group", "level"]))
    fqn = data.draw(st.sampled_from(sorted(sd["state"])))
    if how == "drop":
        del sd[data.draw(st.sampled_from(["state", "groups"]))]
    elif how == "shape":
        sd["state"][fqn]["mask"] = torch.ones(data.draw(st.sampled_from([(1,), (8, 5), (0,)])))
    elif how == "values":
        sd["state"][fqn]["mask"] = torch.full(sd["state"][fqn]["mask"].shape, 0.5)
    elif how == "type":
        sd["state"][fqn]["mask"] = data.draw(JUNK)
    elif how == "fqn":
        sd["state"]["nope.weight"] = sd["state"].pop(fqn)
        sd["groups"][0]["tensor_fqn"] = data.draw(FQN)
    elif how == "group":
        sd["groups"][0] = data.draw(JUNK | st.just({}))
    else:
        sd["groups"][0]["sparsity_level"] = data.draw(LEVEL)
    return sd


def _load_state_dict(data: st.DataObject) -> None:
    source, target = fuzz_model(), fuzz_model()
    sparsifier = prunekit.WeightNormSparsifier(sparse_block_shape=(1, 2))
    sparsifier.prepare(source, None)
    sparsifier.step()
    corrupted = _corrupt(sparsifier.state_dict(), data)
    fresh = prunekit.WeightNormSparsifier(sparse_block_shape=(1, 2))
    if data.draw(st.booleans()):
        fresh.prepare(target, None)
    strict = data.draw(st.booleans())
    load = lambda: fresh.load_state_dict(corrupted, strict=strict, model=target)  # noqa: E731
    attempt(load, target, fresh, "load_state_dict")


test_load_state_dict, test_load_state_dict_long = fuzz_variants(_load_state_dict, data=st.data())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"init_t": None}, prunekit.ConfigTypeError, "group 0: init_t must be a number, got None"),
        ({"total_t": "9"}, prunekit.ConfigTypeError, "total_t must be a number, got '9'"),
        ({"delta_t": float("inf")}, prunekit.ConfigError, "delta_t must be finite, got inf"),
        ({"init_sl": 1.5}, prunekit.ConfigError, r"init_sl must be in \[0, 1\], got 1.5"),
        ({"initially_zero": 1}, prunekit.ConfigTypeError, "initially_zero must be a bool, got 1"),
        ({"last_epoch": None}, prunekit.ConfigTypeError, "last_epoch must be an int, got None"),
    ],
)
def test_cubic_sl_checks_types_before_touching_the_sparsifier(kwargs, error, message) -> None:
    """Found by the fuzzer: these used to fail inside the first step() with a TypeError,
    after the sparsifier's step had been wrapped and its levels written."""
    model = fuzz_model()
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.7)
    sparsifier.prepare(model, None)
    step = sparsifier.step
    with pytest.raises(error, match=message):
        prunekit.CubicSL(sparsifier, **kwargs)
    assert sparsifier.step == step
    assert [g["sparsity_level"] for g in sparsifier.groups] == [0.7, 0.7]


def test_cubic_sl_tiny_and_underflowing_spans() -> None:
    """Found by the fuzzer: total_t=2.3e-234 overflowed the cube (OverflowError) in step();
    a product of spans that underflows to 0 divided by zero."""
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.7)
    sparsifier.prepare(fuzz_model(), None)
    with pytest.raises(prunekit.ConfigError, match="non-zero product"):
        prunekit.CubicSL(sparsifier, delta_t=1e-200, total_t=1e-200)
    scheduler = prunekit.CubicSL(sparsifier, init_sl=0.1, delta_t=1, total_t=2.3e-234)
    for _ in range(3):
        sparsifier.step()
        scheduler.step()
    assert scheduler.get_last_sl() == [0.7, 0.7]
    assert prunekit.CubicSL.sparsity_compute_fn(0.1, 0.7, -5, 0, 1, 4) == 0.1
