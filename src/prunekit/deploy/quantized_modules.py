"""``torch.ao.nn.sparse.quantized`` Linear modules that run and reload on any engine.

torch's sparse int8 kernels live in one engine each: static ``sparse.qlinear`` in fbgemm,
dynamic ``sparse.qlinear_dynamic`` in qnnpack; prepacking (at construction and at
``load_state_dict``) and the dynamic forward fail under any other global engine
(the x86 default included). torch's own ``_load_from_state_dict`` of both classes is
broken too (it pops an ``op_type`` key the static module never saves, and the dynamic one
calls ``int()`` on a string). These subclasses switch to the right engine for their own
calls only and load what they save.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.ao.nn.sparse.quantized as sparse_q
from torch import nn
from torch.ao.nn.sparse.quantized.linear import LinearPackedParams

from prunekit.errors import UnsupportedError

__all__ = [
    "DYNAMIC_ENGINE",
    "STATIC_ENGINE",
    "FbgemmSparseQuantizedLinear",
    "QnnpackSparseDynamicLinear",
    "check_engine",
    "quantized_engine",
    "quiet_int8_deprecations",
]

STATIC_ENGINE, DYNAMIC_ENGINE = "fbgemm", "qnnpack"


def supported_engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def check_engine(name: str, what: str) -> None:
    """A clear error when this torch build lacks the engine holding the kernel."""
    if name not in supported_engines():
        raise UnsupportedError(
            f"{what} needs the {name!r} quantized engine (the only one with the sparse int8 "
            f"kernel it uses); this torch build has {supported_engines()}. Use "
            "prunekit.deploy.to_sparse (float sparse layouts) instead"
        )


@contextmanager
def quantized_engine(name: str, what: str) -> Iterator[None]:
    """Run a block under quantized engine ``name`` (global state, restored after)."""
    check_engine(name, what)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextmanager
def quiet_int8_deprecations() -> Iterator[None]:
    """torch 2.13 deprecates eager quantization and int8 tensors, which remain the only
    route to its sparse int8 kernels; using them is prunekit's choice, not the caller's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max")
        yield


class _EnginePackedParams(LinearPackedParams):
    engine: str = STATIC_ENGINE

    def set_weight_bias(self, *args: Any) -> None:
        with quantized_engine(self.engine, "sparse int8 prepack"):
            super().set_weight_bias(*args)

    # torch pickles the packed object itself, which only the global engine that packed it
    # can read, and restores nothing of nn.Module's state: deepcopy, pickle and
    # torch.save(model) failed or gave a module that could not save its state_dict.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed_params": self._weight_bias()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        unpacked = state.pop("_packed_params")
        nn.Module.__setstate__(self, state)
        self.set_weight_bias(*unpacked)


class _FbgemmPackedParams(_EnginePackedParams):
    engine = STATIC_ENGINE


class _QnnpackPackedParams(_EnginePackedParams):
    engine = DYNAMIC_ENGINE


def _rebind(module: nn.Module, params_cls: type[_EnginePackedParams], dtype: torch.dtype) -> None:
    """Swap the plain packed params built by torch's __init__ for the engine-bound kind."""
    old = module._packed_params
    _, _, rows, cols = old._weight_bias()
    new = params_cls(row_block_size=rows, col_block_size=cols, dtype=dtype)
    new._packed_params = old._packed_params
    module._packed_params = new


def _load_own(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, skip: tuple[str, ...], *args: Any
) -> None:
    """``nn.Module``'s own loading, minus keys torch's classes save outside any buffer."""
    own = {k: v for k, v in state_dict.items() if k not in {prefix + s for s in skip}}
    nn.Module._load_from_state_dict(module, own, prefix, *args)


class FbgemmSparseQuantizedLinear(sparse_q.Linear):
    """Static sparse int8 Linear (quantized in, quantized out); prepacks under fbgemm."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with quantized_engine(STATIC_ENGINE, "static sparse int8 Linear"):
            super().__init__(*args, **kwargs)
        _rebind(self, _FbgemmPackedParams, torch.qint8)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.scale = float(state_dict[prefix + "scale"])
        self.zero_point = int(state_dict[prefix + "zero_point"])
        _load_own(self, state_dict, prefix, ("scale", "zero_point", "op_type"), *args)


class QnnpackSparseDynamicLinear(sparse_q.dynamic.Linear):
    """Dynamic sparse int8 Linear (float in, float out); runs its kernel under qnnpack."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with quantized_engine(DYNAMIC_ENGINE, "dynamic sparse int8 Linear"):
            super().__init__(*args, **kwargs)
        _rebind(self, _QnnpackPackedParams, torch.qint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with quantized_engine(DYNAMIC_ENGINE, "dynamic sparse int8 Linear"):
            return super().forward(x)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        _load_own(self, state_dict, prefix, ("op_type",), *args)
