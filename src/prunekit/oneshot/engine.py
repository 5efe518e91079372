"""The sequential calibration engine: one transformer block after another.

The calibration batches are run through the model once, up to the first block, and
that block's inputs (hidden states plus the keyword arguments a decoder layer gets:
masks, positions, rotary embeddings) are kept. Then, for each block: calibrate its
layers on the kept inputs, prune them, and run the pruned block to make the inputs of
the next one. Only one block's statistics (Hessians) exist at any time; the kept
hidden states are the one other cost, ``batches x tokens x width`` floats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import ConfigError, UnsupportedError
from prunekit.oneshot.blocks import Blocks
from prunekit.sparsifier.calibrated import CalibratedSparsifier

__all__ = ["BlockInput", "call_model", "capture_inputs", "inference_context", "run_sequential"]

log = logging.getLogger(__name__)


class _Reached(Exception):
    """Raised by the capture hook to stop the forward at the first block."""


@dataclass
class BlockInput:
    """What one calibration batch passes to a block: ``block(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def replace_hidden(self, hidden: torch.Tensor) -> None:
        """Feed ``hidden`` (the previous block's output) as the next block's input."""
        if self.args:
            self.args = (hidden, *self.args[1:])
        elif "hidden_states" in self.kwargs:
            self.kwargs["hidden_states"] = hidden
        else:
            raise UnsupportedError(
                f"a block was called with keywords {sorted(self.kwargs)} only; expected the "
                "hidden states first or as hidden_states="
            )


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run one batch: a dict as keyword arguments, a tuple/list as positional ones."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd and no KV cache while calibrating; restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        model.eval()
        if use_cache is not None:
            config.use_cache = False
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        if use_cache is not None:
            config.use_cache = use_cache


def capture_inputs(
    model: nn.Module, first: tuple[str, nn.Module], batches: Sequence[Any]
) -> list[BlockInput]:
    """The inputs of the first block for every batch. The first batch runs through the
    whole model, so that a batch the model rejects anywhere raises ``ConfigError`` before
    any weight changes; the others stop at the first block, unless that block is the
    whole model (then every batch runs once here, for the same reason)."""
    fqn, block = first
    records: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        records.append(BlockInput(tuple(args), dict(kwargs)))
        if len(records) > 1 and block is not model:
            raise _Reached

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                call_model(model, batch)
            except _Reached:
                pass
            except Exception as err:
                raise ConfigError(
                    f"calibration batch {i}: the model's forward failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
            if len(records) != i + 1:
                raise ConfigError(
                    f"calibration batch {i}: the forward never reached block {fqn!r}"
                )
    finally:
        handle.remove()
    return records


def _hidden(output: Any, fqn: str) -> torch.Tensor:
    """The hidden states a block returns (decoder layers return them first in a tuple)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise UnsupportedError(
            f"block {fqn!r} returned {type(output).__name__}; expected a tensor or a tuple "
            "starting with the hidden states"
        )
    return output


def run_sequential(
    sparsifier: CalibratedSparsifier,
    blocks: Blocks,
    layers: dict[str, list[str]],
    inputs: list[BlockInput],
    progress: bool = True,
) -> None:
    """Calibrate, prune and advance block by block (see the module docstring)."""
    bar = tqdm(blocks, desc=f"{type(sparsifier).__name__}", unit="block",
               disable=None if progress else True)
    for index, (fqn, block) in enumerate(bar):
        start = time.perf_counter()
        names = [f"{layer}.weight" for layer in layers[fqn]]
        if names:
            with sparsifier.calibrate(names):
                for record in inputs:
                    block(*record.args, **record.kwargs)
            sparsifier.step(tensor_fqns=names)
        if index + 1 < len(blocks):
            for record in inputs:
                record.replace_hidden(_hidden(block(*record.args, **record.kwargs), fqn))
        log.debug("block %r: %d layers pruned in %.2fs", fqn, len(names),
                  time.perf_counter() - start)
