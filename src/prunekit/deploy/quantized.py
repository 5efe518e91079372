"""Sparse int8 Linear layers (``torch.ao.nn.sparse.quantized``, 1x4 blocks) in one call.

torch ships the kernels for two engines only: static (``sparse.qlinear``) under fbgemm,
dynamic (``sparse.qlinear_dynamic``) under qnnpack, whose forward also runs only while
qnnpack is the global engine. ``sparse_quantize`` hides both facts: it squashes masks,
keeps the block shape, inserts and calibrates Quant/DeQuant stubs when the model has
none, and returns modules that run whatever the global engine is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.ao.nn.sparse.quantized as sparse_q
from torch import nn
from torch.ao.nn.sparse.quantized.utils import LinearBlockSparsePattern
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    default_dynamic_qconfig,
    get_default_qconfig,
    get_default_static_quant_module_mappings,
    prepare,
)
from torch.nn.utils import parametrize

from prunekit.deploy.auto import run_model
from prunekit.deploy.experts import bank_of, check_deployable, deploy_banks, split_choices
from prunekit.deploy.quantized_modules import (
    DYNAMIC_ENGINE,
    STATIC_ENGINE,
    FbgemmSparseQuantizedLinear,
    QnnpackSparseDynamicLinear,
    check_engine,
    quiet_int8_deprecations,
)
from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.experts import put_module, unfused_experts
from prunekit.linear_like import is_conv1d, out_in
from prunekit.parametrization import deepcopy_model
from prunekit.swap import register_swap_handler

__all__ = ["SparseQuantizedIsland", "sparse_quantize"]

BLOCK = (1, 4)  # the only block both int8 sparse kernels accept


class SparseQuantizedIsland(nn.Module):
    """QuantStub -> Linear -> DeQuantStub: a static int8 layer in an otherwise float model."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.linear = linear
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.linear(self.quant(x)))


def _name(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def _where(fqn: str, module: nn.Module) -> str:
    out_features, in_features = out_in(module, module.weight).shape
    return f"sparse_quantize: layer {fqn!r} ({_name(module)} {in_features}->{out_features})"


def _check_linear(module: nn.Module, where: str) -> None:
    weight = module.weight
    if not weight.is_floating_point():
        raise ConfigTypeError(f"{where}: weight dtype is {weight.dtype}; expected a float weight")
    if weight.device.type != "cpu":
        raise ConfigError(
            f"{where}: weight is on {weight.device}; the sparse int8 kernels run on the CPU only"
        )


def _as_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` computing what ``module`` (a Linear, or a
    Conv1D) computes with its (masked) weight, ``sparse_params`` kept."""
    weight = out_in(module, module.weight.detach())
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                      dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias.detach())
    plain.sparse_params = dict(getattr(module, "sparse_params", {}))
    return plain


def _plain_linear(module: nn.Module) -> nn.Linear:
    """A plain float ``nn.Linear`` holding ``module``'s (masked) weight: squash, kept apart."""
    plain = _as_linear(module, torch.float32)
    plain.sparse_params["sparse_block_shape"] = BLOCK
    return plain


def _convert_where(module: nn.Module) -> str:
    return f"convert: {_name(module)}({module.in_features}->{module.out_features})"


def _dynamic(module: nn.Module) -> QnnpackSparseDynamicLinear:
    _check_linear(module, _convert_where(module))
    plain = _plain_linear(module)
    plain.qconfig = default_dynamic_qconfig
    with LinearBlockSparsePattern(*BLOCK), quiet_int8_deprecations():
        return QnnpackSparseDynamicLinear.from_float(plain)


def _static(module: nn.Module) -> sparse_q.Linear:
    """Convert a Linear observed by ``torch.ao.quantization.prepare`` (and calibrated)."""
    _check_linear(module, _convert_where(module))
    observer = getattr(module, "activation_post_process", None)
    if getattr(module, "qconfig", None) is None or observer is None:
        raise ConfigError(
            f"{_convert_where(module)} has no calibrated activation observer; static int8 "
            "needs one. Run torch.ao.quantization.prepare and calibration first, or use "
            "prunekit.deploy.sparse_quantize(model, calibration_batches, dynamic=False)"
        )
    plain = _plain_linear(module)
    plain.qconfig, plain.activation_post_process = module.qconfig, observer
    with quiet_int8_deprecations():
        return FbgemmSparseQuantizedLinear.from_float(plain)


register_swap_handler(sparse_q.dynamic.Linear, _dynamic)
register_swap_handler(sparse_q.Linear, _static)


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    targets = {
        fqn: m
        for fqn, m in model.named_modules()
        if fqn and (parametrize.type_before_parametrizations(m) is nn.Linear or is_conv1d(m))
    }
    if not targets:
        raise ConfigTypeError(
            "sparse_quantize: the model has no nn.Linear (or transformers Conv1D) layer to "
            "quantize"
        )
    for fqn, module in targets.items():
        _check_linear(module, _where(fqn, module))
    return targets


def _squash(module: nn.Module) -> nn.Module:
    """Bake any mask into the weight and record the kernel's block shape (in place); a
    Conv1D becomes the ``nn.Linear`` it computes, which torch's int8 modules take."""
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if is_conv1d(module):
        module = _as_linear(module, module.weight.dtype)
    module.sparse_params = {**getattr(module, "sparse_params", {}), "sparse_block_shape": BLOCK}
    return module


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_fqn, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent_fqn) if parent_fqn else model, name, module)


def _calibrate_and_convert(model: nn.Module, batches: list[Any]) -> None:
    mapping = {**get_default_static_quant_module_mappings(), nn.Linear: FbgemmSparseQuantizedLinear}
    with quiet_int8_deprecations():
        prepare(model, inplace=True)
        with torch.no_grad():
            for batch in batches:
                run_model(model, batch)
        convert(model, mapping=mapping, inplace=True)


def _static_model(model: nn.Module, targets: dict[str, nn.Module], batches: list[Any]) -> None:
    """Eager static quantization; the model's own stubs if it has any, else one island per
    Linear so the rest of the model stays float."""
    qconfig = get_default_qconfig(STATIC_ENGINE)
    if any(isinstance(m, QuantStub) for m in model.modules()):
        model.qconfig = qconfig
    else:
        for fqn, module in targets.items():
            island = SparseQuantizedIsland(module)
            island.qconfig = qconfig
            _set(model, fqn, island)
    _calibrate_and_convert(model, batches)


def _check_calibration(batches: Iterable[Any] | None, dynamic: bool) -> list[Any]:
    if dynamic:
        return []
    data = list(batches) if batches is not None else []
    if not data:
        raise ConfigError(
            "sparse_quantize(dynamic=False): static int8 needs calibration_batches (an "
            "iterable of model inputs) to fix activation scales; got none"
        )
    return data


def sparse_quantize(
    model: nn.Module, calibration_batches: Iterable[Any] | None = None, dynamic: bool = True
) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers (and transformers' ``Conv1D``, as
    the Linear it computes) are sparse int8 (1x4 blocks).

    ``dynamic=True``: weights int8, activations quantized per call
    (``torch.ao.nn.sparse.quantized.dynamic.Linear``, qnnpack kernel). ``dynamic=False``:
    static int8 calibrated on ``calibration_batches`` (``torch.ao.nn.sparse.quantized.Linear``,
    fbgemm kernel), inside the model's QuantStub/DeQuantStub if it has them, else inside a
    ``SparseQuantizedIsland`` per layer. Masks still attached are squashed first. The
    experts of transformers' expert banks are quantized one by one, each calibrated on
    the tokens routed to it, and the bank is replaced by its experts as layers (as
    ``to_sparse`` deploys them).

    >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    >>> q = sparse_quantize(model)
    >>> type(q[0]).__name__, q(torch.randn(2, 16)).shape
    ('QnnpackSparseDynamicLinear', torch.Size([2, 8]))
    """
    engine = DYNAMIC_ENGINE if dynamic else STATIC_ENGINE
    check_engine(engine, f"sparse_quantize(dynamic={dynamic})")
    batches = _check_calibration(calibration_batches, dynamic)
    with unfused_experts(model):
        _targets(model)  # fail on a bad layer before paying for the copy
    work = deepcopy_model(model)  # the copy loses its masks; the model keeps its own
    with unfused_experts(work) as banks:
        targets = _targets(work)
        experts = {fqn: m for fqn, m in targets.items() if bank_of(fqn, banks)}
        check_deployable(banks, experts, "sparse_quantize")
        _quantize(work, targets, batches, dynamic)
        quantized = {fqn: work.get_submodule(fqn) for fqn in experts}
        for fqn, layer in experts.items():
            put_module(work, fqn, layer)  # the bank's own layers back for the way out
    deploy_banks(work, banks, split_choices(quantized, experts, banks)[1])
    return work


def _quantize(work: nn.Module, found: dict[str, nn.Module], batches: list[Any], dynamic: bool
              ) -> None:  # fmt: skip
    """The Linear-like layers ``found`` in ``work`` (experts unfused) as sparse int8, in
    place."""
    targets = {fqn: _squash(m) for fqn, m in found.items()}
    for fqn, module in targets.items():
        _set(work, fqn, module)  # a Conv1D's Linear replaces it
    if dynamic:
        for fqn, module in targets.items():
            _set(work, fqn, _dynamic(module))
    else:
        _static_model(work, targets, batches)
