"""Fuzzing ``prunekit.structured.prune`` with random small graphs: chains, residual adds
and concatenations of Linear/Conv2d, BatchNorm and activations, with random (sometimes
invalid) settings. Each either shrinks the model so that it still computes what the
masked model computes, or is refused with a prunekit error and leaves the model as it
was. ``FAST`` examples in the default run, ``LONG`` with ``-m slow``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit
from tests.structured.zoo import check_equivalent
from tests.trust._helpers import assert_same_model, model_snapshot

FAST, LONG = 15, 400
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "none": nn.Identity}


class Block(nn.Module):
    """One step of a random graph: ``chain`` (layer, norm, activation), ``residual``
    (x + two width-preserving layers) or ``concat`` (two layers side by side)."""

    def __init__(self, kind: str, conv: bool, cin: int, width: int, act: str, bn: bool) -> None:
        super().__init__()
        self.kind = kind
        out = cin if kind == "residual" else width

        def layer(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, 3, padding=1) if conv else nn.Linear(i, o)

        norm = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(out) if bn else nn.Identity()
        if kind == "concat":
            self.a, self.b = layer(cin, width), layer(cin, width)
            norm = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(2 * width) if bn else nn.Identity()
        else:
            self.a, self.b = layer(cin, width), layer(width, out)
        self.norm, self.act = norm, ACTIVATIONS[act]()
        self.out = 2 * width if kind == "concat" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "concat":
            return self.act(self.norm(torch.cat([self.a(x), self.b(x)], dim=1)))
        if self.kind == "residual":
            return x + self.norm(self.b(self.act(self.a(x))))
        return self.act(self.norm(self.b(self.act(self.a(x)))))


class RandomNet(nn.Module):
    def __init__(self, conv: bool, cin: int, blocks: list[dict[str, Any]], classes: int) -> None:
        super().__init__()
        layers, width = [], cin
        for spec in blocks:
            layers.append(Block(conv=conv, cin=width, **spec))
            width = layers[-1].out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, classes, 1) if conv else nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


BLOCK = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["chain", "residual", "concat"]),
        "width": st.integers(3, 8),
        "act": st.sampled_from(sorted(ACTIVATIONS)),
        "bn": st.booleans(),
    }
)
VALID = st.fixed_dictionaries(
    {"ratio": st.floats(0.3, 0.8)},
    optional={
        "importance": st.sampled_from(["l1", "l2"]),
        "round_to": st.sampled_from([None, 1, 2]),
        "min_channels": st.sampled_from([1, 2]),
        "global_pruning": st.booleans(),
    },
)
ANY = st.fixed_dictionaries(
    {"ratio": st.one_of(st.floats(0, 0.9), st.sampled_from([-0.1, 1.0, 1.5, float("nan")]))},
    optional={
        "importance": st.sampled_from(["l1", "l2", "bogus"]),
        "round_to": st.sampled_from([None, 1, 2, 3, 0, -1]),
        "min_channels": st.sampled_from([1, 2, 0, -1]),
        "global_pruning": st.booleans(),
    },
)
SETTINGS = st.one_of(VALID, VALID, VALID, ANY)  # most examples get as far as apply()


def _prune_random_graph(conv: bool, blocks: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = RandomNet(conv, 3, blocks, classes=4).eval()
    x = torch.randn(2, 3, 5, 5) if conv else torch.randn(4, 3)
    with torch.no_grad():
        for module in model.modules():  # non-trivial statistics, so BN is not a no-op
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    out_shape = model(x).shape
    before = model_snapshot(model)
    try:
        plan = check_equivalent(model, x, rtol=1e-4, **kwargs)
    except prunekit.PruneKitError as err:
        event(f"refused: {type(err).__name__}: {str(err)[:70]}")
        assert str(err)
        assert_same_model(before, model)
        return
    event("shrunk" if plan.slices else "unchanged")
    assert model(x).shape == out_shape
    assert sum(p.numel() for p in model.parameters()) == plan.totals["params_after"]


def _variants() -> tuple[Any, Any]:
    strategies = {"conv": st.booleans(), "blocks": st.lists(BLOCK, min_size=1, max_size=3)}
    common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    given_ = given(kwargs=SETTINGS, **strategies)
    fast = settings(max_examples=FAST, **common)(given_(_prune_random_graph))
    long = settings(max_examples=LONG, **common)(given_(_prune_random_graph))
    return fast, pytest.mark.slow(long)


test_prune_random_graph, test_prune_random_graph_long = _variants()
