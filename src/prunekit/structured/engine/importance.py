"""Importance criteria: an abstract base plus a registry.

A criterion scores each entry of one member (a tensor dimension); the engine averages
the members' scores per coupled channel, so any criterion works on any group.

The magnitude criteria (``l1``, ``l2``) score a channel by the group norm of everything
it touches: the producer's rows, a norm layer's scale (gamma) and the consumers' input
columns. Each member gives its raw ``sum |w|^p`` per channel, the engine takes the mean
over members (no per-member normalisation, so a channel that is weak in a large layer
stays weak), then divides each group's scores by the group's mean: the ranking inside a
group is the group norm's, and ``global_pruning`` compares groups on one scale. Biases
(conv/linear bias, norm beta) have no opinion: they shift a channel's output instead of
scaling the signal it carries (and a bias before a BatchNorm is cancelled by it). This is
Torch-Pruning's default ``GroupMagnitudeImportance``.

The other criteria keep ``normalise_members = True``: each member's scores are divided by
their mean before the average, because their per-member numbers live on unrelated scales
(FPGM's distances grow with a layer's size, LAMP is a per-layer rank-like score, Taylor
products follow each layer's gradient scale, random is uniform per member) and adding
them raw would let one member decide alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError

__all__ = [
    "FPGM",
    "L1",
    "L2",
    "BNScale",
    "Importance",
    "RandomImportance",
    "Taylor",
    "get_importance",
    "importance_names",
    "register_importance",
]

_REGISTRY: dict[str, type[Importance]] = {}


class Importance(ABC):
    """Scores entries of ``tensor`` along ``dim``; ``None`` when it has no opinion."""

    name: ClassVar[str]
    #: divide each member's scores by their mean before averaging (see the module
    #: docstring); ``False``: add raw scores and normalise each group instead
    normalise_members: ClassVar[bool] = True

    @abstractmethod
    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        """One non-negative score per index of ``tensor`` along ``dim``."""


def register_importance(cls: type[Importance]) -> type[Importance]:
    _REGISTRY[cls.name] = cls
    return cls


def importance_names() -> list[str]:
    return sorted(_REGISTRY)


def get_importance(spec: str | Importance) -> Importance:
    """An instance for a registered name, or ``spec`` itself if it is one already."""
    if isinstance(spec, Importance):
        return spec
    if not isinstance(spec, str):
        raise ConfigTypeError(
            f"importance must be a name or an Importance, got {type(spec).__name__}"
        )
    if spec not in _REGISTRY:
        raise ConfigError(f"unknown importance {spec!r}; expected one of {importance_names()}")
    return _REGISTRY[spec]()


def _rows(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.detach().float().movedim(dim, 0).reshape(tensor.shape[dim], -1)


def _is_bias(fqn: str) -> bool:
    return fqn.rsplit(".", 1)[-1] == "bias"


def _magnitude(fqn: str, tensor: torch.Tensor, dim: int, p: int) -> torch.Tensor | None:
    """``sum |w|^p`` over each entry's slice (the p-th power of its p-norm, so members add
    up to the group norm); ``None`` for biases."""
    if _is_bias(fqn):
        return None
    return _rows(tensor, dim).abs().pow(p).sum(1)


@register_importance
class L1(Importance):
    name = "l1"
    normalise_members = False

    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        return _magnitude(fqn, tensor, dim, 1)


@register_importance
class L2(Importance):
    name = "l2"
    normalise_members = False

    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        return _magnitude(fqn, tensor, dim, 2)


@register_importance
class FPGM(Importance):
    """Filters close to the geometric median of their layer are redundant (He et al. 2019):
    score = summed distance to the other filters. Only weight matrices have an opinion."""

    name = "fpgm"

    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        if tensor.dim() < 2:
            return None
        rows = _rows(tensor, dim)
        return torch.cdist(rows, rows).sum(1)


@register_importance
class BNScale(Importance):
    """|gamma| of BatchNorm (network slimming); groups without BatchNorm are left alone."""

    name = "bn_scale"

    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and fqn.endswith("weight"):
            return tensor.detach().float().abs()
        return None


@register_importance
class Taylor(Importance):
    """First-order Taylor |w * dL/dw|, from gradients the user computed (``backward``)."""

    name = "taylor"

    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        if not isinstance(tensor, nn.Parameter):
            return None
        if tensor.grad is None:
            raise ConfigError(
                f"importance 'taylor' needs gradients but {fqn} has no .grad; run "
                "loss.backward() on a batch before calling prune()"
            )
        return _rows(tensor * tensor.grad, dim).abs().sum(1)


@register_importance
class RandomImportance(Importance):
    """Uniform random scores from a fixed seed: a baseline for the other criteria."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def score(self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.rand(tensor.shape[dim], generator=self._generator)
