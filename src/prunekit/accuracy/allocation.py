"""Global sparsity budgets: one target for the whole model, split across layers.

Per-layer ratios tuned by hand waste accuracy: a wide, redundant layer can lose far more
weights than a narrow first convolution. These pure functions rank every weight of every
layer together (by magnitude, or by LAMP's layer-adaptive score) and turn one global
target into per-layer levels, honouring per-layer minimum/maximum bounds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from prunekit.errors import ConfigError, ConfigTypeError

__all__ = ["SCORES", "check_budget", "global_levels", "lamp_scores", "resolve_bounds"]

SCORES = ("magnitude", "lamp")
_EPS = 1e-12


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry (Lee et al. 2021): ``w_i^2 / sum_{|w_j| >= |w_i|} w_j^2``.

    Within one layer it orders weights like magnitude does, but it is scale-free across
    layers, so one global threshold leaves every layer its few largest weights.

    >>> lamp_scores(torch.tensor([1.0, -2.0, 3.0])).tolist()
    [0.0714285746216774, 0.3076923191547394, 1.0]
    """
    sq = weight.detach().float().flatten().square()
    order = torch.argsort(sq)
    sorted_sq = sq[order]
    tail = sorted_sq.flip(0).cumsum(0).flip(0)  # sum of this and every larger entry
    scores = torch.empty_like(sq)
    scores[order] = sorted_sq / tail.clamp_min(_EPS)
    return scores.view(weight.shape)


def _layer_scores(weight: torch.Tensor, score: str) -> torch.Tensor:
    if score == "lamp":
        return lamp_scores(weight).flatten()
    return weight.detach().float().abs().flatten()


def resolve_bounds(
    names: list[str],
    bound: float | Mapping[str, float] | None,
    default: float,
    what: str,
) -> dict[str, float]:
    """One bound per layer from a number (all layers), a ``{name: level}`` dict (the
    others get ``default``) or None; checks the names and the range ``[0, 1]``."""
    if bound is None:
        return dict.fromkeys(names, default)
    if isinstance(bound, Mapping):
        unknown = sorted(set(bound) - set(names))
        if unknown:
            raise ConfigError(f"{what} names unknown layers {unknown}; expected some of {names}")
        values = {n: bound.get(n, default) for n in names}
    elif isinstance(bound, (int, float)) and not isinstance(bound, bool):
        values = dict.fromkeys(names, float(bound))
    else:
        raise ConfigTypeError(
            f"{what} must be a number or a dict {{layer: level}}, got {type(bound).__name__}"
        )
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{what}[{name!r}] must be a level in [0, 1], got {value!r}")
    return {n: float(v) for n, v in values.items()}


def check_budget(
    sizes: Mapping[str, int], target: float, lo: dict[str, float], hi: dict[str, float]
) -> None:
    """Raise unless some levels within ``[lo, hi]`` per layer average to ``target``."""
    total = sum(sizes.values())
    for name in sizes:
        if lo[name] > hi[name]:
            raise ConfigError(
                f"layer {name!r}: min_level {lo[name]} is above max_level {hi[name]}"
            )
    least = sum(lo[n] * sizes[n] for n in sizes) / total
    most = sum(hi[n] * sizes[n] for n in sizes) / total
    if not least - 1e-9 <= target <= most + 1e-9:
        raise ConfigError(
            f"global target {target} cannot be met within the per-layer bounds: they allow "
            f"a global level between {least:.4f} and {most:.4f}; widen min_level/max_level "
            "or change the target"
        )


def global_levels(
    weights: Mapping[str, torch.Tensor],
    target: float,
    score: str = "magnitude",
    min_level: float | Mapping[str, float] | None = None,
    max_level: float | Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer sparsity levels whose parameter-weighted mean is ``target``.

    Every weight of every layer is ranked together by ``score`` ("magnitude" or "lamp");
    the ``round(target * total)`` lowest are pruned, except that no layer goes below its
    ``min_level`` or above its ``max_level`` (a number for all layers or a dict by name).

    >>> w = {"a": torch.tensor([0.1, 0.2, 5.0, 6.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    >>> global_levels(w, 0.5)
    {'a': 0.5, 'b': 0.5}
    >>> global_levels(w, 0.5, max_level=0.25)
    Traceback (most recent call last):
    ...
    prunekit.errors.ConfigError: global target 0.5 cannot be met ...
    """
    if score not in SCORES:
        raise ConfigError(f"score must be one of {SCORES}, got {score!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise ConfigError(f"global target must be a level in [0, 1], got {target!r}")
    names = list(weights)
    if not names:
        raise ConfigError("global_levels needs at least one layer, got none")
    sizes = {n: weights[n].numel() for n in names}
    lo = resolve_bounds(names, min_level, 0.0, "min_level")
    hi = resolve_bounds(names, max_level, 1.0, "max_level")
    check_budget(sizes, target, lo, hi)
    counts = _water_fill(
        {n: torch.sort(_layer_scores(weights[n], score)).values for n in names},
        round(target * sum(sizes.values())),
        {n: (round(lo[n] * sizes[n]), int(hi[n] * sizes[n] + 1e-9)) for n in names},
    )
    return {n: counts[n] / sizes[n] if sizes[n] else 0.0 for n in names}


def _counts_below(
    sorted_scores: dict[str, torch.Tensor], threshold: float, bounds: dict[str, tuple[int, int]]
) -> dict[str, int]:
    out = {}
    for name, values in sorted_scores.items():
        below = int(torch.searchsorted(values, torch.tensor(threshold), right=True))
        lo, hi = bounds[name]
        out[name] = min(max(below, lo), hi)
    return out


def _water_fill(
    sorted_scores: dict[str, torch.Tensor], budget: int, bounds: dict[str, tuple[int, int]]
) -> dict[str, int]:
    """Counts per layer summing to ``budget``: the largest global threshold whose clamped
    counts stay within the budget, then the remainder from the entries tied at the next
    score (in layer order, so the result is deterministic)."""
    candidates = torch.unique(torch.cat([*sorted_scores.values(), torch.tensor([-1.0])]))
    lo_i, hi_i = 0, candidates.numel() - 1
    while lo_i < hi_i:
        mid = (lo_i + hi_i + 1) // 2
        if sum(_counts_below(sorted_scores, float(candidates[mid]), bounds).values()) <= budget:
            lo_i = mid
        else:
            hi_i = mid - 1
    counts = _counts_below(sorted_scores, float(candidates[lo_i]), bounds)
    remainder = budget - sum(counts.values())
    if remainder > 0 and lo_i + 1 < candidates.numel():  # floors of max_level can fall short
        nxt = torch.tensor(float(candidates[lo_i + 1]))
        for name, values in sorted_scores.items():
            tied = int(torch.searchsorted(values, nxt, right=True)) - counts[name]
            take = max(0, min(remainder, tied, bounds[name][1] - counts[name]))
            counts[name] += take
            remainder -= take
    return counts
