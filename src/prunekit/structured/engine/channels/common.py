"""Helpers shared by the op handlers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from prunekit.structured.engine.channels.context import Propagation

__all__ = ["Handler", "arg", "unknown"]

Handler = Callable[[fx.Node, Propagation], Any]


def unknown(node: fx.Node, ctx: Propagation) -> Any:
    """Freeze every tracked input and return an untracked output: always safe."""
    ctx.freeze([ctx.state(a) for a in node.args] + [ctx.state(a) for a in node.kwargs.values()])
    return None


def arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    """Positional argument ``i`` or keyword ``name`` of a call."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
