"""Dependency-graph structured pruning: capture a model, find the channels that must be
removed together, rank them, plan, and shrink the model in place.

>>> plan = prune(model, torch.randn(1, 3, 224, 224), ratio=0.5, importance="l2")  # doctest: +SKIP
>>> print(plan)        # groups, channels kept, params and MACs saved
>>> plan.apply()       # slices the tensors; the model stays a plain nn.Module
"""

from prunekit.structured.engine.activation import ActivationImportance
from prunekit.structured.engine.api import prune
from prunekit.structured.engine.capture import CaptureError
from prunekit.structured.engine.hf_config import ConfigNotUpdatedWarning
from prunekit.structured.engine.importance import (
    Importance,
    get_importance,
    importance_names,
    register_importance,
)
from prunekit.structured.engine.layers import LayerPruner, register_layer
from prunekit.structured.engine.plan import PrunePlan

__all__ = [
    "ActivationImportance",
    "CaptureError",
    "ConfigNotUpdatedWarning",
    "Importance",
    "LayerPruner",
    "PrunePlan",
    "get_importance",
    "importance_names",
    "prune",
    "register_importance",
    "register_layer",
]
