"""Choose which coupled channels to remove: score them, then pick per group (or
globally) the least important ones, honouring round_to and minimum widths."""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from prunekit.errors import ConfigError
from prunekit.structured.engine.channels.groups import ChannelGraph, Group
from prunekit.structured.engine.importance import Importance

__all__ = ["check_round_to", "class_scores", "select"]


def class_scores(model: nn.Module, graph: ChannelGraph, importance: Importance) -> np.ndarray:
    """Each coupled channel's score, averaged over the parameter members with an opinion on
    it; ``inf`` for channels no member has an opinion on (they are never pruned).

    ``importance.normalise_members`` picks where the scale is removed: from every member
    (each normalised by its mean, every entry weighing alike) or, for a group norm, from
    every group after the raw member scores are added up (see ``importance``)."""
    total = np.zeros(graph.n_classes)
    count = np.zeros(graph.n_classes)
    for key, member in graph.members.items():
        module = model.get_submodule(member.owner)
        tensor = getattr(module, member.name)
        if not isinstance(tensor, nn.Parameter):
            continue  # buffers (running statistics) are sliced, not scored
        fqn = f"{member.owner}.{member.name}" if member.owner else member.name
        scores = importance.score(module, fqn, tensor, member.dim)
        if scores is None:
            continue
        values = scores.double().cpu().numpy()
        classes = graph.member_classes[key]
        if importance.normalise_members:
            values = values / (values.mean() + 1e-12)
            np.add.at(count, classes, 1.0)
        else:  # a member's entries of one channel (e.g. flattened columns) add up
            np.add.at(count, np.unique(classes), 1.0)
        np.add.at(total, classes, values)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    return scores if importance.normalise_members else _normalise_groups(scores, graph.groups)


def _normalise_groups(scores: np.ndarray, groups: list[Group]) -> np.ndarray:
    """Each group's scores over their mean: the ranking inside a group is unchanged, and
    groups of different width and weight scale meet on one footing for global pruning."""
    out = scores.copy()
    for g in groups:
        finite = g.classes[np.isfinite(scores[g.classes])]
        if finite.size:
            out[finite] = scores[finite] / (scores[finite].mean() + 1e-12)
    return out


def _floor_keep(group: Group, min_channels: int, round_to: int) -> int:
    """The fewest channels the group may keep."""
    frozen = group.width - group.prunable.size
    keep = max(min_channels, frozen, 1 if group.width else 0)
    return min(group.width, _round_up(keep, round_to, group.width))


def _round_up(keep: int, round_to: int, width: int) -> int:
    rounded = math.ceil(keep / round_to) * round_to
    return rounded if rounded <= width else width


def check_round_to(groups: list[Group], round_to: int) -> None:
    for g in groups:
        if g.prunable.size and g.width < round_to:
            raise ConfigError(
                f"round_to={round_to} cannot be met by the group of width {g.width} "
                f"(first member {g.member_names()[0]}); use a round_to of at most "
                f"{g.width} or ignore those layers"
            )


def select(
    groups: list[Group],
    scores: np.ndarray,
    ratio: float,
    round_to: int,
    min_channels: int,
    global_pruning: bool,
) -> np.ndarray:
    """Dense indices of the coupled channels to remove."""
    if global_pruning:
        return _select_global(groups, scores, ratio, round_to, min_channels)
    pruned: list[np.ndarray] = []
    for g in groups:
        candidates = g.prunable[np.isfinite(scores[g.prunable])]
        keep = _round_up(g.width - math.floor(ratio * candidates.size), round_to, g.width)
        keep = max(keep, _floor_keep(g, min_channels, round_to))
        n_prune = min(g.width - keep, candidates.size)
        order = candidates[np.argsort(scores[candidates], kind="stable")]
        pruned.append(order[:n_prune])
    return np.concatenate(pruned) if pruned else np.zeros(0, dtype=np.int64)


def _select_global(
    groups: list[Group], scores: np.ndarray, ratio: float, round_to: int, min_channels: int
) -> np.ndarray:
    """Rank every candidate channel together; stop taking from a group at its floor."""
    candidates = np.concatenate([g.prunable for g in groups] or [np.zeros(0, np.int64)])
    candidates = candidates[np.isfinite(scores[candidates])]
    budget = math.floor(ratio * candidates.size)
    group_of = {int(c): g for g in groups for c in g.prunable.tolist()}
    taken: dict[int, list[int]] = {g.index: [] for g in groups}
    for c in candidates[np.argsort(scores[candidates], kind="stable")].tolist():
        if budget == 0:
            break
        g = group_of[c]
        if g.width - len(taken[g.index]) > _floor_keep(g, min_channels, round_to):
            taken[g.index].append(c)
            budget -= 1
    pruned = []
    for g in groups:  # round each group's kept width up by giving back its best pruned
        keep = _round_up(g.width - len(taken[g.index]), round_to, g.width)
        pruned.extend(taken[g.index][: g.width - keep])
    return np.array(pruned, dtype=np.int64)
