"""``to_sparse``: replace sparse Linear-like / pointwise Conv2d layers by sparse-layout
modules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from prunekit.deploy.auto import (
    RUN_ERRORS,
    Args,
    capture_args,
    choose,
    confirmed_speedup,
    time_candidates,
)
from prunekit.deploy.experts import (
    bank_of,
    check_deployable,
    choose_bank,
    deploy_banks,
    split_choices,
    stand_in_inputs,
)
from prunekit.deploy.layouts import LAYOUTS, Layout, check_float_weight
from prunekit.deploy.model_round import model_round
from prunekit.deploy.modules import SparseConv1D, SparseConv1x1, SparseLinear, is_pointwise_conv
from prunekit.deploy.report import DeployReport, LayerChoice
from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.experts import ExpertLayers, expand_parallel, put_module, unfused_experts
from prunekit.linear_like import is_conv1d
from prunekit.parametrization import deepcopy_model

__all__ = ["to_sparse"]

# An expert's own timing (seconds): a fifth of a layer's, its bank's round decides.
EXPERT_TIMING = {"budget_s": 0.02, "sample_s": 0.004}


def _kind(module: nn.Module) -> type[SparseLinear] | None:
    source = type_before_parametrizations(module)
    if source is nn.Linear:
        return SparseLinear
    if is_pointwise_conv(module):
        return SparseConv1x1
    if is_conv1d(module):
        return SparseConv1D
    return None


def _where(fqn: str, module: nn.Module) -> str:
    weight = module.weight
    return (
        f"to_sparse: layer {fqn!r} ({type_before_parametrizations(module).__name__} "
        f"{tuple(weight.shape)})"
    )


def _targets(model: nn.Module, modules: Iterable[str] | None) -> dict[str, nn.Module]:
    """``{fqn: module}`` to deploy: the named ones (checked), or every supported layer."""
    named = dict(model.named_modules())
    if modules is None:
        return {fqn: m for fqn, m in named.items() if fqn and _kind(m) is not None}
    targets = {}
    for fqn in expand_parallel(model, list(modules)):
        if fqn not in named or not fqn:
            raise FqnError(
                f"to_sparse: modules names {fqn!r}, which is not a submodule of the model"
            )
        if _kind(named[fqn]) is None:
            raise ConfigTypeError(
                f"to_sparse: layer {fqn!r} is a "
                f"{type_before_parametrizations(named[fqn]).__name__}; "
                "expected nn.Linear, transformers' Conv1D or a pointwise nn.Conv2d (1x1 kernel, "
                "stride 1, no padding, groups=1)"
            )
        targets[fqn] = named[fqn]
    return targets


def _blocksize(module: nn.Module, blocksize: tuple[int, int] | None) -> tuple[int, int] | None:
    if blocksize is not None:
        return tuple(blocksize)  # type: ignore[return-value]
    kept = getattr(module, "sparse_params", None) or {}
    block = kept.get("sparse_block_shape")  # a block of the weight as stored
    if block is None:
        return None
    return _deployed_kind(module).map_block(tuple(block))  # type: ignore[arg-type]


def _deployed_kind(module: nn.Module) -> type[SparseLinear]:
    return cast(type[SparseLinear], _kind(module))  # _targets yields supported layers only


def _weight_2d(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the ``out x in`` matrix the layouts store."""
    return _deployed_kind(module).map_weight(module)


def _choice(
    fqn: str,
    module: nn.Module,
    layout: str,
    reason: str,
    times: dict[str, float] | None = None,
    skipped: list[str] | None = None,
) -> LayerChoice:
    weight = _weight_2d(module)
    sparsity = float((weight == 0).float().mean()) if weight.numel() else 0.0
    return LayerChoice(
        fqn=fqn,
        module_type=type_before_parametrizations(module).__name__,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        sparsity=sparsity,
        layout=layout,
        reason=reason,
        times_ms=times or {},
        skipped=skipped or [],
    )


@dataclass(frozen=True)
class _Build:
    """How the deployed layers are built: ``to_sparse``'s ``blocksize`` and
    ``contiguous_outputs``."""

    blocksize: tuple[int, int] | None
    contiguous: bool


def _fixed(
    targets: dict[str, nn.Module], name: str, build: _Build
) -> tuple[dict[str, nn.Module], DeployReport]:
    """Every target in layout ``name``; any misfit raises before anything is replaced."""
    new, report = {}, DeployReport()
    for fqn, module in targets.items():
        weight = _weight_2d(module)
        layout = LAYOUTS[name].fit(weight, _where(fqn, module), _blocksize(module, build.blocksize))
        new[fqn] = _trial(fqn, module, layout, _probe_input(module), build)
        report.layers.append(_choice(fqn, module, layout.describe(), f"layout={name!r} requested"))
    return new, report


def _trial(fqn: str, module: nn.Module, layout: Layout, x: torch.Tensor, build: _Build
           ) -> nn.Module:  # fmt: skip
    """Build ``layout`` for the layer and run it once on ``x``: kernels may refuse a
    dtype, shape or device only when called."""
    if layout.name == "dense":
        return module
    try:
        candidate = _deployed_kind(module).from_dense(module, layout, build.contiguous)
        with torch.inference_mode():
            candidate(x)
    except RUN_ERRORS as exc:
        where = _where(fqn, module)
        raise ConfigError(f"{where}: layout {layout.describe()!r} failed to run: {exc}") from exc
    return candidate


def _probe_input(module: nn.Module) -> torch.Tensor:
    """One zero row (or pixel) of the layer's input, to try a layout without real data."""
    weight = module.weight
    width = _weight_2d(module).shape[1]
    shape = (1, width, 1, 1) if weight.dim() == 4 else (1, width)
    return torch.zeros(shape, dtype=weight.dtype, device=weight.device)


def _fitting_candidates(
    fqn: str, module: nn.Module, build: _Build, x: torch.Tensor
) -> tuple[dict[str, nn.Module], list[str]]:
    candidates: dict[str, nn.Module] = {"dense": module}
    skipped = []
    for name, cls in LAYOUTS.items():
        if name == "dense":
            continue
        try:
            block = _blocksize(module, build.blocksize)
            layout = cls.fit(_weight_2d(module), _where(fqn, module), block)
            candidates[layout.describe()] = _trial(fqn, module, layout, x, build)
        except ConfigError as exc:
            skipped.append(f"{name}: {str(exc).split(': ', 2)[-1]}")
    return candidates, skipped


def _layer_inputs(captured: dict[str, Args], targets: dict[str, nn.Module]
                  ) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each target's first input tensor, from its captured args."""
    return {fqn: args[0] for fqn, args in captured.items()
            if fqn in targets and args and isinstance(args[0], torch.Tensor)}


def _auto(
    model: nn.Module,
    targets: dict[str, nn.Module],
    example_inputs: Any,
    build: _Build,
    margin: float,
    banks: dict[str, ExpertLayers],
) -> tuple[dict[str, nn.Module], DeployReport, dict[str, nn.Module]]:
    """Each target's pick, the report, and for layers outside banks kept dense, their
    fastest fitting sparse layout (``model_round`` times them all sparse too)."""
    captured = capture_args(model, {**targets, **banks}, example_inputs)
    inputs = _layer_inputs(captured, targets)
    unreached = stand_in_inputs(inputs, banks)
    new, report, alternatives = {}, DeployReport(), {}
    options: dict[str, dict[str, dict[str, nn.Module]]] = {bank: {} for bank in banks}
    owner = {fqn: bank_of(fqn, banks) for fqn in targets}
    last = {bank: fqn for fqn, bank in owner.items()}  # a bank's experts are consecutive
    for fqn, module in targets.items():
        bank = owner[fqn]
        if fqn in inputs:
            new[fqn], choice, candidates = _auto_layer(fqn, module, inputs[fqn], build,
                                                       margin, expert=bank is not None)
            if fqn in unreached:
                choice.reason = f"{unreached[fqn]}: {choice.reason}"
            if bank is not None:
                options[bank][fqn] = candidates
            elif choice.layout == "dense" and len(candidates) > 1:
                fastest = min(set(choice.times_ms) - {"dense"}, key=choice.times_ms.__getitem__)
                alternatives[fqn] = candidates[fastest]
        else:
            why = unreached.get(fqn, "not called by example_inputs")
            choice = _choice(fqn, module, "dense", why)
        report.layers.append(choice)
        if bank is not None and last[bank] == fqn and options[bank]:  # the bank decides
            picks = {f: new[f] for f in options[bank]}
            kept = choose_bank(bank, banks[bank], options.pop(bank), picks, captured[bank],
                               report, margin)
            new.update({f: kept.get(f, targets[f]) for f in picks})
    return new, report, alternatives


def _auto_layer(fqn: str, module: nn.Module, x: torch.Tensor, build: _Build, margin: float,
                expert: bool) -> tuple[nn.Module, LayerChoice, dict[str, nn.Module]]:  # fmt: skip
    """The fastest fitting layout for one layer on ``x``, its report line, and every
    fitting candidate. A layer's pick is checked in paired timing; an expert's is only
    a proposal for its bank's round (``choose_bank``), which decides, so it is timed
    briefly and unchecked: a bank may hold thousands of experts."""
    candidates, skipped = _fitting_candidates(fqn, module, build, x)
    times = time_candidates(candidates, x, **(EXPERT_TIMING if expert else {}))
    best, reason = choose(times, margin)
    if best != "dense" and not expert:
        best, reason = _confirm(candidates, best, reason, x, margin)
    return candidates[best], _choice(fqn, module, best, reason, times, skipped), candidates


def _confirm(
    candidates: dict[str, nn.Module], best: str, reason: str, x: torch.Tensor, margin: float
) -> tuple[str, str]:
    """Keep ``best`` only if paired timing against dense confirms the margin."""
    speedup = confirmed_speedup(candidates["dense"], candidates[best], x)
    if speedup * (1.0 - margin) > 1.0:
        return best, f"{reason}; confirmed {speedup:.2f}x in paired timing"
    return "dense", (f"{reason}, but only {speedup:.2f}x in paired timing: below the "
                     f"{margin:.0%} margin")


def _replace(model: nn.Module, new: dict[str, nn.Module]) -> None:
    for fqn, module in new.items():
        if model.get_submodule(fqn) is not module:
            put_module(model, fqn, module)


def _check_args(layout: str, example_inputs: Any, margin: float) -> None:
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(
            f"to_sparse: layout={layout!r}; expected 'auto' or one of {sorted(LAYOUTS)}"
        )
    if layout == "auto" and example_inputs is None:
        raise ConfigError(
            "to_sparse: layout='auto' times every layout on the real input shapes and needs "
            "example_inputs (a tensor, a tuple of args or a dict of kwargs); got None"
        )
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"to_sparse: margin={margin!r}; expected 0 <= margin < 1")


def _with_zeros(
    targets: dict[str, nn.Module], explicit: bool
) -> tuple[dict[str, nn.Module], DeployReport]:
    """Drop layers whose weight has no zeros (nothing to skip) unless named explicitly."""
    kept, report = {}, DeployReport()
    for fqn, module in targets.items():
        check_float_weight(module.weight, _where(fqn, module))
        if explicit or bool((module.weight.detach() == 0).any()):
            kept[fqn] = module
        else:
            report.layers.append(_choice(fqn, module, "dense", "no zeros in the weight"))
    return kept, report


def to_sparse(
    model: nn.Module,
    example_inputs: Any = None,
    layout: str = "auto",
    *,
    modules: Iterable[str] | None = None,
    blocksize: tuple[int, int] | None = None,
    margin: float = 0.1,
    inplace: bool = False,
    contiguous_outputs: bool = False,
) -> nn.Module:
    """Replace sparse ``nn.Linear``, transformers' ``Conv1D`` and pointwise ``nn.Conv2d``
    layers, and the experts of transformers' expert banks, for faster inference.

    ``layout`` is ``"auto"`` (time every fitting layout on the layer's input from
    ``example_inputs``; keep a sparse one only if it beats dense by ``margin``) or a name in
    ``LAYOUTS`` (``"dense"``, ``"csr"``, ``"bsr"``, ``"row_blocks"``, ``"semi_structured"``).
    ``modules`` restricts the layers (fqns); otherwise every supported layer with zeros is
    considered. Blocks (BSR, row blocks) come from ``blocksize`` (of the ``out x in``
    matrix), else ``module.sparse_params["sparse_block_shape"]`` (of the weight as stored:
    transposed for a Conv1D), else the zeros' own block structure.
    Each expert of a bank (``prunekit.experts``) is a layer (``...experts.down_proj.3``;
    ``modules`` may name a projection or a bank); ``auto`` decides per bank, timing whole
    banks on their own inputs (``prunekit.deploy.experts``).
    A sparse layer's output is a transposed view of its kernel's ``(out, tokens)``
    product, which the next sparse layer reads without a copy; ``contiguous_outputs``
    pays the copy (and ``auto`` times it), for models whose code needs the last dimension
    contiguous (Llama 4's and DeepSeek-V2's rotary embedding: ``torch.view_as_complex``).
    ``auto`` ends with the whole model on ``example_inputs`` (``model_round``): as
    chosen, with contiguous outputs, with every layer that has a fitting sparse layout
    in its fastest one, and with its chosen layers dense; the fastest variant that runs
    is kept, so what reads a sparse output cannot make the model slower.
    Returns the model (a copy unless ``inplace``) with ``model.deploy_report`` saying what
    each layer got and why; on any error the model is left unchanged.

    >>> model = nn.Sequential(nn.Linear(64, 64))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(torch.rand(64, 64) > 0.9)
    >>> fast = to_sparse(model, layout="csr")
    >>> fast.deploy_report.chosen()
    {'0': 'csr'}
    """
    _check_args(layout, example_inputs, margin)
    work = model if inplace else deepcopy_model(model)
    with unfused_experts(work) as banks:  # every expert an nn.Linear while choosing
        found = _targets(work, modules)
        check_deployable(banks, found, "to_sparse")
        order = list(found)
        targets, report = _with_zeros(found, explicit=modules is not None)
        build = _Build(blocksize, contiguous_outputs)
        alternatives: dict[str, nn.Module] = {}
        if layout == "auto":
            new, chosen, alternatives = _auto(work, targets, example_inputs, build, margin,
                                              banks)
        else:
            new, chosen = _fixed(targets, layout, build)
        outside, per_bank = split_choices(new, targets, banks)
    _replace(work, outside)
    deploy_banks(work, banks, per_bank)
    layers = sorted(report.layers + chosen.layers, key=lambda c: order.index(c.fqn))
    work.deploy_report = DeployReport(layers)
    if layout == "auto":
        model_round(work, {fqn: targets[fqn] for fqn in outside}, outside, alternatives,
                    example_inputs, contiguous_outputs, margin, work.deploy_report)
    return work
