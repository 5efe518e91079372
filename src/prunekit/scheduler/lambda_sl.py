"""``LambdaSL``: level = base level times a user function of the epoch, clamped to [0, 1]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.scheduler.base import BaseScheduler, check_sparsifier
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["LambdaSL"]

SlLambda = Callable[[int], float]


class LambdaSL(BaseScheduler):
    """Set each group's level to ``base_sl * sl_lambda(epoch)``, clamped to [0, 1].

    ``sl_lambda`` is one callable for all groups or a list with one per group.

    >>> import prunekit, torch
    >>> s = prunekit.WeightNormSparsifier(sparsity_level=0.8)
    >>> s.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), None)
    >>> sched = LambdaSL(s, lambda epoch: epoch / 4)
    >>> [round(sched.get_last_sl()[0], 2) for _ in range(3) if not sched.step()]
    [0.2, 0.4, 0.6]
    """

    def __init__(
        self,
        sparsifier: BaseSparsifier,
        sl_lambda: SlLambda | list[SlLambda] | tuple[SlLambda, ...],
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        check_sparsifier("LambdaSL", sparsifier)
        n = len(sparsifier.groups)
        lambdas = list(sl_lambda) if isinstance(sl_lambda, (list, tuple)) else [sl_lambda] * n
        if len(lambdas) != n:
            raise ConfigError(
                f"LambdaSL: expected {n} sl_lambdas (one per group), got {len(lambdas)}"
            )
        for i, fn in enumerate(lambdas):
            if not callable(fn):
                raise ConfigTypeError(f"LambdaSL: sl_lambda[{i}] must be callable, got {fn!r}")
        self.sl_lambdas = lambdas
        super().__init__(sparsifier, last_epoch, verbose)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the sparsifier and the lambdas: like torch's ``LambdaLR``, code is
        not state, so the dict saves with ``torch.save`` and loads with ``weights_only``."""
        return {k: v for k, v in super().state_dict().items() if k != "sl_lambdas"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; the lambdas given to the constructor stay (also when the dict
        comes from the reference, which saves them)."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "sl_lambdas"})

    def get_sl(self) -> list[float]:
        self._warn_outside_step()
        return [
            min(1.0, max(0.0, base * fn(self.last_epoch)))
            for fn, base in zip(self.sl_lambdas, self.base_sl, strict=False)
        ]
