"""glibc's allocator controls, where the C library is glibc (None elsewhere)."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def glibc_function(name: str) -> Callable[..., int] | None:
    """``name`` from glibc (``malloc_trim``, ``mallopt``), or None off glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None
