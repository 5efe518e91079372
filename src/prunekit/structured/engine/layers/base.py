"""One small class per prunable layer type, behind an abstract base and a registry.

A ``LayerPruner`` knows three things about its layer type: how channels flow through it
(``trace``: which parameter dims are coupled to which channel ids), how to fix the
module's attributes once its tensors were sliced (``resize``), and its MACs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from torch import fx, nn

from prunekit.structured.engine.channels.context import Propagation

__all__ = ["LayerPruner", "ShapeOf", "layer_pruner", "register_layer"]

ShapeOf = Callable[[str], tuple[int, ...]]

_REGISTRY: dict[type[nn.Module], LayerPruner] = {}
_LAZY: list[tuple[Callable[[], type[nn.Module] | None], LayerPruner]] = []
_MATCHING: list[LayerPruner] = []


class LayerPruner(ABC):
    """Channel semantics of one layer type (e.g. ``nn.Conv2d``). ``lazy_types`` find
    types of libraries prunekit does not import (transformers' ``Conv1D``): each is
    registered once its library has been loaded."""

    types: ClassVar[tuple[type[nn.Module], ...]] = ()
    lazy_types: ClassVar[tuple[Callable[[], type[nn.Module] | None], ...]] = ()

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Modules of no registered type this pruner also takes (a family of classes
        no list can name, e.g. every transformers model's own RMSNorm)."""
        return False

    @abstractmethod
    def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Propagation) -> Any:
        """Register the module's members with ``ctx`` and return its output's state."""

    @abstractmethod
    def resize(self, module: nn.Module) -> None:
        """Update size attributes (``out_channels``...) after the tensors were sliced.
        Attributes still hold their old values when this is called."""

    def macs(self, module: nn.Module, out_shape: Any, shape_of: ShapeOf) -> int:
        """Multiply-accumulates of one call, given the (possibly pruned) tensor shapes."""
        return 0


def register_layer(cls: type[LayerPruner]) -> type[LayerPruner]:
    """Class decorator: make ``cls`` the pruner of every type in ``cls.types``."""
    instance = cls()
    for t in cls.types:
        _REGISTRY[t] = instance
    _LAZY.extend((find, instance) for find in cls.lazy_types)
    if cls.matches.__func__ is not LayerPruner.matches.__func__:  # type: ignore[attr-defined]
        _MATCHING.append(instance)
    return cls


def layer_pruner(module: nn.Module) -> LayerPruner | None:
    for find, instance in _LAZY:
        found = find()
        if found is not None:
            _REGISTRY.setdefault(found, instance)
    for t in type(module).__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t]
    return next((instance for instance in _MATCHING if instance.matches(module)), None)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
