"""``GlobalSparsifier``: unstructured masks from one global budget (``global_pruning=True``).

``WeightNormSparsifier`` gives every tensor the same level; this one ranks the weights
of all its tensors together, so redundant layers give up more and sensitive ones less.
It drives like any sparsifier (``prepare`` / ``step`` / ``squash_mask``) and takes
``CubicSL``/``LambdaSL`` schedules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.accuracy.allocation import SCORES, global_levels
from prunekit.errors import ConfigError
from prunekit.masks import weight_norm_mask
from prunekit.sparsifier._checks import check_level
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["GlobalSparsifier"]

PRUNABLE = {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d}


class GlobalSparsifier(BaseSparsifier):
    """Prune the lowest-scoring weights across every prepared tensor at once.

    The global target is the parameter-weighted mean of the groups' ``sparsity_level``
    (all equal unless set per group). ``score`` is "magnitude" (|w|) or "lamp"
    (layer-adaptive magnitude, which keeps every layer alive at high sparsity).
    ``min_level``/``max_level`` bound each tensor's level; set them per tensor in the
    config (``{"tensor_fqn": "fc.weight", "max_level": 0.9}``). The level each tensor got
    is in ``sparsifier.levels`` after ``step()``.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    >>> s = GlobalSparsifier(sparsity_level=0.9, score="lamp", max_level=0.95)
    >>> s.prepare(model, None); s.step()
    >>> total = sum(int((m.weight == 0).sum()) for m in model)
    >>> round(total / (64 * 64 + 64 * 4), 2)
    0.9
    """

    def __init__(
        self,
        sparsity_level: float = 0.5,
        score: str = "magnitude",
        min_level: float = 0.0,
        max_level: float = 1.0,
    ) -> None:
        if score not in SCORES:
            raise ConfigError(f"GlobalSparsifier: score must be one of {SCORES}, got {score!r}")
        self.score = score
        self.levels: dict[str, float] = {}
        defaults = {"sparsity_level": sparsity_level, "min_level": min_level,
                    "max_level": max_level}
        super().__init__(defaults=defaults)
        self.validate_group({"tensor_fqn": "defaults", **defaults})

    def make_config_from_model(
        self, model: nn.Module, SUPPORTED_MODULES: set[type[nn.Module]] = PRUNABLE
    ) -> None:
        """Every Linear and Conv weight (the base class takes only Linear)."""
        super().make_config_from_model(model, SUPPORTED_MODULES)

    def validate_group(self, group: dict[str, Any]) -> None:
        where = f"GlobalSparsifier group {group['tensor_fqn']!r}"
        check_level(where, "sparsity_level", group.get("sparsity_level"))
        low = check_level(where, "min_level", group.get("min_level"))
        high = check_level(where, "max_level", group.get("max_level"))
        if low > high:
            raise ConfigError(f"{where}: min_level {low} is above max_level {high}")

    def global_target(self) -> float:
        """The parameter-weighted mean of the groups' ``sparsity_level``."""
        sizes = [self._original(g["module"], g["tensor_name"]).numel() for g in self.groups]
        total = sum(sizes) or 1
        return sum(g["sparsity_level"] * n for g, n in zip(self.groups, sizes, strict=True)) / total

    def step(self, use_path: bool = True) -> None:
        """Allocate the global budget to the tensors, then mask each at its level."""
        if not self.enable_mask_update:
            return
        self._check_prepared("step")
        for group in self.groups:
            self.validate_group(group)
        self._apply_masks()
        weights = {g["tensor_fqn"]: getattr(g["module"], g["tensor_name"]) for g in self.groups}
        self.levels = global_levels(
            weights,
            min(1.0, self.global_target()),
            self.score,
            {g["tensor_fqn"]: g["min_level"] for g in self.groups},
            {g["tensor_fqn"]: g["max_level"] for g in self.groups},
        )
        super().step(use_path)

    def update_mask(  # type: ignore[override]
        self, module: nn.Module, tensor_name: str, tensor_fqn: str, **kwargs: Any
    ) -> None:
        mask = module.parametrizations[tensor_name][0].mask
        level = self.levels[tensor_fqn]
        mask.copy_(weight_norm_mask(getattr(module, tensor_name), level, (1, 1), 1, torch.abs))
