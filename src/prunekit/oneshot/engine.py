"""The sequential calibration engine: one transformer block after another.

The calibration batches are run through the model once, up to the first block, and
that block's inputs (hidden states plus the keyword arguments a decoder layer gets:
masks, positions, rotary embeddings) are kept. Then, for each block, stage by stage
(layers reading the same input: q/k/v, o_proj, gate/up, down_proj): run the block on
the kept inputs up to the stage's last layer, calibrate, prune; then run the pruned
block to make the inputs of the next one. Only one stage's statistics (Hessians) exist
at any time; the kept hidden states are the one other cost, ``batches x tokens x
width`` floats.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import ConfigError, UnsupportedError
from prunekit.oneshot.blocks import Blocks
from prunekit.oneshot.dense_targets import DenseStream, residual_sink
from prunekit.sparsifier.calibrated import CalibratedSparsifier

__all__ = [
    "BlockInput",
    "call_model",
    "capture_inputs",
    "inference_context",
    "release_free_heap",
    "run_sequential",
]

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
        record = BlockInput(tuple(args), dict(kwargs))
        if records:
            record = _shared_with(record, records[0])
        records.append(record)
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


def _shared_with(record: BlockInput, first: BlockInput) -> BlockInput:
    """``record`` holding ``first``'s own tensors wherever it holds equal ones (rotary
    embeddings, positions and masks repeat from batch to batch): kept once, not once
    per batch. The hidden states (the first argument) are never shared."""
    args = record.args[:1] + tuple(
        _same(value, other) for value, other in zip(record.args[1:], first.args[1:], strict=False))
    kwargs = {key: _same(value, first.kwargs.get(key)) for key, value in record.kwargs.items()}
    return BlockInput(args + record.args[len(args):], kwargs)


def _same(value: Any, other: Any) -> Any:
    """``other`` if it holds the same tensors as ``value`` (a tensor, or a tuple of them
    as rotary embeddings come), else ``value``."""
    if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
        equal = (value.shape == other.shape and value.dtype == other.dtype
                 and value.device == other.device and torch.equal(value, other))
        return other if equal else value
    if isinstance(value, tuple) and isinstance(other, tuple) and len(value) == len(other):
        parts = tuple(_same(v, o) for v, o in zip(value, other, strict=True))
        return other if all(p is o for p, o in zip(parts, other, strict=True)) else value
    return value


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The hidden states a block returns (decoder layers return them first in a tuple)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def _hidden(output: Any, fqn: str) -> torch.Tensor:
    hidden = _first_tensor(output)
    if hidden is None:
        raise UnsupportedError(
            f"block {fqn!r} returned {type(output).__name__}; expected a tensor or a tuple "
            "starting with the hidden states"
        )
    return hidden


def _stages(block: nn.Module, modules: dict[str, nn.Module], record: BlockInput) -> list[list[str]]:
    """The block's layers in the order the forward calls them, grouped into stages of
    consecutive layers that read the very same input tensor (q/k/v, then o_proj, then
    gate/up, then down_proj in a Llama block). Found by one forward on one batch.

    A layer called twice per forward puts all layers in one stage (calibrated together
    on full forwards), as does a block whose layers are not all reached."""
    calls: list[tuple[str, Any]] = []  # the inputs themselves, so identity is safe
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: calls.append((name, args[0] if args else None)))
        for name, module in modules.items()
    ]
    try:
        block(*record.args, **record.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name, _ in calls]
    if len(set(names)) != len(names) or set(names) != set(modules):
        return [list(modules)]
    stages: list[list[str]] = []
    for i, (name, source) in enumerate(calls):
        if i and source is not None and source is calls[i - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


_STOPPED = object()  # what forward_until returns for a forward it ended early


def forward_until(block: nn.Module, record: BlockInput, stop_at: nn.Module | None) -> Any:
    """Run ``block`` on ``record`` and return its output, or ``_STOPPED`` if it ended
    right after ``stop_at`` saw its input (``None``: the whole forward)."""
    handle = None if stop_at is None else stop_at.register_forward_pre_hook(_stop)
    try:
        return block(*record.args, **record.kwargs)
    except _Reached:
        return _STOPPED
    finally:
        if handle is not None:
            handle.remove()


def _hidden_until(
    block: nn.Module, record: BlockInput, stop_at: nn.Module | None
) -> torch.Tensor | None:
    """``forward_until``'s hidden states; None if it stopped or returned no tensor."""
    return _first_tensor(forward_until(block, record, stop_at))


def _calibrate_stage(
    sparsifier: CalibratedSparsifier,
    block: nn.Module,
    stage: dict[str, nn.Module],
    shared_input: bool,
    inputs: list[BlockInput],
    dense: DenseStream | None,
) -> None:
    """Collect the statistics of one stage. ``shared_input``: its layers read one input,
    so only the first layer's statistic is computed (the others get the same tensor)
    and forwards stop at the last layer's input; otherwise they are full forwards.
    With ``dense``, the same forwards also refit the stage to dense targets; a stage of
    one layer whose output joins a residual sum, to the dense value of that sum (see
    ``DenseStream.refit``)."""
    names = list(stage)
    first = [f"{n}.weight" for n in (names[:1] if shared_input else names)]
    sink = (residual_sink(block, stage[names[0]], inputs[0], _hidden_until)
            if dense is not None and len(names) == 1 else None)
    with sparsifier.calibrate(first):
        if dense is not None:
            dense.refit(block, stage, shared_input, inputs, _hidden_until, sink)
        else:
            stop_at = stage[names[-1]] if shared_input else None
            for record in inputs:
                forward_until(block, record, stop_at)
    if shared_input:
        sparsifier.share_statistic(first[0], [f"{n}.weight" for n in names[1:]])


def _stop(module: nn.Module, args: tuple[Any, ...]) -> None:
    raise _Reached


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc only; a no-op elsewhere).

    A block's forwards free their small allocations in an order glibc cannot trim, and
    the pages stay resident: about 20 MiB per block on SmolLM2 (4 MiB after the
    capture), under the peak of every later block."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _advance(block: nn.Module, inputs: list[BlockInput], fqn: str) -> None:
    """Replace every record's hidden states by ``block``'s output on it."""
    for record in inputs:
        record.replace_hidden(_hidden(forward_until(block, record, None), fqn))


def run_sequential(
    template: CalibratedSparsifier,
    model: nn.Module,
    blocks: Blocks,
    configs: dict[str, list[dict[str, Any]]],
    inputs: list[BlockInput],
    progress: bool = True,
    dense: DenseStream | None = None,
) -> None:
    """Calibrate, prune and advance block by block (see the module docstring). Each
    block's layers (``configs[fqn]``, entries of a sparsifier config) get a copy of the
    unprepared ``template`` of their own, prepared just before and squashed just after,
    so masks exist for one block at a time. Inside a block, layers are pruned stage by stage ("true
    sequential"): each stage calibrates on the outputs of the stages before it, already
    pruned. ``dense`` (a ``DenseStream`` over the same inputs) fits every layer to dense
    targets first."""
    bar = tqdm(blocks, desc=type(template).__name__, unit="block",
               disable=None if progress else True)
    for index, (fqn, block) in enumerate(bar):
        release_free_heap()  # what the capture or the last block's forwards left behind
        start = time.perf_counter()
        if dense is not None:
            dense.begin(fqn, block)
        if configs[fqn]:
            _prune_block(copy.deepcopy(template), model, block, configs[fqn], inputs, dense)
        if index + 1 < len(blocks):
            _advance(block, inputs, fqn)
            if dense is not None:
                _advance(dense.block, dense.inputs, fqn)
        log.debug("block %r: %d layers pruned in %.2fs", fqn, len(configs[fqn]),
                  time.perf_counter() - start)


def _prune_block(
    sparsifier: CalibratedSparsifier,
    model: nn.Module,
    block: nn.Module,
    config: list[dict[str, Any]],
    inputs: list[BlockInput],
    dense: DenseStream | None,
) -> None:
    """Prepare ``config`` (layers of ``block``), prune it stage by stage, squash."""
    sparsifier.prepare(model, config)
    by_name = {group["module_fqn"]: group["module"] for group in sparsifier.groups}
    stages = _stages(block, by_name, inputs[0])
    for stage in stages:
        modules = {name: by_name[name] for name in stage}
        _calibrate_stage(sparsifier, block, modules, len(stages) > 1, inputs, dense)
        sparsifier.step(tensor_fqns=[f"{name}.weight" for name in stage])
    sparsifier.squash_mask()
