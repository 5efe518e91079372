"""Bit-packed masks: one bit per element instead of a byte, for very large tables.

Opt in per item with the reference's own extension point, the ``parametrization`` config
key: ``add_data(name, table, parametrization=PackedSparsity)``. The mask then costs 1/8
of a bool mask (1/32 of the reference's float32 one); ``get_mask`` returns an unpacked
copy, so write masks through the sparsifier, not through ``get_mask(name)``.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import ConfigError

__all__ = ["PackedMask", "PackedSparsity", "pack_bits", "unpack_bits"]

_BITS = 8


def _weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << i for i in range(_BITS)], dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ``ceil(numel / 8)`` bytes, element ``i`` in bit ``i % 8``."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % _BITS
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, _BITS).to(torch.uint8) * _weights(mask.device)
    return groups.sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor of ``shape`` that ``pack_bits`` packed into ``bits``."""
    numel = shape.numel()
    unpacked = (bits[:, None] & _weights(bits.device)) != 0
    return unpacked.reshape(-1)[:numel].view(shape)


class PackedMask:
    """A bool mask kept as bits; ``copy_`` and ``unpack`` read and write it whole."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.shape = mask.shape
        self.bits = pack_bits(mask.bool())

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.shape)

    def copy_(self, mask: torch.Tensor) -> PackedMask:
        if mask.shape != self.shape:
            raise ConfigError(
                f"PackedMask: mask of shape {tuple(mask.shape)} cannot replace one of shape "
                f"{tuple(self.shape)}"
            )
        self.bits.copy_(pack_bits(mask.bool()))
        return self

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size()

    def __repr__(self) -> str:
        return f"PackedMask(shape={tuple(self.shape)}, nbytes={self.nbytes})"


class PackedSparsity(nn.Module):
    """Like ``FakeSparsity`` (output ``mask * x``), with the mask stored as bits."""

    def __init__(self, mask: torch.Tensor | PackedMask) -> None:
        super().__init__()
        self.packed = mask if isinstance(mask, PackedMask) else PackedMask(mask)

    @property
    def mask(self) -> torch.Tensor:
        """The unpacked bool mask (a new tensor)."""
        return self.packed.unpack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.shape != x.shape:
            raise ConfigError(
                f"PackedSparsity: mask shape {tuple(self.packed.shape)} must match the tensor's "
                f"shape {tuple(x.shape)}"
            )
        return x * self.mask

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        """Masks belong to the sparsifier's state_dict, as with ``FakeSparsity``."""
        return {}
