"""``CubicSL``: the cubic schedule of Zhu & Gupta (2017), in both directions."""

from __future__ import annotations

import math
import numbers
from typing import Any

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.scheduler.base import BaseScheduler, check_sparsifier
from prunekit.sparsifier._checks import check_level
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["CubicSL"]


class CubicSL(BaseScheduler):
    """Move each group from ``init_sl`` to its own level along a cubic curve.

    ``s(t) = s_f + (s_0 - s_f) * (1 - (t - init_t) / (delta_t * total_t)) ** 3``, held at
    ``s_0`` before ``init_t`` (0 if ``initially_zero``) and at ``s_f`` after. Unlike the
    reference, a decreasing schedule (``s_0 > s_f``) works. Every argument may be a
    per-group list.

    >>> import prunekit, torch
    >>> s = prunekit.WeightNormSparsifier(sparsity_level=0.8)
    >>> s.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), None)
    >>> sched = CubicSL(s, init_sl=0.0, init_t=0, delta_t=1, total_t=2)
    >>> [round(sched.get_last_sl()[0], 2) for _ in range(3) if not sched.step()]
    [0.7, 0.8, 0.8]
    """

    def __init__(
        self,
        sparsifier: BaseSparsifier,
        init_sl: float | list[float] = 0.0,
        init_t: int | list[int] = 0,
        delta_t: int | list[int] = 10,
        total_t: int | list[int] = 100,
        initially_zero: bool | list[bool] = False,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        check_sparsifier("CubicSL", sparsifier)
        self.sparsifier = sparsifier
        self.init_sl = self._make_sure_a_list(init_sl)
        self.init_t = self._make_sure_a_list(init_t)
        self.delta_t = self._make_sure_a_list(delta_t)
        self.total_t = self._make_sure_a_list(total_t)
        self.initially_zero = self._make_sure_a_list(initially_zero)
        lists = (self.init_sl, self.init_t, self.delta_t, self.total_t, self.initially_zero)
        for i, args in enumerate(zip(*lists, strict=True)):
            self._check_types(i, *args)
            dt, n = args[2:4]
            if not dt > 0 or not n > 0 or not 0 < dt * n < math.inf:
                raise ConfigError(
                    f"CubicSL group {i}: delta_t and total_t must be positive (with a finite, "
                    f"non-zero product), got delta_t={dt!r}, total_t={n!r}"
                )
        super().__init__(sparsifier, last_epoch, verbose)

    @staticmethod
    def _check_types(i: int, s_0: Any, t_0: Any, dt: Any, n: Any, initially_zero: Any) -> None:
        """Checked up front: a bad value would otherwise fail inside the first ``step()``."""
        where = f"CubicSL group {i}"
        check_level(where, "init_sl", s_0)
        for key, value in (("init_t", t_0), ("delta_t", dt), ("total_t", n)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigTypeError(f"{where}: {key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {key} must be finite, got {value!r}")
        if not isinstance(initially_zero, bool):
            raise ConfigTypeError(f"{where}: initially_zero must be a bool, got {initially_zero!r}")

    @staticmethod
    def sparsity_compute_fn(
        s_0: float, s_f: float, t: int, t_0: int, dt: int, n: int, initially_zero: bool = False
    ) -> float:
        """Level at step ``t``: cubic from ``s_0`` (at ``t_0``) to ``s_f`` (at
        ``t_0 + dt * n``), held at the ends."""
        if initially_zero and t < t_0:
            return 0
        progress = (t - t_0) / (dt * n)
        if not 0 <= progress <= 1:  # held at the ends; the cube could overflow out here
            return s_0 if progress < 0 else s_f
        s_t = s_f + (s_0 - s_f) * (1.0 - progress) ** 3
        return max(min(s_0, s_f), min(max(s_0, s_f), s_t))

    def get_sl(self) -> list[Any]:
        self._warn_outside_step()
        return [
            self.sparsity_compute_fn(s_0, s_f, self.last_epoch, t_0, dt, n, zero)
            for s_0, s_f, t_0, dt, n, zero in zip(
                self.init_sl,
                self.base_sl,
                self.init_t,
                self.delta_t,
                self.total_t,
                self.initially_zero,
                strict=False,
            )
        ]
