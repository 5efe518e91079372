"""Sensitivity analysis: prune one layer at a time, measure, undo; then allocate.

Which layers can take how much sparsity is an empirical question. ``sensitivity_scan``
answers it with the user's own metric and ``allocate`` turns the answer into per-layer
levels that meet one global target while hurting the metric as little as the scan says.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from prunekit.accuracy.allocation import check_budget, resolve_bounds
from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.masks import weight_norm_mask

__all__ = ["SensitivityTable", "allocate", "sensitivity_scan"]

log = logging.getLogger("prunekit")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class SensitivityTable:
    """Metric of the model with one layer pruned to each level (all else dense)."""

    levels: tuple[float, ...]
    baseline: float
    metrics: dict[str, list[float]]
    sizes: dict[str, int]
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def drops(self, layer: str) -> list[float]:
        """How much worse than the baseline the metric got at each level."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - m) for m in self.metrics[layer]]

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(self.levels), "baseline": self.baseline,
                "metrics": {k: list(v) for k, v in self.metrics.items()},
                "sizes": dict(self.sizes), "higher_is_better": self.higher_is_better}

    def __str__(self) -> str:
        width = max([5, *(len(n) for n in self.metrics)])
        head = f"{'layer':<{width}} {'params':>9} " + " ".join(f"{lv:>8.0%}" for lv in self.levels)
        lines = [f"dense metric: {self.baseline:.4g}", head]
        for name, values in self.metrics.items():
            cells = " ".join(f"{v:>8.4g}" for v in values)
            lines.append(f"{name:<{width}} {self.sizes[name]:>9} {cells}")
        return "\n".join(lines)

    def plot(self, path: str | None = None, ax: Any = None) -> Any:
        """Metric vs sparsity, one line per layer (needs matplotlib: ``pip install
        prunekit[plot]``); saved to ``path`` when given. Returns the axes."""
        try:
            import matplotlib

            if ax is None and path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("SensitivityTable.plot needs matplotlib: pip install "
                              "'prunekit[plot]'") from exc
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        for name, values in self.metrics.items():
            ax.plot([0.0, *self.levels], [self.baseline, *values], marker="o", label=name)
        ax.set_xlabel("sparsity of the layer")
        ax.set_ylabel("metric")
        ax.set_title("sensitivity: one layer pruned at a time")
        ax.legend(fontsize="small")
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        return ax


def _as_number(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigTypeError(f"eval_fn must return a number, got {value!r} ({where})")
    return float(value)


def _check_levels(levels: Any) -> tuple[float, ...]:
    if not isinstance(levels, Iterable) or isinstance(levels, (str, bytes)):
        raise ConfigTypeError(f"levels must be a sequence of numbers, got {levels!r}")
    out = tuple(levels)
    if not out or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < 1
                      for v in out):
        raise ConfigError(f"levels must be numbers in (0, 1), got {out!r}")
    return tuple(sorted(float(v) for v in out))


def _layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    if layers is None:
        return found
    if isinstance(layers, str):
        raise ConfigTypeError(f"layers must be a list of module names, got the string {layers!r}")
    out = {}
    for name in layers:
        if name not in found:
            close = difflib.get_close_matches(str(name), sorted(found), n=3)
            raise FqnError(f"layer {name!r} is not a Linear/Conv module of the model; "
                           f"did you mean {close}? (prunable: {sorted(found)})")
        out[name] = found[name]
    return out


def _weight(module: nn.Module) -> torch.Tensor:
    """The stored weight tensor (the original one under a parametrization)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def sensitivity_scan(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], Any],
    levels: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
    layers: Sequence[str] | None = None,
    higher_is_better: bool = True,
    progress: bool = False,
) -> SensitivityTable:
    """Prune each layer alone (lowest |w|) to each level, call ``eval_fn(model)``, undo.

    ``layers`` are module names (default: every Linear/Conv). The model's weights are
    restored after every evaluation, also when ``eval_fn`` raises or returns garbage.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> x = torch.randn(32, 4)
    >>> table = sensitivity_scan(model, lambda m: -float((m(x) - model(x)).abs().mean()))
    >>> sorted(table.metrics)
    ['0', '1']
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(eval_fn):
        raise ConfigTypeError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    grid = _check_levels(levels)
    chosen = _layers(model, layers)
    baseline = _as_number(eval_fn(model), "dense model")
    metrics: dict[str, list[float]] = {}
    jobs = [(name, level) for name in chosen for level in grid]
    for name, level in tqdm(jobs, desc="sensitivity", disable=not progress):
        value = _pruned_eval(model, chosen[name], level, eval_fn, f"{name} at {level:.0%}")
        metrics.setdefault(name, []).append(value)
        log.info("sensitivity %s at %.0f%%: %.4g", name, 100 * level, value)
    sizes = {n: _weight(m).numel() for n, m in chosen.items()}
    return SensitivityTable(grid, baseline, metrics, sizes, higher_is_better)


def _pruned_eval(
    model: nn.Module, module: nn.Module, level: float, eval_fn: Callable, where: str
) -> float:
    weight = _weight(module)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            keep = weight_norm_mask(weight, level, (1, 1), 1, torch.abs)
            weight.mul_(keep)
        return _as_number(eval_fn(model), where)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _level_at(levels: Sequence[float], drops: Sequence[float], tolerance: float) -> float:
    """The highest level whose (interpolated, made monotone) drop stays within
    ``tolerance``; drops beyond the scanned levels are unknown, so the last level caps."""
    xs, ys, worst = [0.0], [0.0], 0.0
    for level, drop in zip(levels, drops, strict=True):
        worst = max(worst, drop)
        xs.append(level)
        ys.append(worst)
    best = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True),
                                  strict=False):
        if y1 <= tolerance:
            best = x1
        elif y0 <= tolerance:
            return x0 + (x1 - x0) * (tolerance - y0) / (y1 - y0)
        else:
            break
    return best


def allocate(
    scan: SensitivityTable,
    target: float,
    min_level: float | Mapping[str, float] | None = None,
    max_level: float | Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer levels whose parameter-weighted mean is ``target``, chosen so that every
    layer stays within one common metric drop (read off ``scan``, linearly interpolated).

    Sensitive layers get low levels, tolerant ones high. Bounds are a number or a
    ``{layer: level}`` dict; ``max_level`` defaults to, and may not exceed, the highest
    scanned level. Feed the result to a sparsifier as
    ``[{"tensor_fqn": f"{name}.weight", "sparsity_level": lv} for name, lv in ...]``.
    """
    if not isinstance(scan, SensitivityTable):
        raise ConfigTypeError(f"scan must be a SensitivityTable, got {type(scan).__name__}")
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 <= target <= 1:
        raise ConfigError(f"target must be a level in [0, 1], got {target!r}")
    names, top = list(scan.metrics), max(scan.levels)
    lo = resolve_bounds(names, min_level, 0.0, "min_level")
    hi = resolve_bounds(names, max_level, top, "max_level")
    above = {n: v for n, v in hi.items() if v > top + 1e-12}
    if above:
        raise ConfigError(f"max_level {above} is above the highest scanned level {top}; "
                          "scan up to that level first")
    check_budget(scan.sizes, float(target), lo, hi)
    drops = {n: scan.drops(n) for n in names}
    return _solve(scan, drops, lo, hi, float(target))


def _weighted_mean(levels: dict[str, float], sizes: Mapping[str, int]) -> float:
    return sum(levels[n] * sizes[n] for n in levels) / sum(sizes[n] for n in levels)


def _solve(
    scan: SensitivityTable, drops: dict[str, list[float]], lo: dict[str, float],
    hi: dict[str, float], target: float,
) -> dict[str, float]:
    """Bisect the common tolerated drop until the levels average to ``target``; the last
    gap is closed by interpolating between the two bracketing allocations."""

    def levels_at(tolerance: float) -> dict[str, float]:
        if tolerance < 0:  # below every drop: the minimum levels
            return dict(lo)
        return {n: min(max(_level_at(scan.levels, d, tolerance), lo[n]), hi[n])
                for n, d in drops.items()}

    t_lo, t_hi = -1.0, max([0.0, *(max(d) for d in drops.values())]) + 1.0
    for _ in range(60):
        mid = (t_lo + t_hi) / 2
        if _weighted_mean(levels_at(mid), scan.sizes) < target:
            t_lo = mid
        else:
            t_hi = mid
    below, above = levels_at(t_lo), levels_at(t_hi)
    gap = _weighted_mean(above, scan.sizes) - _weighted_mean(below, scan.sizes)
    w = 1.0 if gap <= 0 else (target - _weighted_mean(below, scan.sizes)) / gap
    return {n: below[n] + w * (above[n] - below[n]) for n in drops}
