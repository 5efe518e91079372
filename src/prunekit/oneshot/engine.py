"""The sequential calibration engine: one transformer block after another.

The calibration batches are run through the model once, up to the first block, and
that block's inputs (hidden states plus the keyword arguments a decoder layer gets:
masks, positions, rotary embeddings) are kept; where later blocks get other masks or
embeddings (Gemma's sliding and global layers), theirs too. Then, for each block, stage by stage
(layers reading the same input: q/k/v, o_proj, gate/up, down_proj; or one projection
of every expert, see ``experts``): run the block on the kept inputs up to the stage's
last layer, calibrate, prune (a layer no token reached, by weight magnitude); then run
the pruned block to make the inputs of the next one. Only one stage's statistics
(Hessians) exist at any time; the kept hidden states are the one other cost, ``batches
x tokens x width`` floats, in memory or on disk (``offload.OffloadedInputs``).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from prunekit._glibc import glibc_function
from prunekit.errors import ConfigError, ConfigTypeError, PruneKitError, UnsupportedError
from prunekit.experts import ParallelLayers
from prunekit.oneshot.blocks import Blocks
from prunekit.oneshot.dense_targets import DenseStream, residual_sink
from prunekit.oneshot.offload import OffloadedInputs
from prunekit.sparsifier.calibrated import CalibratedSparsifier

__all__ = [
    "BlockInput",
    "Records",
    "add_input_squares",
    "batch_list",
    "call_model",
    "capture_inputs",
    "inference_context",
    "release_free_heap",
    "run_batches",
    "run_sequential",
]

log = logging.getLogger(__name__)


class _Reached(Exception):
    """Raised by a hook to end a forward early, once it reached what it was run for."""


@dataclass
class BlockInput:
    """What one calibration batch passes to a block: ``block(*args, **kwargs)``.

    ``later`` holds, in order, what the batch passes the blocks after this one besides
    the hidden states (these set to None), when blocks get inputs of their own: a mask
    or rotary embedding per attention type, as Gemma's sliding and global layers do.
    Empty when every block gets the first one's."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    later: list[BlockInput] = field(default_factory=list)

    @property
    def hidden(self) -> Any:
        """The hidden states this record feeds the block (None where there are none)."""
        return self.args[0] if self.args else self.kwargs.get("hidden_states")

    def replace_hidden(self, hidden: torch.Tensor | None) -> None:
        """Feed ``hidden`` (the previous block's output) as this block's input."""
        if self.args:
            self.args = (hidden, *self.args[1:])
        elif "hidden_states" in self.kwargs:
            self.kwargs["hidden_states"] = hidden
        else:
            raise UnsupportedError(
                f"a block was called with keywords {sorted(self.kwargs)} only; expected the "
                "hidden states first or as hidden_states="
            )

    def advance(self, hidden: torch.Tensor) -> None:
        """Become the next block's input: ``hidden`` (this block's output) with the next
        block's own other inputs, if it has some."""
        if self.later:
            following = self.later.pop(0)
            self.args, self.kwargs = following.args, dict(following.kwargs)
        self.replace_hidden(hidden)

    def copy(self) -> BlockInput:
        """An independent record holding the same tensors."""
        return BlockInput(self.args, dict(self.kwargs), list(self.later))

    def without_hidden(self) -> BlockInput:
        """A copy whose hidden states are None: what any block of its kind gets besides."""
        other = self.copy()
        other.replace_hidden(None)
        return other


Records = list[BlockInput] | OffloadedInputs  # one calibration stream's block inputs


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run one batch: a dict as keyword arguments, a tuple/list as positional ones."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_list(where: str, batches: Any, allow_empty: bool = False) -> list[Any]:
    """``batches`` as a list, non-empty unless ``allow_empty``; a lone tensor, dict or
    string is refused (a list of one was meant, and iterating it would split it)."""
    if batches is None or isinstance(batches, (torch.Tensor, dict, str)):
        raise ConfigTypeError(f"{where}: calibration_batches must be a list of batches, got "
                              f"{type(batches).__name__} (each batch a tensor, dict or "
                              "tuple); wrap one batch in a list")
    listed = list(batches)
    if not listed and not allow_empty:
        raise ConfigError(f"{where}: no calibration batches; give at least one")
    return listed


def add_input_squares(total: torch.Tensor, _module: nn.Module, args: tuple, dim: int = -1
                      ) -> None:  # fmt: skip
    """Forward pre-hook: add the squares of the layer's input, per feature along ``dim``
    (the last for linear layers, 1 for convolutions), to ``total``."""
    x = args[0].detach().movedim(dim, -1)
    total.add_(x.reshape(-1, x.shape[-1]).double().square().sum(0).cpu())


def run_batches(model: nn.Module, batches: Sequence[Any], hooks: Sequence[RemovableHandle]
                ) -> None:  # fmt: skip
    """Run every batch through ``model`` in ``inference_context`` for the ``hooks`` the
    caller registered, then remove them, also on failure. A failing forward raises
    ``ConfigError`` naming the batch; prunekit's own errors (raised by a hook) pass through."""
    try:
        with inference_context(model):
            for i, batch in enumerate(batches):
                try:
                    call_model(model, batch)
                except PruneKitError:
                    raise
                except Exception as err:
                    raise ConfigError(f"calibration batch {i}: the model's forward failed: "
                                      f"{type(err).__name__}: {err}") from err
    finally:
        for hook in hooks:
            hook.remove()


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
    model: nn.Module, blocks: Blocks, batches: Sequence[Any], into: Records | None = None
) -> Records:
    """The inputs of the first block for every batch, appended to ``into`` (a new list
    by default; ``OffloadedInputs`` to keep them on disk). The first batch runs through the
    whole model, so that a batch the model rejects anywhere raises ``ConfigError`` before
    any weight changes; the others stop at the first block, unless that block is the
    whole model (then every batch runs once here, for the same reason).

    If the blocks get different inputs besides the hidden states (seen on the first
    batch, or announced by a config's ``layer_types``), each record keeps the later
    blocks' inputs too (``later``), and the others run up to the last block instead, or
    only up to the first block of the last type to appear where the first batch showed
    that blocks of one type get the same inputs (``_sources_by_type``). Equal tensors
    (masks, rotary embeddings, positions) are kept once across batches and blocks;
    hidden states are kept for the first block only."""
    kept = _Kept()
    seen: list[BlockInput] = []  # the batch in flight: one record per block reached
    stop_after: int | None = None  # the block whose input ends a forward early

    def hook(index: int, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        record = kept.share(BlockInput(tuple(args), dict(kwargs)))
        if index:
            record.replace_hidden(None)  # later blocks get theirs from the engine
        seen.append(record)
        if index == stop_after:
            raise _Reached

    handles = [block.register_forward_pre_hook(functools.partial(hook, i), with_kwargs=True)
               for i, (_, block) in enumerate(blocks)]
    records: Records = [] if into is None else into
    sources: list[int] = [0]  # per block: the block whose inputs it gets (a record kept)
    try:
        for i, batch in enumerate(batches):
            seen.clear()
            kept.new_batch()
            try:
                call_model(model, batch)
            except _Reached:
                pass
            except Exception as err:
                raise ConfigError(
                    f"calibration batch {i}: the model's forward failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
            if i == 0 and len(blocks) > 1 and seen and _inputs_differ(model, seen):
                sources = list(range(len(blocks)))
            needed = max(sources) + 1
            if len(seen) < needed:
                raise ConfigError(f"calibration batch {i}: the forward never reached block "
                                  f"{blocks[len(seen)][0]!r}")
            records.append(_with_later(seen, sources))
            if i == 0 and len(sources) > 1:
                sources = _sources_by_type(model, seen) or sources
            if blocks[0][1] is not model:
                stop_after = max(sources)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _with_later(seen: list[BlockInput], sources: list[int]) -> BlockInput:
    """The first block's record, its ``later`` the inputs of blocks 1.. taken from their
    source blocks' records (read only, so blocks of one type share one)."""
    first = seen[0]
    if len(sources) > 1:
        rest = first.without_hidden()
        first.later = [seen[s] if s else rest for s in sources[1:]]
    return first


def _layer_types(model: nn.Module) -> list[Any] | None:
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    return list(layer_types) if isinstance(layer_types, (list, tuple)) else None


def _sources_by_type(model: nn.Module, seen: list[BlockInput]) -> list[int] | None:
    """Per block, the first block of its ``config.layer_types`` type, if every block got
    exactly that block's inputs on this batch (None otherwise): then a batch need only
    run up to the first block of each type. Gemma 3 (five sliding layers to a global
    one) reaches block 5 instead of its last."""
    types = _layer_types(model)
    if types is None or len(types) != len(seen):
        return None
    sources = [types.index(t) for t in types]
    return sources if _inputs_follow(seen, sources) else None


def _inputs_differ(model: nn.Module, records: list[BlockInput]) -> bool:
    """Whether blocks get inputs of their own besides the hidden states: different ones
    on this batch, or attention types that differ per layer (their masks differ only
    once a sequence is longer than the sliding window)."""
    if not _inputs_follow(records, [0] * len(records)):
        return True
    layer_types = _layer_types(model)
    return layer_types is not None and len(set(layer_types)) > 1


def _inputs_follow(records: list[BlockInput], sources: list[int]) -> bool:
    """Whether block ``j`` got exactly block ``sources[j]``'s inputs besides the hidden
    states (after ``_Kept``, equal tensors are the same object)."""
    others = [records[0].without_hidden(), *records[1:]]
    return all(_same_objects((r.args, r.kwargs), (others[s].args, others[s].kwargs))
               for r, s in zip(others, sources, strict=True))


def _same_objects(value: Any, other: Any) -> bool:
    """The same tensors (by identity) in the same structure, equal plain values."""
    if isinstance(value, (tuple, list)) and isinstance(other, (tuple, list)):
        return len(value) == len(other) and all(map(_same_objects, value, other))
    if isinstance(value, dict) and isinstance(other, dict):
        return value.keys() == other.keys() and all(
            _same_objects(value[k], other[k]) for k in value)
    plain = (bool, int, float, str)
    return value is other or (type(value) is type(other) and isinstance(value, plain)
                              and value == other)


class _Kept:
    """Inputs kept once: a tensor (or tuple of them, as rotary embeddings come) equal to
    one kept before is replaced by that one. The hidden states are never shared."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.tuples: list[tuple[Any, ...]] = []
        self.this_batch: dict[int, tuple[Any, Any]] = {}  # id -> (object, kept one)

    def new_batch(self) -> None:
        self.this_batch.clear()

    def share(self, record: BlockInput) -> BlockInput:
        args = record.args[:1] + tuple(self._value(v) for v in record.args[1:])
        kwargs = {key: value if key == "hidden_states" else self._value(value)
                  for key, value in record.kwargs.items()}
        return BlockInput(args, kwargs)

    def _value(self, value: Any) -> Any:
        hit = self.this_batch.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        if isinstance(value, torch.Tensor):
            result = next((t for t in self.tensors if _equal(value, t)), None)
            if result is None:
                self.tensors.append(value)
                result = value
        elif isinstance(value, tuple):
            parts = tuple(self._value(v) for v in value)
            result = next((t for t in self.tuples if _same_objects(parts, t)), None)
            if result is None:
                self.tuples.append(parts)
                result = parts
        else:
            return value
        self.this_batch[id(value)] = (value, result)
        return result


def _equal(value: torch.Tensor, other: torch.Tensor) -> bool:
    return (value.shape == other.shape and value.dtype == other.dtype
            and value.device == other.device and torch.equal(value, other))


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


@dataclass
class Stage:
    """Layers calibrated on the same forwards and pruned together: none reads what
    another computes. ``shared``: they read one input tensor, whose statistic is
    computed once; ``ordered``: the forward calls them once each, in this order, so
    forwards can end at the last one's input (else they run through)."""

    names: list[str]
    shared: bool
    ordered: bool = True


def _parallel_groups(block: nn.Module) -> dict[int, int]:
    """``id(layer) -> id(its ParallelLayers)`` for the block's parallel layers."""
    return {id(layer): id(group) for group in block.modules()
            if isinstance(group, ParallelLayers) for layer in group}


def _stages(block: nn.Module, modules: dict[str, nn.Module], record: BlockInput) -> list[Stage]:
    """The block's layers in the order the forward calls them, grouped into stages of
    consecutive layers that read the very same input tensor (q/k/v, then o_proj, then
    gate/up, then down_proj in a Llama block) or belong to one ``ParallelLayers`` (the
    up projections of a bank's experts). Found by one forward on one batch.

    A layer called twice per forward puts all layers in one stage (calibrated together
    on full forwards, each layer on its own statistic), as does a block whose layers are
    not all reached, or all read one input."""
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
    whole = [Stage(list(modules), shared=False, ordered=False)]
    if len(set(names)) != len(names) or set(names) != set(modules):
        return whole
    groups = _parallel_groups(block)
    stages: list[Stage] = []
    for i, (name, source) in enumerate(calls):
        before, before_source = calls[i - 1] if i else (None, None)
        group = groups.get(id(modules[name]))
        if source is not None and source is before_source:
            stages[-1].names.append(name)
        elif group is not None and before and group == groups.get(id(modules[before])):
            stages[-1].names.append(name)
            stages[-1].shared = False
        else:
            stages.append(Stage([name], shared=True))
    return stages if len(stages) > 1 else whole


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
    stage: Stage,
    modules: dict[str, nn.Module],
    inputs: Records,
    dense: DenseStream | None,
) -> None:
    """Collect the statistics of one stage (``modules``: its layers by name). A shared
    stage computes only the first layer's statistic (the others get the same tensor);
    an ordered one ends its forwards at the last layer's input. With ``dense``, the
    same forwards also refit the stage to dense targets; a stage of one layer whose
    output joins a residual sum, to the dense value of that sum (see
    ``DenseStream.refit``). A parallel stage (experts) is not refitted: each expert
    sees other tokens in the dense model, so its inputs cannot be paired row by row."""
    names = stage.names
    first = [f"{n}.weight" for n in (names[:1] if stage.shared else names)]
    refit = dense is not None and (stage.shared or not stage.ordered)
    sink = (residual_sink(block, modules[names[0]], inputs[0], _hidden_until)
            if refit and len(names) == 1 else None)
    with sparsifier.calibrate(first):
        if refit:
            dense.refit(block, modules, stage.shared and stage.ordered, inputs, _hidden_until,
                        sink)
        else:
            stop_at = modules[names[-1]] if stage.ordered else None
            for record in inputs:
                forward_until(block, record, stop_at)
    if stage.shared:
        sparsifier.share_statistic(first[0], [f"{n}.weight" for n in names[1:]])


def _stop(module: nn.Module, args: tuple[Any, ...]) -> None:
    raise _Reached


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc only; a no-op elsewhere).

    A block's forwards free their small allocations in an order glibc cannot trim, and
    the pages stay resident: about 20 MiB per block on SmolLM2 (4 MiB after the
    capture), under the peak of every later block."""
    trim = glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def _advance(block: nn.Module, inputs: Records, fqn: str) -> None:
    """Replace every record's hidden states by ``block``'s output on it."""
    for index, record in enumerate(inputs):
        record.advance(_hidden(forward_until(block, record, None), fqn))
        inputs[index] = record  # stores it again where the records are offloaded


def run_sequential(
    template: CalibratedSparsifier,
    model: nn.Module,
    blocks: Blocks,
    configs: dict[str, list[dict[str, Any]]],
    inputs: Records,
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
    unreached: list[str] = []
    for index, (fqn, block) in enumerate(bar):
        release_free_heap()  # what the capture or the last block's forwards left behind
        start = time.perf_counter()
        if dense is not None:
            dense.begin(fqn, block)
        if configs[fqn]:
            unreached += _prune_block(copy.deepcopy(template), model, block, configs[fqn],
                                      inputs, dense)
        if index + 1 < len(blocks):
            _advance(block, inputs, fqn)
            if dense is not None:
                _advance(dense.block, dense.inputs, fqn)
        log.debug("block %r: %d layers pruned in %.2fs", fqn, len(configs[fqn]),
                  time.perf_counter() - start)
    if unreached:
        warnings.warn(
            f"oneshot: no calibration token reached {len(unreached)} layer(s) "
            f"({', '.join(unreached[:4])}{', ...' if len(unreached) > 4 else ''}), experts "
            "no token was routed to; they were pruned by weight magnitude. More calibration "
            "data reaches more of them.", stacklevel=3)


def _prune_block(
    sparsifier: CalibratedSparsifier,
    model: nn.Module,
    block: nn.Module,
    config: list[dict[str, Any]],
    inputs: Records,
    dense: DenseStream | None,
) -> list[str]:
    """Prepare ``config`` (layers of ``block``), prune it stage by stage, squash.
    Returns the layers no calibration token reached (experts no token chose), which
    were pruned as if their inputs were white: by weight magnitude."""
    sparsifier.prepare(model, config)
    by_name = {group["module_fqn"]: group["module"] for group in sparsifier.groups}
    unreached: list[str] = []
    for stage in _stages(block, by_name, inputs[0]):
        _calibrate_stage(sparsifier, block, stage, {n: by_name[n] for n in stage.names},
                         inputs, dense)
        fqns = [f"{name}.weight" for name in stage.names]
        missed = sparsifier.uncalibrated(fqns)
        sparsifier.assume_white_inputs(missed)
        unreached += [fqn.removesuffix(".weight") for fqn in missed]
        sparsifier.step(tensor_fqns=fqns)
    sparsifier.squash_mask()
    return unreached
