"""``oneshot``: prune a pretrained model in one call from a few calibration batches."""

from __future__ import annotations

import numbers
import os
import statistics
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.experts import expand_parallel, unfused_experts
from prunekit.fqn import fqn_to_module
from prunekit.linear_like import LAYER_KINDS, in_features, is_conv1d
from prunekit.oneshot.blocks import Blocks, resolve_blocks, resolve_layers
from prunekit.oneshot.dense_targets import DenseStream
from prunekit.oneshot.engine import (
    Records,
    batch_list,
    capture_inputs,
    inference_context,
    run_sequential,
)
from prunekit.oneshot.offload import OffloadedInputs, check_folder, offload_directory
from prunekit.parametrization import original_tensor
from prunekit.sparsifier._checks import check_level
from prunekit.sparsifier.admm import AdmmSparsifier
from prunekit.sparsifier.calibrated import CalibratedSparsifier, Pattern, parse_pattern
from prunekit.sparsifier.sparsegpt import SparseGPTSparsifier
from prunekit.sparsifier.wanda import WandaSparsifier
from prunekit.sparsifier.weight_norm import WeightNormSparsifier

__all__ = ["METHODS", "oneshot"]

METHODS = ("admm", "magnitude", "sparsegpt", "wanda")
Target = tuple[float, tuple[int, int] | None]


def _target(where: str, sparsity: Any, pattern: Pattern) -> Target:
    """``(level, nm)``: a pattern fixes the level at 1 - N/M; ``sparsity`` may repeat it."""
    nm = parse_pattern(where, pattern)
    if sparsity is None:
        return (0.5 if nm is None else 1 - nm[0] / nm[1]), nm
    level = check_level(where, "sparsity", sparsity)
    if nm is not None and abs(level - (1 - nm[0] / nm[1])) > 1e-9:
        raise ConfigError(
            f"{where}: pattern {nm[0]}:{nm[1]} means sparsity {1 - nm[0] / nm[1]}, got "
            f"sparsity={sparsity}; pass sparsity=None with a pattern"
        )
    return level, nm


def _entries(
    model: nn.Module, layers: list[str], target: Target, overrides: Mapping[str, Any] | None
) -> dict[str, Target]:
    """``{layer: (level, nm)}`` with the overrides applied and every N:M width checked."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigTypeError(f"overrides must map layer fqns to a sparsity or 'N:M', got "
                              f"{type(overrides).__name__}")
    overrides = {layer: value for name, value in dict(overrides or {}).items()
                 for layer in expand_parallel(model, [name])}
    unknown = sorted(set(overrides) - set(layers))
    if unknown:
        raise FqnError(f"overrides: {unknown} are not pruned layers; expected some of "
                       f"{layers[:6]}{'...' if len(layers) > 6 else ''}")
    entries = {}
    for layer in layers:
        value = overrides.get(layer)
        where = f"overrides[{layer!r}]"
        if value is None:
            entries[layer] = target
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            entries[layer] = _target(where, value, None)
        else:
            entries[layer] = _target(where, None, value)
        nm, width = entries[layer][1], in_features(fqn_to_module(model, layer))
        if nm is not None and width % nm[1]:
            raise ConfigError(f"layer {layer!r}: pattern {nm[0]}:{nm[1]} needs in_features to be "
                              f"a multiple of {nm[1]}, got {width}")
    return entries


def _check_token_ids(i: int, ids: torch.Tensor, vocab: int) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConfigTypeError(f"calibration batch {i}: token ids must be an integer tensor, "
                              f"got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.numel() == 0:
        raise ConfigError(f"calibration batch {i}: token ids must have shape (batch, seq_len), "
                          f"got {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ConfigError(f"calibration batch {i}: token ids must lie in [0, {vocab}), got "
                          f"[{low}, {high}]")


def check_batches(model: nn.Module, batches: Any, where: str, allow_empty: bool = False
                  ) -> list[Any]:  # fmt: skip
    """The batches as a list, each a tensor, dict or tuple; token ids (when the model has
    a ``config.vocab_size``) checked for dtype, shape and range. ``where`` names the caller."""
    if batches is None and allow_empty:
        return []
    batches = batch_list(where, batches, allow_empty=allow_empty)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, dict, tuple, list)):
            raise ConfigTypeError(f"calibration batch {i}: expected a tensor, dict or tuple, got "
                                  f"{type(batch).__name__}")
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if isinstance(vocab, int) and isinstance(ids, torch.Tensor):
            _check_token_ids(i, ids, vocab)
    return batches


def _magnitude(model: nn.Module, entries: dict[str, Target]) -> None:
    """Per-layer magnitude pruning (|w|), unstructured or N:M, with WeightNormSparsifier:
    the whole config checked first, then one layer at a time (one mask at a time). N:M
    groups run along the inputs: a Conv1D weight (``in x out``) has them down its columns."""
    config = []
    for layer, (level, nm) in entries.items():
        shape = {"sparsity_level": level, "sparse_block_shape": (1, 1), "zeros_per_block": 1}
        if nm is not None:
            block = (nm[1], 1) if is_conv1d(fqn_to_module(model, layer)) else (1, nm[1])
            shape = {"sparsity_level": 1.0, "sparse_block_shape": block,
                     "zeros_per_block": nm[1] - nm[0]}
        config.append({"tensor_fqn": f"{layer}.weight", **shape})
    WeightNormSparsifier(norm=1).check_config(model, config)
    for entry in config:
        sparsifier = WeightNormSparsifier(norm=1)
        sparsifier.prepare(model, [entry])
        sparsifier.step()
        sparsifier.squash_mask()


def _sparsifier(
    method: str, target: Target, blocksize: int, percdamp: float, exact_update: bool
) -> CalibratedSparsifier | None:
    if exact_update and method != "sparsegpt":
        raise ConfigError(f"oneshot(method={method!r}): exact_update refines SparseGPT's "
                          "weight update; 'admm' ends with an exact one already, 'wanda' and "
                          "'magnitude' make none")
    if method == "sparsegpt":
        return SparseGPTSparsifier(target[0], target[1], blocksize=blocksize, percdamp=percdamp,
                                   exact_update=exact_update)
    if method == "wanda":
        return WandaSparsifier(target[0], target[1])
    if method == "admm":
        return AdmmSparsifier(target[0], target[1], percdamp=percdamp)
    return None


def oneshot(
    model: nn.Module,
    calibration_batches: Iterable[Any] | None = None,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: Pattern = None,
    *,
    blocks: str | None = "auto",
    layers: list[str] | None = None,
    overrides: Mapping[str, float | Pattern] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dense_targets: bool = False,
    exact_update: bool = False,
    offload_folder: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Prune ``model`` in place, block by block, and return each layer's sparsity.

    ``method``: ``"sparsegpt"`` (reconstructs the kept weights), ``"admm"`` (chooses
    the mask gradually and solves the kept weights exactly: lower error than SparseGPT,
    see ``AdmmSparsifier``), ``"wanda"`` or ``"magnitude"`` (needs no data).
    ``sparsity`` defaults to 0.5, or to ``1 - N/M`` with ``pattern="N:M"``. ``blocks``:
    ``"auto"`` finds a Hugging Face decoder stack; a fqn names a ``ModuleList`` whose
    blocks run in sequence; ``None`` calibrates the whole model at once. ``layers``
    (module fqns) defaults to every ``nn.Linear`` (and transformers' ``Conv1D``, as in
    GPT-2) in the blocks; ``overrides`` maps layer fqns to their own sparsity or pattern.
    Batches are token-id tensors ``(batch, seq)`` for language models, or any tensor /
    tuple / dict of the model's arguments.
    Everything is checked, and the batches run through the model up to its first block,
    before any weight changes.

    ``dense_targets=True`` fits each layer to the dense model's outputs rather than to
    its own on the pruned model's inputs (see ``prunekit.oneshot.dense_targets``): the
    error of earlier layers is partly undone, at the cost of one more forward per stage
    and the dense hidden states kept beside the pruned ones. ``percdamp`` damps its
    least-squares refit too. ``exact_update=True`` (SparseGPT only) solves the kept
    weights of every layer exactly for the mask OBS chose (see ``SparseGPTSparsifier``).
    ``offload_folder``: keep the calibration hidden states (both streams with dense
    targets) in a temporary directory made there, one file per batch, rather than in
    memory (see ``prunekit.oneshot.offload``): memory then holds a batch of them at a
    time, however many batches there are, for some disk traffic per stage. The results
    are the same bit for bit. ``magnitude`` keeps none, so has nothing to offload.

    >>> import prunekit, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> prunekit.oneshot(model, [torch.randn(32, 16)], "wanda", pattern="2:4", progress=False)
    {'0': 0.5, '2': 0.5}
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"oneshot: model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ConfigError(f"oneshot: method must be one of {METHODS}, got {method!r}")
    target = _target(f"oneshot(method={method!r})", sparsity, pattern)
    sparsifier = _sparsifier(method, target, blocksize, percdamp, exact_update)
    if not isinstance(dense_targets, bool):
        raise ConfigTypeError(f"oneshot: dense_targets must be a bool, got {dense_targets!r}")
    if dense_targets and sparsifier is None:
        raise ConfigError("oneshot: dense_targets=True fits layers to calibration data; "
                          "method='magnitude' uses none")
    check_folder(offload_folder)
    with unfused_experts(model):
        stack = resolve_blocks(model, blocks)
        per_block = resolve_layers(model, stack, layers)
        entries = _entries(model, [n for names in per_block.values() for n in names], target,
                           overrides)
        batches = check_batches(model, calibration_batches, f"oneshot(method={method!r})",
                                allow_empty=method == "magnitude")
        if layers is None:
            _warn_unpruned(model, stack, per_block)
        if sparsifier is None:
            _magnitude(model, entries)
        else:
            configs = {block: [{"tensor_fqn": f"{layer}.weight",
                                "sparsity_level": entries[layer][0],
                                "pattern": entries[layer][1]} for layer in names]
                       for block, names in per_block.items()}
            sparsifier.check_config(model, [e for config in configs.values() for e in config])
            with offload_directory(offload_folder) as folder, inference_context(model):
                into = None if folder is None else OffloadedInputs(folder / "pruned")
                inputs = capture_inputs(model, stack, batches, into)
                dense = _dense_stream(inputs, percdamp) if dense_targets else None
                run_sequential(sparsifier, model, stack, configs, inputs, progress, dense)
        return {layer: _zeros(fqn_to_module(model, layer).weight) for layer in entries}


def _dense_stream(inputs: Records, percdamp: float) -> DenseStream:
    """The dense stream over a copy of ``inputs``, offloaded beside them if they are."""
    if isinstance(inputs, OffloadedInputs):
        return DenseStream(inputs.copy_to(inputs.folder.with_name("dense")), percdamp)
    return DenseStream([record.copy() for record in inputs], percdamp)


def _warn_unpruned(model: nn.Module, stack: Blocks, per_block: dict[str, list[str]]) -> None:
    """Warn of weight matrices in the blocks, as large as the median pruned layer's,
    that no pruned layer holds: experts of a kind this release cannot unfuse (Llama
    4's), or layers of other types, which would otherwise stay dense unannounced.
    Routers, far smaller, stay dense without a word."""
    pruned = [original_tensor(fqn_to_module(model, n), "weight")
              for names in per_block.values() for n in names]
    if not pruned:
        return
    held, typical = {id(t) for t in pruned}, statistics.median_low(t.numel() for t in pruned)
    missed = [f"{fqn}.{name}".lstrip(".") + f" {tuple(p.shape)}" for fqn, block in stack
              for name, p in block.named_parameters()
              if p.dim() >= 2 and id(p) not in held and p.numel() >= typical]
    if missed:
        warnings.warn(
            f"oneshot: {len(missed)} weight tensor(s) in the blocks belong to no layer it "
            f"prunes ({LAYER_KINDS}, or a transformers expert bank) and stay dense: "
            f"{', '.join(missed[:4])}{', ...' if len(missed) > 4 else ''}", stacklevel=3)


def _zeros(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())
