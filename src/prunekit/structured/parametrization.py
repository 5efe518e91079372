"""Row-mask parametrization and the bias hook that the reference-compatible pruners attach.

``FakeStructuredSparsity`` zeroes whole output rows (channels) of a weight; ``BiasHook``
adds the bias that ``prepare`` moved out of the module, masked the same way, so that a
pruned channel of the masked model really outputs a constant. Unlike the reference the
hook never writes into the stored ``_bias`` parameter: masking happens on the fly.

Under FSDP2 the mask stays full (one entry per row of the whole tensor) on every rank;
a sharded original read outside FSDP's forward is multiplied by this rank's part of it.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.parametrization import _shard_like, is_dtensor

__all__ = ["BiasHook", "FakeStructuredSparsity", "channel_dim"]


class FakeStructuredSparsity(nn.Module):
    """Multiply a tensor by a 1-D bool ``mask`` over its first dimension (its rows).

    The mask is a buffer kept out of the model's ``state_dict`` (the pruner owns it), and
    not persistent, so a prepared model loads its own ``state_dict`` strictly (the
    reference's persistent buffer was missing from its own dict); pruners update it in
    place so every holder sees the change.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask.dim() != 1 or mask.shape[0] != x.shape[0]:
            raise ConfigError(
                f"FakeStructuredSparsity: mask of shape {tuple(mask.shape)} must be 1-D with one "
                f"entry per row of the tensor, which has shape {tuple(x.shape)}"
            )
        rows = mask.reshape([-1] + [1] * (x.dim() - 1))
        if is_dtensor(x) and not is_dtensor(mask):
            rows = _shard_like(rows.expand(x.shape), x)  # any placement, no communication
        return rows * x


def channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of ``output`` that holds ``module``'s output channels.

    Linear layers put features last; convolutions put channels just before the spatial
    dims, which also covers unbatched inputs.
    """
    kernel = getattr(module, "kernel_size", None)
    if kernel is None:
        return output.dim() - 1
    return output.dim() - 1 - len(kernel)


class BiasHook:
    """Forward hook: ``output + bias`` where ``bias`` is ``module._bias``, with the rows
    the mask prunes set to zero when ``prune_bias`` is True.

    The stored ``_bias`` is left untouched (the reference zeroed it in place on every
    forward, which made un-pruning impossible).
    """

    def __init__(self, parametrization: FakeStructuredSparsity, prune_bias: bool) -> None:
        self.param = parametrization
        self.prune_bias = prune_bias

    def __call__(
        self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        bias = getattr(module, "_bias", None)
        if bias is None:
            return output
        if self.prune_bias:
            bias = bias * self.param.mask
        dim = channel_dim(module, output)
        shape = [1] * output.dim()
        shape[dim] = -1
        return output + bias.reshape(shape)
