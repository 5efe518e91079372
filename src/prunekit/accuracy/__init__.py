"""Accuracy that survives pruning: global budgets (magnitude or LAMP) with per-layer
bounds, one-layer-at-a-time sensitivity scans, and recovery training (gradual pruning
with masks kept through the optimizer, knowledge distillation, short fine-tunes)."""

from prunekit.accuracy.allocation import global_levels, lamp_scores
from prunekit.accuracy.global_sparsifier import GlobalSparsifier
from prunekit.accuracy.lamp_importance import LAMPImportance
from prunekit.accuracy.recovery import (
    distillation_loss,
    finetune,
    gradual_prune,
    keep_masks,
    masked_tensors,
)
from prunekit.accuracy.sensitivity import SensitivityTable, allocate, sensitivity_scan

__all__ = [
    "GlobalSparsifier",
    "LAMPImportance",
    "SensitivityTable",
    "allocate",
    "distillation_loss",
    "finetune",
    "global_levels",
    "gradual_prune",
    "keep_masks",
    "lamp_scores",
    "masked_tensors",
    "sensitivity_scan",
]
