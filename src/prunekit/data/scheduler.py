"""``BaseDataScheduler``: vary one config value of a data sparsifier over time.

Same contract as the reference's ``data_scheduler.BaseDataScheduler``: ``base_param``,
``_last_param``, ``_step_count`` (1 after construction), ``last_epoch``, an abstract
``get_schedule_param()`` returning ``{name: value}``, and a ``UserWarning`` when
``scheduler.step()`` runs before ``data_sparsifier.step()``. Returned names are checked
before any value is written; ``verbose`` logs instead of printing.
"""

from __future__ import annotations

import abc
import logging
import warnings
from typing import Any

from prunekit.data.base import BaseDataSparsifier, DataNameError
from prunekit.errors import ConfigTypeError
from prunekit.scheduler.base import _counting

__all__ = ["BaseDataScheduler"]

_log = logging.getLogger("prunekit")


class BaseDataScheduler:
    """Abstract scheduler of ``data_groups[name][schedule_param]``.

    >>> import torch
    >>> from prunekit.data import DataNormSparsifier
    >>> class Halve(BaseDataScheduler):
    ...     def get_schedule_param(self):
    ...         return {n: self.base_param[n] * 0.5 ** self.last_epoch for n in self.base_param}
    >>> s = DataNormSparsifier([("t", torch.randn(4, 8))], sparsity_level=0.8)
    >>> sched = Halve(s, "sparsity_level")
    >>> s.step(); sched.step()
    >>> s.data_groups["t"]["sparsity_level"]
    0.4
    """

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        if not isinstance(data_sparsifier, BaseDataSparsifier):
            raise ConfigTypeError(
                f"{type(self).__name__}: {type(data_sparsifier).__name__} is not an instance of "
                "prunekit.data.BaseDataSparsifier"
            )
        if not isinstance(schedule_param, str):
            raise ConfigTypeError(
                f"{type(self).__name__}: schedule_param must be a config key (str), got "
                f"{schedule_param!r}"
            )
        self.data_sparsifier = data_sparsifier
        self.schedule_param = schedule_param
        self.base_param = {
            name: config.get(schedule_param) for name, config in data_sparsifier.data_groups.items()
        }
        self.last_epoch = last_epoch
        self.data_sparsifier.step = _counting(self.data_sparsifier.step)  # type: ignore[method-assign]
        self.data_sparsifier._step_count = 0  # type: ignore[attr-defined]
        self._step_count = 0
        self.verbose = verbose
        self._get_sp_called_within_step = False
        self.step()

    @abc.abstractmethod
    def get_schedule_param(self) -> dict[str, Any]:
        """``{name: value}`` of ``schedule_param`` at ``self.last_epoch``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__} (\nData Sparsifier {self.data_sparsifier}\n"
            f"    {self.schedule_param}: {self.base_param}\n)"
        )

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the data sparsifier (save the sparsifier separately)."""
        return {k: v for k, v in self.__dict__.items() if k != "data_sparsifier"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the attributes saved by ``state_dict()`` (load the sparsifier first)."""
        self.__dict__.update(state_dict)

    def get_last_param(self) -> dict[str, Any]:
        """The values set by the last ``step()``."""
        return self._last_param

    def _warn_order(self) -> None:
        if not hasattr(self.data_sparsifier.step, "_with_counter"):
            warnings.warn(
                "Seems like `data_sparsifier.step()` has been overridden after sparsity scheduler "
                "initialization. Please, make sure to call `data_sparsifier.step()` before "
                "`scheduler.step()`.",
                UserWarning,
                stacklevel=3,
            )
        elif self.data_sparsifier._step_count < 1:  # type: ignore[attr-defined]
            warnings.warn(
                "Detected call of `scheduler.step()` before `data_sparsifier.step()`. You have to "
                "make sure you run the data_sparsifier.step() BEFORE any calls to the "
                "scheduler.step().",
                UserWarning,
                stacklevel=3,
            )

    def step(self) -> None:
        """Advance one epoch and write the new values into the sparsifier's data_groups."""
        if self._step_count == 1:
            self._warn_order()
        self._step_count += 1
        self._get_sp_called_within_step = True
        try:
            self.last_epoch += 1
            values = self.get_schedule_param()
        finally:
            self._get_sp_called_within_step = False
        groups = self.data_sparsifier.data_groups
        unknown = sorted(set(values) - set(groups))
        if unknown:
            raise DataNameError(
                f"{type(self).__name__}.get_schedule_param() returned unknown data names "
                f"{unknown}; known names: {sorted(groups)}"
            )
        for name, value in values.items():
            groups[name][self.schedule_param] = value
            if self.verbose:
                _log.info("adjusting %s for data %s to %s", self.schedule_param, name, value)
        self._last_param = {
            name: config.get(self.schedule_param) for name, config in groups.items()
        }
        self.data_sparsifier.enable_mask_update = True
