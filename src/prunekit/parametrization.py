"""Parametrizations that attach masks to tensors through ``torch.nn.utils.parametrize``.

``FakeSparsity`` is the reference's mask parametrization with one addition that makes
a prepared model as fast as a plain one at inference: once the owner has zeroed the
masked entries of the original tensor in place (``apply_``), a no-grad forward returns
the original unchanged instead of recomputing ``mask * weight`` on every access. Any
change to the original or the mask (tracked by their version counters) falls back to
the multiply, so the result is always ``mask * original``.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit._cpu_masks import zero_masked_
from prunekit.errors import ConfigError

__all__ = [
    "FakeSparsity", "deepcopy_model", "is_dtensor", "module_contains_param", "original_tensor",
]  # fmt: skip


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` whose parametrized modules get classes of their own.

    torch's copy shares the ``Parametrized<Type>`` class it made for the original, and
    ``remove_parametrizations`` (or ``register_parametrization``) edits that class: a
    mask removed from the copy would take the original's ``weight`` property with it."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if parametrize.is_parametrized(module):
            shared = type(module)
            own = {k: v for k, v in vars(shared).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(shared.__name__, shared.__bases__, own)
    return copied


def original_tensor(module: nn.Module, tensor_name: str) -> torch.Tensor:
    """The stored tensor behind ``module.<tensor_name>`` (the original if parametrized)."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def is_dtensor(t: object) -> bool:
    """True for a ``DTensor`` (e.g. a parameter sharded by FSDP2's ``fully_shard``).

    Looked up, not imported: importing ``torch.distributed.tensor`` takes seconds, and no
    tensor can be a DTensor before someone else has imported it.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _shard_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full (replicated) ``mask``, laid out like the DTensor ``x``.

    No communication: every rank holds the same full mask and cuts its own shard.
    """
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask, x.device_mesh, x.placements, src_data_rank=None)


def _tensor_key(t: torch.Tensor) -> tuple[int, int]:
    return (t._version, t.data_ptr())


def _symbolic() -> bool:
    """True while tracing, scripting, exporting or compiling: always emit the multiply."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


class FakeSparsity(nn.Module):
    """Multiply a tensor by a fixed-identity ``mask`` buffer (bool or float).

    The mask never appears in the model's ``state_dict`` (masks belong to the sparsifier),
    and callers update it in place so its identity stays fixed.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        # not persistent: a prepared model's state_dict has no masks and loads strictly
        self.register_buffer("mask", mask, persistent=False)
        self._applied_key: tuple[tuple[int, int], tuple[int, int], int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask.shape != x.shape:
            raise ConfigError(
                f"FakeSparsity: mask shape {tuple(mask.shape)} must match the tensor's shape "
                f"{tuple(x.shape)}"
            )
        if self._is_applied_to(x):
            return x
        if is_dtensor(x) and not is_dtensor(mask):
            mask = _shard_like(mask, x)  # a sharded original read outside FSDP's forward
        return x * mask

    def _is_applied_to(self, x: torch.Tensor) -> bool:
        key = self._applied_key
        if key is None or _symbolic() or not isinstance(x, torch.Tensor):
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # the multiply is what zeroes the gradient of masked entries
        return key == (_tensor_key(x), _tensor_key(self.mask), id(x))

    @torch.no_grad()
    def apply_(self, original: torch.Tensor) -> None:
        """Zero the masked entries of ``original`` in place and remember that it is masked.

        Only bool masks qualify: a float mask may hold values other than 0 and 1.
        """
        mask = self.mask
        if mask.dtype != torch.bool or mask.shape != original.shape:
            self._applied_key = None
            return
        if is_dtensor(original):
            original.masked_fill_(~_shard_like(mask, original), 0)
            self._applied_key = None  # FSDP swaps in a gathered copy: no fast path
            return
        key = (_tensor_key(original), _tensor_key(mask), id(original))
        if key == self._applied_key:
            return  # nothing changed since the last time
        if not zero_masked_(original, mask):
            original.masked_fill_(~mask, 0)
        self._applied_key = (_tensor_key(original), _tensor_key(mask), id(original))

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        """Masks are kept out of the model's state_dict (the sparsifier owns them)."""
        return {}

    def __getstate__(self):
        state = super().__getstate__()
        state["_applied_key"] = None  # pointers and versions do not survive a copy
        return state


def module_contains_param(module: nn.Module, parametrization: type[nn.Module]) -> bool:
    """True if any tensor of ``module`` carries a parametrization of that class."""
    if not parametrize.is_parametrized(module):
        return False
    return any(
        isinstance(p, parametrization) for plist in module.parametrizations.values() for p in plist
    )
