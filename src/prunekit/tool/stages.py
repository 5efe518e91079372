"""The three kinds of pruning stage the demo and recipes run, behind one interface.

Unstructured stages use prunekit's own sparsifier and schedule; structured and one-shot
stages call ``prunekit.structured.prune`` and ``prunekit.oneshot``, looked up at call
time so the tool works with whichever of them this installation provides.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from prunekit.errors import UnsupportedError
from prunekit.tool.checkpoint import record_plan

__all__ = ["backend", "oneshot_stage", "prunable_weights", "structured_stage", "unstructured_stage"]

_BACKENDS = {  # where each stage's function may live, in order of preference
    "structured": (("prunekit.structured", "prune"), ("prunekit.structured.engine", "prune")),
    "oneshot": (("prunekit.oneshot", "oneshot"),),
}
_LAYER_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


def backend(kind: str) -> Callable[..., Any]:
    """The function behind a structured or one-shot stage, or a one-line error saying
    that this installation lacks it."""
    for module_name, attr in _BACKENDS[kind]:
        try:
            fn = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            fn = None
        if callable(fn):
            return fn
    module_name, attr = _BACKENDS[kind][0]
    raise UnsupportedError(
        f"{kind} stage: this prunekit installation has no {module_name}.{attr}; "
        f"remove the {kind} stage or upgrade prunekit"
    )


def _graph_layers(model: torch.fx.GraphModule) -> dict[str, str]:
    """Module fqn → layer type of each weight an exported graph feeds to linear/conv ops
    (its modules are plain ``nn.Module`` containers, so types come from the ops)."""
    ops = {name.lower(): name for name in _LAYER_TYPES}
    layers = {}
    for node in model.graph.nodes:
        op = str(node.target).split(".")[1] if node.op == "call_function" else ""
        weight = node.args[1] if op in ops and len(node.args) > 1 else None
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            module_fqn, _, tensor = str(weight.target).rpartition(".")
            if tensor == "weight":
                layers[module_fqn] = ops[op]
    return layers


def _layers(model: nn.Module) -> dict[str, str]:
    if isinstance(model, torch.fx.GraphModule):
        return _graph_layers(model)
    layers = {}
    for fqn, module in model.named_modules():
        kind = next((k for k, cls in _LAYER_TYPES.items() if isinstance(module, cls)), None)
        if kind is not None:
            layers[fqn] = kind
    return layers


def prunable_weights(model: nn.Module, layer_types: Sequence[str] = tuple(_LAYER_TYPES),
                     ignore: Sequence[str] = ()) -> list[str]:
    """Weight fqns of every layer of ``layer_types`` outside the ``ignore``d fqns/prefixes;
    works on ordinary models and on ``torch.export`` programs' modules."""
    return [
        f"{name}.weight" for name, kind in _layers(model).items()
        if kind in layer_types and not any(name == i or name.startswith(i + ".") for i in ignore)
    ]


def unstructured_stage(model: nn.Module, sparsity: float, *, steps: int = 1,
                       block: Sequence[int] = (1, 1), zeros_per_block: int | None = None,
                       layer_types: Sequence[str] = tuple(_LAYER_TYPES), ignore: Sequence[str] = (),
                       between_steps: Callable[[int, float], None] | None = None) -> list[float]:
    """Magnitude pruning to ``sparsity`` in ``steps`` mask updates along a cubic schedule
    (one update straight to the target when ``steps`` is 1).

    ``between_steps(step, level)`` runs after each mask update (the demo fine-tunes
    there); the masks are squashed into the weights at the end. Returns the levels.
    """
    import prunekit

    fqns = prunable_weights(model, layer_types, ignore)
    if not fqns:
        raise UnsupportedError(
            f"unstructured stage: no {'/'.join(layer_types)} layer left to prune after "
            f"ignoring {list(ignore)}"
        )
    kwargs: dict[str, Any] = {"sparsity_level": sparsity, "sparse_block_shape": tuple(block)}
    if zeros_per_block is not None:
        kwargs["zeros_per_block"] = zeros_per_block
    sparsifier = prunekit.WeightNormSparsifier(**kwargs)
    sparsifier.prepare(model, [{"tensor_fqn": f} for f in fqns])
    # init_t=-1: the first of the ``steps`` updates already prunes, the last hits the target
    scheduler = prunekit.CubicSL(sparsifier, init_sl=0.0, init_t=-1, delta_t=1, total_t=steps)
    levels = []
    for step in range(steps):
        sparsifier.step()
        levels.append(float(sparsifier.groups[0]["sparsity_level"]))
        if between_steps is not None:
            between_steps(step, levels[-1])
        scheduler.step()
    sparsifier.squash_mask()
    return levels


def structured_stage(model: nn.Module, example_inputs: tuple, ratio: float,
                     importance: str | None = None, ignore: Sequence[str] = ()) -> Any:
    """Channel pruning by ``ratio`` through ``prunekit.structured.prune``; the applied
    plan's description is kept on the model so ``prunekit.save`` stores it."""
    prune = backend("structured")
    kwargs: dict[str, Any] = {"ratio": ratio}
    if importance is not None:
        kwargs["importance"] = importance
    if ignore:
        kwargs["ignored_layers"] = list(ignore)
    plan = prune(model, example_inputs, **kwargs)
    plan.apply()
    record_plan(model, plan.to_dict())
    return plan


def oneshot_stage(model: nn.Module, calibration: Sequence[Any], method: str,
                  sparsity: float, dense_targets: bool = False, exact_update: bool = False,
                  offload_folder: str | None = None) -> Any:
    """One-shot pruning with calibration batches through ``prunekit.oneshot``."""
    run = backend("oneshot")
    with torch.no_grad():
        return run(model, list(calibration), method=method, sparsity=sparsity,
                   dense_targets=dense_targets, exact_update=exact_update,
                   offload_folder=offload_folder)
