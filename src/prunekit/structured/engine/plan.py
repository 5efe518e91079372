"""PrunePlan: which channels of which tensors to keep, and what that saves.

A plan is computed without touching the model, can be printed and inspected, turned
into a plain dict (JSON) and rebuilt from one to replay the same pruning on a fresh
copy of the model, and applied once with ``apply()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunekit.errors import ConfigError, StateError
from prunekit.structured.engine.apply import AttrChange, Slice, apply_slices
from prunekit.structured.engine.hf_config import fit_config

__all__ = ["GroupSummary", "PrunePlan"]

FORMAT = "prunekit.structured.plan"


@dataclass(frozen=True)
class GroupSummary:
    """One group as printed: its members, width before/after, and what it alone saves."""

    index: int
    members: tuple[str, ...]
    width: int
    kept: tuple[int, ...]
    params_saved: int
    macs_saved: int


@dataclass
class PrunePlan:
    """The outcome of ``prunekit.structured.prune``; ``apply()`` shrinks the model.

    >>> plan = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)  # doctest: +SKIP
    >>> print(plan); plan.apply()                                   # doctest: +SKIP
    """

    model: nn.Module
    slices: list[Slice]
    groups: list[GroupSummary]
    totals: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    inexact: list[str] = field(default_factory=list)
    attrs: list[AttrChange] = field(default_factory=list)
    applied: bool = False
    config_changes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def apply(self) -> nn.Module:
        """Slice every planned tensor, fix module attributes and, for a ``transformers``
        model, write the new widths into its config (``config_changes``: field -> (old,
        new)) so ``from_pretrained`` rebuilds it; returns the model. Parameters are new
        objects afterwards, so rebuild optimizers."""
        if self.applied:
            raise StateError("this PrunePlan was applied already; a plan applies once")
        apply_slices(self.model, self.slices, self.attrs)
        self.applied = True
        self.config_changes = fit_config(self.model, [(a.owner, a.name) for a in self.attrs])
        return self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready description (no tensors, no pickle)."""
        return {
            "format": FORMAT,
            "version": 1,
            "settings": dict(self.settings),
            "totals": dict(self.totals),
            "inexact": list(self.inexact),
            "attrs": [
                {"owner": a.owner, "name": a.name, "old": a.old, "new": a.new} for a in self.attrs
            ],
            "slices": [
                {
                    "owner": s.owner,
                    "name": s.name,
                    "dim": s.dim,
                    "size": s.size,
                    "keep": list(s.keep),
                }
                for s in self.slices
            ],
            "groups": [
                {
                    "index": g.index,
                    "members": list(g.members),
                    "width": g.width,
                    "kept": list(g.kept),
                    "params_saved": g.params_saved,
                    "macs_saved": g.macs_saved,
                }
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, model: nn.Module, data: dict[str, Any]) -> PrunePlan:
        """Rebuild a plan for ``model`` (e.g. a fresh instance before loading a pruned
        checkpoint); ``apply()`` checks every tensor shape before changing anything."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != 1:
            raise ConfigError(f"not a version-1 {FORMAT} dict: got keys {sorted(data)[:6]}")
        slices = [
            Slice(s["owner"], s["name"], int(s["dim"]), int(s["size"]), tuple(s["keep"]))
            for s in data["slices"]
        ]
        groups = [
            GroupSummary(
                g["index"],
                tuple(g["members"]),
                g["width"],
                tuple(g["kept"]),
                g["params_saved"],
                g["macs_saved"],
            )
            for g in data["groups"]
        ]
        return cls(
            model,
            slices,
            groups,
            dict(data["totals"]),
            dict(data["settings"]),
            list(data["inexact"]),
            [
                AttrChange(a["owner"], a["name"], int(a["old"]), int(a["new"]))
                for a in data["attrs"]
            ],
        )

    def __str__(self) -> str:
        t = self.totals
        lines = [
            f"PrunePlan ({'applied' if self.applied else 'not applied'}): "
            f"{len(self.groups)} groups, params {t['params_before']:,} -> {t['params_after']:,}, "
            f"MACs {t['macs_before']:,} -> {t['macs_after']:,}"
        ]
        for g in self.groups:
            lines.append(
                f"  group {g.index}: {g.width} -> {len(g.kept)} channels, kept "
                f"{_abbrev(g.kept)}, saves {g.params_saved:,} params, {g.macs_saved:,} MACs "
                f"(alone) | {_abbrev_names(g.members)}"
            )
        for a in self.attrs:
            lines.append(f"  attribute {a.owner}.{a.name}: {a.old} -> {a.new}")
        if self.inexact:
            lines.append(f"  note: normalisation statistics change in {', '.join(self.inexact)}")
        return "\n".join(lines)


def _abbrev(kept: tuple[int, ...], limit: int = 8) -> str:
    if len(kept) <= limit:
        return str(list(kept))
    return "[" + ", ".join(map(str, kept[:limit])) + f", ... ({len(kept)} total)]"


def _abbrev_names(names: tuple[str, ...], limit: int = 4) -> str:
    more = f" +{len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
