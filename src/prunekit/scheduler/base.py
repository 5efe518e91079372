"""``BaseScheduler``: sets every group's ``sparsity_level`` once per ``step()``.

Same contract as ``torch.ao.pruning.BaseScheduler`` (``base_sl``, ``last_epoch``,
``_step_count`` is 1 after construction, a warning when ``scheduler.step()`` runs before
``sparsifier.step()``), with the sparsifier's type checked before anything else.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from functools import wraps
from typing import Any

from prunekit.errors import ConfigError, ConfigTypeError, StateDictError
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["BaseScheduler"]


def _counting(method: Any) -> Any:
    """Wrap a bound ``sparsifier.step`` so each call increments ``_step_count``."""
    if getattr(method, "_with_counter", False):
        return method
    owner = weakref.ref(method.__self__)
    func = method.__func__

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        instance = owner()
        instance._step_count += 1
        return func.__get__(instance, type(instance))(*args, **kwargs)

    wrapper._with_counter = True  # type: ignore[attr-defined]
    return wrapper


def check_sparsifier(scheduler: str, sparsifier: Any) -> None:
    """Schedulers drive a ``BaseSparsifier`` whose groups all have ``sparsity_level``."""
    if not isinstance(sparsifier, BaseSparsifier):
        raise ConfigTypeError(
            f"{scheduler}: {type(sparsifier).__name__} is not an instance of "
            "prunekit.BaseSparsifier"
        )
    for i, group in enumerate(sparsifier.groups):
        if "sparsity_level" not in group:
            raise StateDictError(
                f"{scheduler}: group {i} ({group.get('tensor_fqn')!r}) has no 'sparsity_level' "
                f"to schedule; it has {sorted(k for k in group if k != 'module')}"
            )


class BaseScheduler:
    """Abstract sparsity-level scheduler: subclasses implement ``get_sl()``."""

    def __init__(self, sparsifier: BaseSparsifier, last_epoch: int = -1, verbose: bool = False):
        check_sparsifier(type(self).__name__, sparsifier)
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int):
            raise ConfigTypeError(
                f"{type(self).__name__}: last_epoch must be an int, got {last_epoch!r}"
            )
        self.sparsifier = sparsifier
        self.base_sl = [group["sparsity_level"] for group in sparsifier.groups]
        self.last_epoch = last_epoch
        self.sparsifier.step = _counting(self.sparsifier.step)  # type: ignore[method-assign]
        self.sparsifier._step_count = 0  # type: ignore[attr-defined]
        self._step_count = 0
        self.verbose = verbose
        self._get_sl_called_within_step = False
        self.step()

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the sparsifier."""
        return {k: v for k, v in self.__dict__.items() if k != "sparsifier"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)

    def get_last_sl(self) -> list[float]:
        """The levels set by the last ``step()``."""
        return self._last_sl

    def get_sl(self) -> list[float]:
        """The level of every group at ``self.last_epoch``."""
        self._warn_outside_step()
        raise NotImplementedError

    def _warn_outside_step(self) -> None:
        if not self._get_sl_called_within_step:
            warnings.warn(
                "To get the last sparsity level computed by the scheduler, please use "
                "`get_last_sl()`.",
                stacklevel=3,
            )

    def print_sl(self, is_verbose: bool, group: int, sl: float, epoch: int | None = None) -> None:
        """Log the level of one group when ``verbose``."""
        if is_verbose:
            prefix = "" if epoch is None else f"Epoch {epoch:5d}: "
            logging.getLogger("prunekit").info(
                "%sadjusting sparsity level of group %d to %.4e.", prefix, group, sl
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__} (\nSparsifier {self.sparsifier}\n    base_sl: {self.base_sl}\n)"
        )

    def _warn_order(self) -> None:
        if not hasattr(self.sparsifier.step, "_with_counter"):
            warnings.warn(
                "Seems like `sparsifier.step()` has been overridden after sparsity scheduler "
                "initialization. Please, make sure to call `sparsifier.step()` before "
                "`scheduler.step()`.",
                UserWarning,
                stacklevel=3,
            )
        elif self.sparsifier._step_count < 1:  # type: ignore[attr-defined]
            warnings.warn(
                "Detected call of `scheduler.step()` before `sparsifier.step()`. You have to make "
                "sure you run the sparsifier.step() BEFORE any calls to the scheduler.step().",
                UserWarning,
                stacklevel=3,
            )

    def step(self, epoch: int | None = None) -> None:
        """Advance one epoch and write the new levels into the sparsifier's groups."""
        if self._step_count == 1:
            self._warn_order()
        self._step_count += 1
        self._get_sl_called_within_step = True
        try:
            self.last_epoch += 1
            values = self.get_sl()
        finally:
            self._get_sl_called_within_step = False
        for i, (group, sl) in enumerate(zip(self.sparsifier.groups, values, strict=False)):
            group["sparsity_level"] = sl
            self.print_sl(self.verbose, i, sl, epoch)
        self._last_sl = [group["sparsity_level"] for group in self.sparsifier.groups]
        self.sparsifier.enable_mask_update = True

    def _make_sure_a_list(self, var: Any) -> list:
        """Broadcast a scalar to one value per group, or check a list's length."""
        n = len(self.sparsifier.groups)
        if not isinstance(var, (list, tuple)):
            return [var] * n
        if len(var) != n:
            raise ConfigError(f"Expected variable of length {n}, but got {len(var)}")
        return list(var)
