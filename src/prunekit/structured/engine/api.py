"""``prune(model, example_inputs, ...)``: capture, group, score, select, plan."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.structured.engine.apply import AttrChange, Slice
from prunekit.structured.engine.capture import capture
from prunekit.structured.engine.channels.groups import ChannelGraph, Group, build_groups
from prunekit.structured.engine.channels.propagate import propagate
from prunekit.structured.engine.flops import count_macs, count_params
from prunekit.structured.engine.importance import Importance, get_importance
from prunekit.structured.engine.plan import GroupSummary, PrunePlan
from prunekit.structured.engine.select import check_round_to, class_scores, select

__all__ = ["prune"]


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    importance: str | Importance = "l2",
    ignored_layers: Iterable[str | nn.Module] = (),
    round_to: int | None = None,
    global_pruning: bool = False,
    min_channels: int = 1,
    prune_outputs: bool = False,
) -> PrunePlan:
    """Plan removing ``ratio`` of the channels of every group of coupled layers.

    Nothing changes until ``plan.apply()``. Graph outputs (unless ``prune_outputs``) and
    ``ignored_layers`` keep their width. ``global_pruning`` ranks channels across groups
    instead of per group; every group keeps at least ``min_channels``.

    >>> plan = prune(model, torch.randn(1, 3, 224, 224), ratio=0.5)  # doctest: +SKIP
    >>> print(plan)
    >>> plan.apply()
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    criterion = _check_args(model, ratio, importance, round_to, min_channels)
    ignored = _ignored_fqns(model, ignored_layers)
    graph, shapes = capture(model, inputs, frozenset(ignored))
    ctx = propagate(model, graph, shapes, ignored, prune_outputs=bool(prune_outputs))
    channels = build_groups(ctx)
    check_round_to(channels.groups, round_to or 1)
    scores = class_scores(model, channels, criterion)
    pruned = select(channels.groups, scores, ratio, round_to or 1, min_channels, global_pruning)
    settings = {
        "ratio": ratio,
        "importance": getattr(criterion, "name", type(criterion).__name__),
        "ignored_layers": sorted(ignored),
        "round_to": round_to,
        "global_pruning": global_pruning,
        "prune_outputs": bool(prune_outputs),
        "min_channels": min_channels,
    }
    plan = _make_plan(model, ctx.calls, channels, pruned, settings, sorted(ctx.inexact))
    plan.attrs = _attr_changes(ctx.attrs, channels, pruned)
    return plan


def _check_args(
    model: Any, ratio: Any, importance: Any, round_to: Any, min_channels: Any
) -> Importance:
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise ConfigError(f"round_to must be None or a positive int, got {round_to!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ConfigError(f"min_channels must be a positive int, got {min_channels!r}")
    return get_importance(importance)


def _ignored_fqns(model: nn.Module, layers: Iterable[str | nn.Module]) -> set[str]:
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    names = {m: n for n, m in model.named_modules()}
    known = set(names.values())
    out = set()
    for layer in layers:
        if isinstance(layer, nn.Module):
            if layer not in names:
                raise FqnError(
                    f"ignored layer {type(layer).__name__} is not a submodule of the model"
                )
            out.add(names[layer])
        elif layer in known:
            out.add(layer)
        else:
            close = difflib.get_close_matches(str(layer), sorted(known), n=3)
            raise FqnError(
                f"ignored layer {layer!r} is not a module of the model; did you mean {close}?"
            )
    return out


def _attr_changes(
    attrs: dict[tuple[str, str], tuple[int, np.ndarray]], channels: ChannelGraph, pruned: np.ndarray
) -> list[AttrChange]:
    """New values of the count attributes (``num_heads``...) the code's literals read."""
    changes = []
    for (owner, name), (old, ids) in sorted(attrs.items()):
        new = old - int(np.isin(channels.classes_of(ids), pruned).sum())
        if new != old:
            changes.append(AttrChange(owner, name, old, new))
    return changes


def _make_plan(
    model: nn.Module,
    calls: list[tuple[str, Any]],
    channels: ChannelGraph,
    pruned: np.ndarray,
    settings: dict[str, Any],
    inexact: list[str],
) -> PrunePlan:
    removed = np.zeros(channels.n_classes, dtype=bool)
    removed[pruned] = True
    slices, sizes = [], {}
    for key, member in channels.members.items():
        keep = np.nonzero(~removed[channels.member_classes[key]])[0]
        tensor = getattr(model.get_submodule(member.owner), member.name)
        size = tensor.shape[member.dim]
        if keep.size < size:
            slices.append(Slice(member.owner, member.name, member.dim, size, tuple(keep.tolist())))
            shape = list(sizes.get((member.owner, member.name), tensor.shape))
            shape[member.dim] = keep.size
            sizes[(member.owner, member.name)] = tuple(shape)
    totals = {
        "params_before": count_params(model, {}),
        "params_after": count_params(model, sizes),
        "macs_before": count_macs(model, calls, {}),
        "macs_after": count_macs(model, calls, sizes),
    }
    groups = [
        _summary(model, calls, channels, g, removed) for g in channels.groups if g.prunable.size
    ]
    sliced = {s.owner for s in slices}  # a norm whose width stays keeps its statistics
    return PrunePlan(model, slices, groups, totals, settings, [f for f in inexact if f in sliced])


def _summary(
    model: nn.Module,
    calls: list[tuple[str, Any]],
    channels: ChannelGraph,
    group: Group,
    removed: np.ndarray,
) -> GroupSummary:
    """What removing this group's channels alone would save (groups overlap in layers
    that read one group and write another, so these do not add up to the totals)."""
    in_group = np.zeros(channels.n_classes, dtype=bool)
    in_group[group.classes] = True
    sizes: dict[tuple[str, str], tuple[int, ...]] = {}
    for m in group.members:
        classes = channels.member_classes[m.key]
        gone = int((removed[classes] & in_group[classes]).sum())
        tensor = getattr(model.get_submodule(m.owner), m.name)
        shape = list(sizes.get((m.owner, m.name), tensor.shape))
        shape[m.dim] -= gone
        sizes[(m.owner, m.name)] = tuple(shape)
    owners = {owner for owner, _ in sizes}
    params = sum(
        math.prod(getattr(model.get_submodule(o), n).shape) - math.prod(s)
        for (o, n), s in sizes.items()
        if isinstance(getattr(model.get_submodule(o), n), nn.Parameter)
    )
    own_calls = [c for c in calls if c[0] in owners]
    macs = count_macs(model, own_calls, {}) - count_macs(model, own_calls, sizes)
    kept = tuple(np.nonzero(~removed[group.classes])[0].tolist())
    return GroupSummary(group.index, group.member_names(), group.width, kept, params, macs)
