"""Trace a prepared model and plan what ``prune()`` will change, before changing anything.

From every prepared layer the walk follows *every* user of its output through per-channel
ops (activations, BatchNorm, pools, dropout, flatten) to the layers that read it. Each
such branch must match a pattern; a branch that reaches anything else (a residual ``add``,
``cat``, a reshape, a second call of a shared module) makes the plan fail with an error
that names the node, so a model is never half pruned. The reference followed only the
first user of each node and silently broke the others.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from prunekit.errors import UnsupportedError
from prunekit.parametrization import module_contains_param
from prunekit.structured import ops
from prunekit.structured.lstm import check_lstm, shrink_lstm
from prunekit.structured.parametrization import FakeStructuredSparsity
from prunekit.structured.patterns import PatternIndex
from prunekit.structured.prune_functions import BUILTIN_PATTERN_FUNCTIONS
from prunekit.structured.shrink import Branch, check_branches, shrink_layer, structured_mask
from prunekit.structured.steps import function_step, module_step

__all__ = ["LayerPlan", "plan_prune"]

_CONSUMER_KEYS = frozenset({nn.Linear, *ops.CONV_TYPES, "output"})


@dataclass
class LayerPlan:
    """What ``prune()`` does to one prepared layer."""

    name: str
    module: nn.Module
    branches: list[Branch] = field(default_factory=list)
    custom: tuple[Callable[..., None], list[Any]] | None = None  # a user pattern function

    def apply(self) -> None:
        if self.custom is not None:
            fn, items = self.custom
            fn(*items)
        elif isinstance(self.module, nn.LSTM):
            shrink_lstm(self.module, self.branches)
        else:
            shrink_layer(self.module, self.branches)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    key = ops.node_key(node, modules)
    kind = getattr(key, "__name__", None) or str(key)
    return f"{node.name!r} ({kind})"


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types; all mean "not traceable"
        raise UnsupportedError(
            f"prune: torch.fx could not trace {type(model).__name__} ({type(err).__name__}: "
            f"{err}); the pattern pruner needs a model without data-dependent control flow "
            "(prunekit.structured.prune handles more models)"
        ) from err


def _walk(start: fx.Node, modules: dict[str, nn.Module], lstm: bool) -> list[list[fx.Node]]:
    """Every path from ``start``'s users through pass-through ops to where it stops."""
    paths: list[list[fx.Node]] = []
    stack = [[user] for user in reversed(list(start.users))]
    while stack:
        path = stack.pop()
        node = path[-1]
        key = ops.node_key(node, modules)
        passes = key in ops.PASS_KEYS and (key is not operator.getitem or lstm)
        if passes and node.users:
            stack.extend([*path, user] for user in reversed(list(node.users)))
        elif not passes:
            paths.append(path)
    return paths


def _node_step(node: fx.Node, modules: dict[str, nn.Module]):
    where = f"node {_describe(node, modules)}"
    if node.op == "call_module":
        return module_step(modules[str(node.target)], where)
    extra = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(a, fx.Node) for a in extra):
        raise UnsupportedError(
            f"prune: {where} takes a tensor argument besides the pruned channels; only "
            "per-channel ops with constant arguments may sit between a pruned layer and its "
            "consumer"
        )
    if node.op == "call_method":
        name = str(node.target)
        return function_step(lambda x, *a, **k: getattr(x, name)(*a, **k), where,
                             tuple(node.args[1:]), dict(node.kwargs))
    return function_step(node.target, where, tuple(node.args[1:]), dict(node.kwargs))


def _check_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    if node.op == "call_module":
        flat = modules[str(node.target)]
        dims = (flat.start_dim, flat.end_dim)
    else:
        dims = (node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0),
                node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1))
    if tuple(dims) != (1, -1):
        raise UnsupportedError(
            f"prune: flatten node {_describe(node, modules)} has (start_dim, end_dim)={dims}; "
            "only flattening from dim 1 to the end can feed a pruned Linear"
        )


def _branch(path: list[fx.Node], modules: dict[str, nn.Module], calls: Counter) -> Branch:
    terminal, steps, flatten = path[-1], [], False
    for node in path[:-1]:
        key = ops.node_key(node, modules)
        if key in ops.FLATTENS:
            _check_flatten(node, modules)
            flatten = True
        elif key is not operator.getitem:
            steps.append(_node_step(node, modules))
    consumer = None if terminal.op == "output" else modules[str(terminal.target)]
    if consumer is not None and calls[terminal.target] > 1:
        raise UnsupportedError(
            f"prune: consumer node {_describe(terminal, modules)} calls module "
            f"{terminal.target!r}, which is called {calls[terminal.target]} times; a shared "
            "module cannot lose input channels for one call only"
        )
    return Branch(f"node {_describe(terminal, modules)}", steps, consumer, flatten)


def _no_pattern(name: str, path: list[fx.Node], modules: dict[str, nn.Module]) -> UnsupportedError:
    route = " → ".join(_describe(n, modules) for n in path)
    norms = [n for n in path if ops.node_key(n, modules) is nn.LayerNorm]
    culprit, why = path[-1], "cannot take pruned channels"
    if ops.node_key(culprit, modules) in _CONSUMER_KEYS:
        why = "reads them, but this chain is not in the pattern table (add it to patterns)"
    if norms:
        culprit = norms[0]
        why = "normalises over the pruned features, so removing them would not be exact"
    return UnsupportedError(
        f"prune: no pattern covers the output of prepared layer {name!r} along {route}: node "
        f"{_describe(culprit, modules)} {why}. Residual adds, cat and reshapes are not handled "
        "by the pattern pruner; use prunekit.structured.prune, add a pattern, or leave this "
        "layer out of the config"
    )


def _plan_layer(
    node: fx.Node, name: str, modules: dict[str, nn.Module], index: PatternIndex, calls: Counter
) -> LayerPlan:
    module = modules[name]
    paths = _walk(node, modules, lstm=isinstance(module, nn.LSTM))
    if not paths:
        raise UnsupportedError(f"prune: the output of prepared layer {name!r} is never used")
    first = ops.node_key(node, modules)
    matches = []
    for path in paths:
        path_keys = (ops.node_key(n, modules) for n in path)
        keys = (first, *(k for k in path_keys if k not in ops.TRANSPARENT))
        found = index.lookup(keys)
        if found is None:
            raise _no_pattern(name, path, modules)
        matches.append((path, keys, *found))
    if all(fn in BUILTIN_PATTERN_FUNCTIONS and n == len(k) for _, k, n, fn in matches):
        return _builtin_plan(name, module, [m[0] for m in matches], modules, calls)
    return _custom_plan(name, module, matches, modules)


def _builtin_plan(
    name: str, module: nn.Module, paths: list[list[fx.Node]], modules: dict[str, nn.Module],
    calls: Counter,
) -> LayerPlan:
    branches = [_branch(path, modules, calls) for path in paths]
    if isinstance(module, nn.LSTM):
        check_lstm(module, name, branches)
    else:
        check_branches(module, name, structured_mask(module).numel(), branches)
    return LayerPlan(name, module, branches)


def _custom_plan(
    name: str, module: nn.Module, matches: list, modules: dict[str, nn.Module]
) -> LayerPlan:
    """A user pattern function gets the matched modules/functions, as in the reference."""
    if len(matches) > 1:
        raise UnsupportedError(
            f"prune: the output of prepared layer {name!r} has {len(matches)} users; a custom "
            "pattern function handles a single chain only"
        )
    path, _, length, fn = matches[0]
    kept = [n for n in path if ops.node_key(n, modules) not in ops.TRANSPARENT][: length - 1]
    skipped = [n for n in path[: path.index(kept[-1]) + 1] if n not in kept] if kept else []
    if skipped:
        raise UnsupportedError(
            f"prune: custom pattern function {getattr(fn, '__name__', fn)!r} for {name!r} would "
            f"skip node {_describe(skipped[0], modules)}; add it to the pattern"
        )
    items = [module] + [modules[str(n.target)] if n.op == "call_module" else n.target for n in kept]
    return LayerPlan(name, module, custom=(fn, items))


def _prepared(module: nn.Module) -> bool:
    return module_contains_param(module, FakeStructuredSparsity)


def plan_prune(model: nn.Module, index: PatternIndex) -> list[LayerPlan]:
    """Trace ``model`` and plan every prepared layer; raises (changing nothing) if any
    prepared layer cannot be pruned."""
    traced = _trace(model)
    modules = dict(traced.named_modules())
    graph_nodes = list(traced.graph.nodes)
    calls = Counter(n.target for n in graph_nodes if n.op == "call_module")
    plans = []
    for node in graph_nodes:
        if node.op != "call_module" or not _prepared(modules[str(node.target)]):
            continue
        if calls[node.target] > 1:
            raise UnsupportedError(
                f"prune: prepared layer {node.target!r} is called {calls[node.target]} times in "
                "forward; a shared layer cannot be shrunk for one call only"
            )
        plans.append(_plan_layer(node, str(node.target), modules, index, calls))
    planned = {p.name for p in plans}
    missing = [n for n, m in model.named_modules() if _prepared(m) and n not in planned]
    if missing:
        raise UnsupportedError(
            f"prune: prepared layers {missing} are never called as modules in the traced "
            "forward, so there is nothing to prune them against"
        )
    return plans
