"""The reference's pattern functions, by name and signature: each shrinks one prepared
layer (the first argument) and the layer that reads it.

They take the matched modules/functions in pattern order, as the reference's do, and are
checked before they change anything. ``*_conv2d_*`` functions accept any of Conv1d/2d/3d.
``BaseStructuredSparsifier.prune`` recognises them and hands them the whole branch it
traced instead (so BatchNorm/Dropout between the layers and several consumers work).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.errors import UnsupportedError
from prunekit.structured.lstm import check_lstm, shrink_lstm
from prunekit.structured.shrink import (
    Branch,
    Step,
    bake_mask,
    check_branches,
    shrink_layer,
    structured_mask,
)
from prunekit.structured.steps import function_step, module_step

__all__ = [
    "BUILTIN_PATTERN_FUNCTIONS",
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


def _step(op: Any, position: int) -> Step | None:
    if op is None:
        return None
    name = f"argument {position} ({type(op).__name__ if isinstance(op, nn.Module) else op})"
    if isinstance(op, nn.Module):
        return module_step(op, name)
    if callable(op):
        return function_step(op, name)
    raise UnsupportedError(f"prune: argument {position} must be a module or a function, got {op!r}")


def _run(producer: nn.Module, consumer: nn.Module | None, *ops: Any, flatten: bool = False):
    mask = structured_mask(producer)
    if mask is None:
        raise UnsupportedError(
            f"prune: {type(producer).__name__} has no FakeStructuredSparsity on its weight; "
            "prepare it with a structured pruner first"
        )
    steps = [s for i, op in enumerate(ops, start=2) if (s := _step(op, i)) is not None]
    branch = Branch(f"consumer {type(consumer).__name__}", steps, consumer, flatten=flatten)
    check_branches(producer, type(producer).__name__, mask.numel(), [branch])
    shrink_layer(producer, [branch])


def prune_linear(linear: nn.Linear) -> None:
    """Linear → output: drop its masked rows (the model's output gets narrower)."""
    _run(linear, None)


def prune_linear_linear(linear1: nn.Linear, linear2: nn.Linear) -> None:
    """Linear → Linear."""
    _run(linear1, linear2)


def prune_linear_activation_linear(
    linear1: nn.Linear, activation: Callable | nn.Module | None, linear2: nn.Linear
) -> None:
    """Linear → activation → Linear (the pruned bias is folded through the activation)."""
    _run(linear1, linear2, activation)


def prune_conv2d(conv2d: nn.Module) -> None:
    """Conv → output."""
    _run(conv2d, None)


def prune_conv2d_padded(conv2d_1: nn.Module) -> None:
    """Keep the full width and bake the mask (and masked bias) into the layer: what happens
    when a non-zero pruned constant meets a zero-padded consumer."""
    mask = structured_mask(conv2d_1)
    if mask is None:
        raise UnsupportedError("prune_conv2d_padded: the layer has no FakeStructuredSparsity")
    bake_mask(conv2d_1, mask)


def prune_conv2d_conv2d(conv2d_1: nn.Module, conv2d_2: nn.Module) -> None:
    """Conv → Conv."""
    _run(conv2d_1, conv2d_2)


def prune_conv2d_activation_conv2d(
    conv2d_1: nn.Module, activation: Callable | nn.Module | None, conv2d_2: nn.Module
) -> None:
    """Conv → activation → Conv."""
    _run(conv2d_1, conv2d_2, activation)


def prune_conv2d_pool_conv2d(c1: nn.Module, pool: Callable | nn.Module, c2: nn.Module) -> None:
    """Conv → pool → Conv (not in the reference)."""
    _run(c1, c2, pool)


def prune_conv2d_pool_activation_conv2d(
    c1: nn.Module, pool: Callable | nn.Module, activation: Callable | nn.Module | None,
    c2: nn.Module,
) -> None:
    """Conv → pool → activation → Conv."""
    _run(c1, c2, pool, activation)


def prune_conv2d_activation_pool_conv2d(
    c1: nn.Module, activation: Callable | nn.Module | None, pool: Callable | nn.Module,
    c2: nn.Module,
) -> None:
    """Conv → activation → pool → Conv."""
    _run(c1, c2, activation, pool)


def prune_conv2d_pool_flatten_linear(
    conv2d: nn.Module, pool: Callable | nn.Module, flatten: Callable | nn.Module | None,
    linear: nn.Linear,
) -> None:
    """Conv → adaptive pool → flatten → Linear (the Linear's columns go by channel groups)."""
    _run(conv2d, linear, pool, flatten=True)


def prune_conv2d_activation_pool_flatten_linear(
    conv2d: nn.Module, activation: Callable | nn.Module | None, pool: Callable | nn.Module,
    flatten: Callable | nn.Module | None, linear: nn.Linear,
) -> None:
    """Conv → activation → adaptive pool → flatten → Linear (not in the reference)."""
    _run(conv2d, linear, activation, pool, flatten=True)


def _run_lstm(lstm: nn.LSTM, layernorm: nn.LayerNorm | None, linear: nn.Linear | None) -> None:
    steps = [module_step(layernorm, "LayerNorm")] if layernorm is not None else []
    branch = Branch(f"consumer {type(linear).__name__}", steps, linear)
    check_lstm(lstm, "LSTM", [branch])
    shrink_lstm(lstm, [branch])


def prune_lstm_output_linear(lstm: nn.LSTM, getitem: Callable, linear: nn.Linear) -> None:
    """LSTM → [0] → Linear."""
    _run_lstm(lstm, None, linear)


def prune_lstm_output_layernorm_linear(
    lstm: nn.LSTM, getitem: Callable, layernorm: nn.LayerNorm | None, linear: nn.Linear
) -> None:
    """LSTM → [0] → LayerNorm → Linear. The LayerNorm is sliced as the reference does; it
    normalises over fewer features afterwards, so this one is not exact."""
    _run_lstm(lstm, layernorm, linear)


def prune_lstm_output(lstm: nn.LSTM, getitem: Callable) -> None:
    """LSTM → output (not in the reference): the output loses the dropped units."""
    _run_lstm(lstm, None, None)


#: The functions ``prune()`` replaces by its own traced-branch handling.
BUILTIN_PATTERN_FUNCTIONS: frozenset[Callable[..., None]] = frozenset({
    prune_linear, prune_linear_linear, prune_linear_activation_linear, prune_conv2d,
    prune_conv2d_conv2d, prune_conv2d_activation_conv2d, prune_conv2d_pool_activation_conv2d,
    prune_conv2d_pool_conv2d,
    prune_conv2d_activation_pool_conv2d, prune_conv2d_pool_flatten_linear,
    prune_conv2d_activation_pool_flatten_linear, prune_lstm_output_linear,
    prune_lstm_output_layernorm_linear, prune_lstm_output,
})
