"""Inference modules that multiply with a packed (sparse) weight.

The packed weight is a buffer named ``weight`` and the bias a buffer named ``bias``, so
state_dict keys match the layer deployed (``nn.Linear``, ``nn.Conv2d``, transformers'
``Conv1D``). Loading accepts either the packed form (any number of nonzeros) or a dense
weight in the deployed layer's own shape, which is re-packed: a dense checkpoint loads
into a deployed model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from prunekit.deploy.layouts import Layout
from prunekit.errors import ConfigError

__all__ = ["SparseConv1D", "SparseConv1x1", "SparseLinear", "is_pointwise_conv"]


def is_pointwise_conv(module: nn.Module) -> bool:
    """A Conv2d that is a Linear over channels: 1x1 kernel, stride 1, no padding, one group."""
    return (
        type_before_parametrizations(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
    )


class SparseLinear(nn.Module):
    """``nn.Linear`` for inference with its weight stored in ``layout`` (a buffer: input
    gradients pass through, the weight gets none).

    >>> lin = nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     _ = lin.weight.mul_(torch.rand(4, 8) > 0.8)
    >>> from prunekit.deploy.layouts import CsrLayout
    >>> sparse = SparseLinear.from_dense(lin, CsrLayout())
    >>> x = torch.randn(2, 8)
    >>> torch.allclose(sparse(x), lin(x), atol=1e-6)
    True
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, layout: Layout,
        contiguous_output: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.layout = layout
        # The kernels compute (out, tokens): the output is its transpose, a view the next
        # sparse layer reads without a copy; True pays the copy, for code that needs the
        # last dimension contiguous (torch.view_as_complex in some rotary embeddings).
        self.contiguous_output = contiguous_output
        self.register_buffer("weight", layout.pack(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, module: nn.Module, layout: Layout, contiguous_output: bool = False
                   ) -> SparseLinear:  # fmt: skip
        """Pack the zero-filled weight of ``module`` (the kind this class deploys)."""
        return cls(cls.map_weight(module), module.bias, layout, contiguous_output)

    @staticmethod
    def map_weight(module: nn.Module) -> torch.Tensor:
        """``module``'s weight as the ``out x in`` matrix of its affine map."""
        weight = module.weight.detach()
        return weight.reshape(weight.shape[0], -1)

    @staticmethod
    def map_block(stored_block: tuple[int, int]) -> tuple[int, int]:
        """A block shape of the stored weight as a block of ``map_weight``."""
        return stored_block

    def checkpoint_shape(self) -> tuple[int, ...]:
        """The shape of the deployed layer's dense weight: what its checkpoints hold."""
        return (self.out_features, self.in_features)

    def to_checkpoint(self, dense: torch.Tensor) -> torch.Tensor:
        """The dense ``out x in`` weight in ``checkpoint_shape``."""
        return dense.reshape(self.checkpoint_shape())

    def from_checkpoint(self, dense: torch.Tensor) -> torch.Tensor:
        """A dense weight of ``checkpoint_shape`` as the ``out x in`` matrix."""
        return dense.reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        nnz = int((self.dense_weight() != 0).sum())
        density = nnz / max(1, self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"layout={self.layout.describe()}, density={density:.3f}, bias={self.bias is not None}"
            + ", contiguous_output=True" * self.contiguous_output
        )

    def dense_weight(self) -> torch.Tensor:
        """The zero-filled dense weight (a copy for sparse layouts)."""
        return self.layout.unpack(self.weight)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return self.layout.linear(x2d, self.weight, self.bias)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return y.contiguous() if self.contiguous_output else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features))
        return self._out(y.reshape(*x.shape[:-1], self.out_features))

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseLinear:
        """A copy with its own packed weight: torch's ``Tensor.__deepcopy__`` reaches for
        the storage, which compressed (CSR, BSR) tensors do not have; ``clone`` copies them."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        if self.weight.layout in (torch.sparse_csr, torch.sparse_bsr):
            memo.setdefault(id(self.weight), self.weight.clone())
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._save_to_state_dict(destination, prefix, *args)
        state = self.layout.to_state(self.weight)
        dense = state.layout == torch.strided  # a layout torch cannot save packed
        destination[prefix + "weight"] = self.to_checkpoint(state) if dense else state

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # copy_ between compressed tensors needs equal nnz; install the incoming
        # weight (re-packed if dense) first so the default copy is a no-op check.
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if isinstance(incoming, torch.Tensor):
            packed = self._repack(incoming, key)
            self._buffers["weight"] = packed
            state_dict = {**state_dict, key: packed}  # the caller's dict stays as it was
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _repack(self, incoming: torch.Tensor, key: str) -> torch.Tensor:
        current = self.weight
        if (
            incoming.layout == current.layout == torch.sparse_bsr
            and incoming.shape == current.shape
            and incoming.values().shape[1:] != current.values().shape[1:]
        ):  # packed in other blocks (by hand, or by a build that chose other blocks)
            incoming = self.to_checkpoint(incoming.to_dense())
        if incoming.layout == torch.strided:
            expected = self.checkpoint_shape()
            if tuple(incoming.shape) != expected:
                raise ConfigError(
                    f"load_state_dict: {key!r} has shape {tuple(incoming.shape)}; expected "
                    f"{expected} (or a packed {self.layout.describe()} weight)"
                )
            dense = self.from_checkpoint(incoming).to(current.device, current.dtype)
            return self.layout.pack(dense)
        if incoming.layout != current.layout or incoming.shape != current.shape:
            raise ConfigError(
                f"load_state_dict: {key!r} is a {incoming.layout} tensor of shape "
                f"{tuple(incoming.shape)}; expected {current.layout} of shape "
                f"{tuple(current.shape)}"
            )
        return incoming.to(current.device, current.dtype).clone()


class SparseConv1x1(SparseLinear):
    """A pointwise ``nn.Conv2d`` (1x1, stride 1, no padding, one group) as a sparse matmul
    over channels: ``y[n, :, h, w] = W @ x[n, :, h, w] + b``."""

    def checkpoint_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # (C, N*H*W): channels first so the sparse weight multiplies from the left.
        cols = x.reshape(n, c, h * w).transpose(0, 1).reshape(c, n * h * w)
        y = self._matmul(cols.T)  # (N*H*W, out)
        return self._out(y.T.reshape(self.out_features, n, h, w).transpose(0, 1))


class SparseConv1D(SparseLinear):
    """transformers' ``Conv1D`` (GPT-2's layers: ``x @ W + b`` with ``W`` stored ``in x
    out``) deployed as the Linear it computes. Dense checkpoints keep Conv1D's ``in x
    out`` weight, so a dense GPT-2 state_dict loads into the deployed model."""

    @staticmethod
    def map_weight(module: nn.Module) -> torch.Tensor:
        return module.weight.detach().T

    @staticmethod
    def map_block(stored_block: tuple[int, int]) -> tuple[int, int]:
        return stored_block[1], stored_block[0]

    def checkpoint_shape(self) -> tuple[int, ...]:
        return (self.in_features, self.out_features)

    def to_checkpoint(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.T

    def from_checkpoint(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.T
