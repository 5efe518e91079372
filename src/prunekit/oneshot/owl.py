"""Outlier-weighed layerwise sparsity (OWL, Yin et al. 2024): a sparsity per block that
spares the blocks holding the most outlier weights, with the same total.

A uniform 50% treats every transformer block alike, but a few blocks carry far more
weights whose Wanda score ``|W_ij| · ‖x_j‖₂`` stands out (above ``threshold`` times the
block's mean score), and pruning those hurts most. ``owl_sparsity`` runs the calibration
batches once through the dense model, counts each block's outlier fraction and spreads
the blocks' sparsities over a range ``2 · spread`` wide: the most outlier-rich block gets
the lowest. The per-layer result goes to ``oneshot(..., overrides=...)``. The mean
sparsity, weighted by each block's pruned weights, is exactly ``sparsity``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.experts import unfused_experts
from prunekit.fqn import fqn_to_module
from prunekit.linear_like import in_features, out_in
from prunekit.oneshot.api import check_batches
from prunekit.oneshot.blocks import resolve_blocks, resolve_layers
from prunekit.oneshot.engine import add_input_squares, run_batches
from prunekit.parametrization import original_tensor
from prunekit.sparsifier._checks import check_level

__all__ = ["owl_sparsity"]


def _positive(name: str, value: Any, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"owl_sparsity: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _scores(module: nn.Module, squares: torch.Tensor) -> torch.Tensor:
    """Wanda's scores ``|W_ij| · ‖x_j‖₂`` of an ``out x in`` view of the weight."""
    weight = out_in(module, original_tensor(module, "weight").detach())
    return weight.abs().double() * squares.sqrt().to(weight.device)


def _outlier_fraction(modules: list[nn.Module], squares: list[torch.Tensor], threshold: float
                      ) -> float:  # fmt: skip
    """The fraction of a block's scores above ``threshold`` times their mean, one layer's
    scores at a time (a block's at once would double a large model's memory)."""
    total = sum(float(_scores(m, s).sum()) for m, s in zip(modules, squares, strict=True))
    count = sum(m.weight.numel() for m in modules)
    cut = threshold * total / count
    above = sum(int((_scores(m, s) > cut).sum()) for m, s in zip(modules, squares, strict=True))
    return above / count


def owl_sparsity(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    sparsity: float = 0.5,
    *,
    threshold: float = 5.0,
    spread: float = 0.08,
    blocks: str | None = "auto",
    layers: list[str] | None = None,
) -> dict[str, float]:
    """``{layer fqn: sparsity}`` for ``oneshot``'s ``overrides``: each block's layers
    share one level, lower where more Wanda scores exceed ``threshold`` times the block's
    mean; the levels span ``2 * spread`` (the paper's M=5, λ=0.08) and their mean,
    weighted by the blocks' pruned weights, is ``sparsity``. ``blocks``, ``layers`` and
    the batches are those ``oneshot`` takes; the model runs once in eval mode without
    autograd and is left as it was.

    >>> overrides = owl_sparsity(model, batches, 0.7)                # doctest: +SKIP
    >>> prunekit.oneshot(model, batches, "wanda", 0.7, overrides=overrides)  # doctest: +SKIP
    """
    level = check_level("owl_sparsity", "sparsity", sparsity)
    threshold = _positive("threshold", threshold, allow_zero=False)
    spread = _positive("spread", spread, allow_zero=True)
    with unfused_experts(model):
        stack = resolve_blocks(model, blocks)
        per_block = {b: names for b, names in resolve_layers(model, stack, layers).items() if names}
        if len(per_block) < 2:
            raise ConfigError(
                f"owl_sparsity: OWL shares sparsity among blocks, and {len(per_block)} block(s) "
                "hold pruned layers; name a stack of blocks with blocks='<fqn of a ModuleList>'"
            )
        batches = check_batches(model, calibration_batches, "owl_sparsity")
        modules = {n: fqn_to_module(model, n) for names in per_block.values() for n in names}
        squares = {n: torch.zeros(in_features(m), dtype=torch.float64) for n, m in modules.items()}
        handles = [m.register_forward_pre_hook(functools.partial(add_input_squares, squares[n]))
                   for n, m in modules.items()]
        run_batches(model, batches, handles)
        broken = [n for n, total in squares.items() if not torch.isfinite(total).all()]
        if broken:
            raise ConfigError(f"owl_sparsity: layer {broken[0]!r} received NaN or inf "
                              "activations on the calibration batches")
        fractions = {b: _outlier_fraction([modules[n] for n in names], [squares[n] for n in names],
                                          threshold) for b, names in per_block.items()}
        sizes = {b: sum(modules[n].weight.numel() for n in names) for b, names in per_block.items()}
    return _allocate(per_block, fractions, sizes, level, spread)


def _allocate(per_block: dict[str, list[str]], fractions: dict[str, float],
              sizes: dict[str, int], level: float, spread: float) -> dict[str, float]:
    """Blocks' outlier fractions mapped linearly onto ``[0, 2·spread]``, then shifted so
    the size-weighted mean density is ``1 - level``: sparsity ``level - shifted``."""
    low, high = min(fractions.values()), max(fractions.values())
    scale = 2 * spread / (high - low) if high > low else 0.0
    lift = {b: (f - low) * scale for b, f in fractions.items()}
    mean = sum(lift[b] * sizes[b] for b in lift) / sum(sizes.values())
    levels = {b: level - (lift[b] - mean) for b in lift}
    outside = {b: round(v, 4) for b, v in levels.items() if not 0.0 <= v < 1.0}
    if outside:
        raise ConfigError(f"owl_sparsity: sparsity {level} with spread {spread} puts blocks "
                          f"outside [0, 1): {outside}; give a smaller spread")
    return {name: levels[b] for b, names in per_block.items() for name in names}
