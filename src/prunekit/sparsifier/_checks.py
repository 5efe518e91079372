"""Validation of the config values the sparsifiers share; each error names the tensor."""

from __future__ import annotations

import math
import numbers
from typing import Any

from prunekit.errors import ConfigError, ConfigTypeError


def check_level(where: str, key: str, value: Any) -> float:
    """A level must be a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"{where}: {key} must be a number in [0, 1], got {value!r}")
    if math.isnan(value) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: {key} must be in [0, 1], got {value!r}")
    return float(value)


def check_block_shape(where: str, value: Any) -> tuple[int, int]:
    """A block shape is two positive ints ``(rows, cols)``."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigTypeError(
            f"{where}: sparse_block_shape must be a pair of ints like (1, 4), got {value!r}"
        )
    if min(value) <= 0:
        raise ConfigError(f"{where}: sparse_block_shape must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])


def check_zeros_per_block(where: str, value: Any, block_size: int) -> int:
    """zeros_per_block lies in [0, block size]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(f"{where}: zeros_per_block must be an int, got {value!r}")
    if not 0 <= value <= block_size:
        raise ConfigError(
            f"{where}: zeros_per_block must be in [0, {block_size}] (the block size), got {value}"
        )
    return int(value)
