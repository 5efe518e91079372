"""Registered layer pruners; importing this package registers every built-in type."""

from prunekit.structured.engine.layers import (  # noqa: F401  (registration)
    attention,
    conv,
    linear,
    norm,
    recurrent,
)
from prunekit.structured.engine.layers.base import (
    LayerPruner,
    layer_pruner,
    register_layer,
)

__all__ = ["LayerPruner", "layer_pruner", "register_layer"]
