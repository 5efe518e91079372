"""Structured (channel) pruning that physically shrinks modules.

Reference-compatible pruners (``torch.ao.pruning._experimental.pruner``): row masks with
``FakeStructuredSparsity``, scores from ``SaliencyPruner``/``LSTMSaliencyPruner``/
``FPGMPruner``, and ``prune()`` matching the pattern table of ``default_patterns()``.
"""

from prunekit.structured.base import BaseStructuredSparsifier
from prunekit.structured.engine import ActivationImportance, PrunePlan, prune
from prunekit.structured.parametrization import BiasHook, FakeStructuredSparsity
from prunekit.structured.patterns import default_patterns
from prunekit.structured.prune_functions import (
    prune_conv2d,
    prune_conv2d_activation_conv2d,
    prune_conv2d_activation_pool_conv2d,
    prune_conv2d_activation_pool_flatten_linear,
    prune_conv2d_conv2d,
    prune_conv2d_padded,
    prune_conv2d_pool_activation_conv2d,
    prune_conv2d_pool_conv2d,
    prune_conv2d_pool_flatten_linear,
    prune_linear,
    prune_linear_activation_linear,
    prune_linear_linear,
    prune_lstm_output,
    prune_lstm_output_layernorm_linear,
    prune_lstm_output_linear,
)
from prunekit.structured.pruners import FPGMPruner, LSTMSaliencyPruner, SaliencyPruner

__all__ = [
    "ActivationImportance",
    "BaseStructuredSparsifier",
    "BiasHook",
    "FPGMPruner",
    "FakeStructuredSparsity",
    "LSTMSaliencyPruner",
    "PrunePlan",
    "SaliencyPruner",
    "default_patterns",
    "prune",
    "prune_conv2d",
    "prune_conv2d_activation_conv2d",
    "prune_conv2d_activation_pool_conv2d",
    "prune_conv2d_activation_pool_flatten_linear",
    "prune_conv2d_conv2d",
    "prune_conv2d_padded",
    "prune_conv2d_pool_activation_conv2d",
    "prune_conv2d_pool_conv2d",
    "prune_conv2d_pool_flatten_linear",
    "prune_linear",
    "prune_linear_activation_linear",
    "prune_linear_linear",
    "prune_lstm_output",
    "prune_lstm_output_layernorm_linear",
    "prune_lstm_output_linear",
]
