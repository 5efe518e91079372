"""``CalibratedSparsifier``: the life cycle of sparsifiers that learn from activations.

prepare → calibrate → step → squash_mask. ``calibrate()`` is a context manager: while
it is open, forward pre-hooks on the prepared layers (``nn.Linear``, or transformers'
``Conv1D``, see ``linear_like``) accumulate a statistic of their inputs (a Hessian
``Σ x xᵀ`` for SparseGPT, per-feature ``Σ x²`` for Wanda); ``step()`` turns each
statistic into a mask (and, for SparseGPT, new weights) and frees it. Both take
``tensor_fqns`` so that a sequential engine can hold the statistics of one transformer
block at a time.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import ConfigError, ConfigTypeError, FqnError, StateError, UnsupportedError
from prunekit.linear_like import (
    LAYER_KINDS,
    conv1d_class,
    in_features,
    is_linear_like,
    out_in,
)
from prunekit.parametrization import FakeSparsity
from prunekit.sparsifier._checks import check_level
from prunekit.sparsifier.base import SUPPORTED_MODULES, BaseSparsifier

__all__ = ["CalibratedSparsifier", "parse_pattern"]

Pattern = str | tuple[int, int] | None


def parse_pattern(where: str, pattern: Any) -> tuple[int, int] | None:
    """``None`` (unstructured), ``"N:M"`` or ``(N, M)`` with ``1 <= N < M`` → ``(N, M)``."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"{where}: pattern must look like '2:4', got {pattern!r}")
        pattern = (int(parts[0]), int(parts[1]))
    ok = isinstance(pattern, (tuple, list)) and len(pattern) == 2
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pattern)
    if not ok:
        raise ConfigTypeError(
            f"{where}: pattern must be None, 'N:M' or (N, M) ints, got {pattern!r}"
        )
    n, m = int(pattern[0]), int(pattern[1])
    if not 1 <= n < m:
        raise ConfigError(f"{where}: pattern N:M needs 1 <= N < M, got {n}:{m}")
    return n, m


def _fake_sparsity(module: nn.Module, tensor_name: str) -> FakeSparsity:
    return next(p for p in module.parametrizations[tensor_name] if isinstance(p, FakeSparsity))


class CalibratedSparsifier(BaseSparsifier):
    """Abstract base: subclasses define the input statistic and ``update_mask``.

    ``sparsity_level`` is the fraction of each layer's weights to zero (exactly, up to
    rounding of one weight); ``pattern`` (``"2:4"``, ``(4, 8)``) asks for N:M instead and
    then fixes the level at ``1 - N/M``. Both can be overridden per layer in the config.
    """

    def __init__(
        self, sparsity_level: float = 0.5, pattern: Pattern = None, **defaults: Any
    ) -> None:
        defaults = {"sparsity_level": sparsity_level, "pattern": pattern, **defaults}
        super().__init__(defaults=defaults)
        self.validate_group({"tensor_fqn": "defaults", **defaults})
        self._stats: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_stats": {}, "_tokens": {}}

    # -- hooks for subclasses --------------------------------------------------------
    @abc.abstractmethod
    def new_statistic(self, weight: torch.Tensor) -> torch.Tensor:
        """A zero statistic for a layer with this weight."""

    @abc.abstractmethod
    def accumulate(self, statistic: torch.Tensor, inputs: torch.Tensor) -> None:
        """Add a ``(tokens, in_features)`` float32 input batch to ``statistic`` in place."""

    @abc.abstractmethod
    def white_statistic(self, weight: torch.Tensor) -> torch.Tensor:
        """The statistic of white inputs (uncorrelated, unit variance) for a layer with
        this weight: what ranks its weights by magnitude alone."""

    def prepare_statistic(self, group: dict[str, Any], statistic: torch.Tensor) -> torch.Tensor:
        """What ``update_mask`` receives; runs for every layer before any changes, so it
        is where a layer raises (default: the statistic itself, if finite)."""
        if not bool(torch.isfinite(statistic).all()):
            raise ConfigError(
                f"{type(self).__name__}: calibration inputs of {group['module_fqn']!r} hold NaN "
                "or inf; the statistic cannot rank weights"
            )
        return statistic

    def make_config_from_model(
        self, model: nn.Module, SUPPORTED_MODULES: set[type[nn.Module]] = SUPPORTED_MODULES
    ) -> None:
        """As ``BaseSparsifier``'s, with transformers' ``Conv1D`` layers (GPT-2's) too."""
        conv1d = conv1d_class()
        super().make_config_from_model(model, SUPPORTED_MODULES | ({conv1d} if conv1d else set()))

    # -- validation ------------------------------------------------------------------
    def validate_group(self, group: dict[str, Any]) -> None:
        where = f"{type(self).__name__} group {group['tensor_fqn']!r}"
        check_level(where, "sparsity_level", group.get("sparsity_level"))
        nm = parse_pattern(where, group.get("pattern"))
        module = group.get("module")
        if module is None:
            return
        if not is_linear_like(module) or group.get("tensor_name") != "weight":
            kind = parametrize.type_before_parametrizations(module)
            raise UnsupportedError(
                f"{where}: only the weights of {LAYER_KINDS} layers can be calibrated, got "
                f"{kind.__name__}.{group.get('tensor_name')}"
            )
        width = in_features(module)
        if nm is not None and width % nm[1]:
            raise ConfigError(
                f"{where}: pattern {nm[0]}:{nm[1]} needs the input width to be a multiple of "
                f"{nm[1]}, got in_features={width}"
            )

    def _select(self, tensor_fqns: Iterable[str] | None, action: str) -> list[dict[str, Any]]:
        if tensor_fqns is None:
            return list(self.groups)
        if isinstance(tensor_fqns, str):
            raise ConfigTypeError(f"{action}: tensor_fqns must be a list of names, got a str")
        by_fqn = {g["tensor_fqn"]: g for g in self.groups}
        wanted = list(tensor_fqns)
        unknown = [f for f in wanted if f not in by_fqn]
        if unknown:
            raise FqnError(
                f"{action}: {unknown} are not prepared tensors; expected some of {sorted(by_fqn)}"
            )
        return [by_fqn[f] for f in wanted]

    # -- calibrate -------------------------------------------------------------------
    @contextmanager
    def calibrate(self, tensor_fqns: Iterable[str] | None = None) -> Iterator[CalibratedSparsifier]:
        """Collect input statistics of the prepared layers (or only ``tensor_fqns``)
        for every forward run inside the ``with`` block; statistics add up across calls.

        >>> import prunekit, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> s = prunekit.WandaSparsifier(sparsity_level=0.5); s.prepare(model, None)
        >>> with s.calibrate():
        ...     _ = model(torch.randn(16, 8))
        >>> s.step(); s.squash_mask()
        >>> int((model[0].weight == 0).sum())
        32
        """
        if not self.groups:
            raise StateError("calibrate: nothing is prepared; call prepare(model, config) first")
        self._check_prepared("calibrate")
        groups = self._select(tensor_fqns, "calibrate")
        handles = []
        try:
            for group in groups:
                fqn = group["tensor_fqn"]
                if fqn not in self._stats:
                    weight = out_in(group["module"], self._original(group["module"], "weight"))
                    self._stats[fqn], self._tokens[fqn] = self.new_statistic(weight), 0
                hook = partial(self._record, fqn, in_features(group["module"]))
                handles.append(group["module"].register_forward_pre_hook(hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _prepare_statistics(self, groups: list[dict[str, Any]]) -> list[torch.Tensor]:
        """``prepare_statistic`` of every group, once per shared statistic."""
        done: dict[int, torch.Tensor] = {}
        for group in groups:
            statistic = self._stats[group["tensor_fqn"]]
            if id(statistic) not in done:
                done[id(statistic)] = self.prepare_statistic(group, statistic)
        return [done[id(self._stats[g["tensor_fqn"]])] for g in groups]

    def _record(self, fqn: str, width: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (width,):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"calibrate: {fqn!r} got input {got}; expected (..., {width})")
        with torch.no_grad():
            x = x.detach().reshape(-1, x.shape[-1])
            self.accumulate(self._stats[fqn], x.to(self._stats[fqn].dtype))
        self._tokens[fqn] += x.shape[0]

    def uncalibrated(self, tensor_fqns: Iterable[str]) -> list[str]:
        """Those of ``tensor_fqns`` whose layers no calibration input has reached (an
        expert no token was routed to, a branch the batches never took)."""
        return [g["tensor_fqn"] for g in self._select(tensor_fqns, "uncalibrated")
                if self._tokens.get(g["tensor_fqn"], 0) == 0]

    def assume_white_inputs(self, tensor_fqns: Iterable[str]) -> None:
        """Give ``tensor_fqns`` the statistic of white inputs, replacing what they
        collected, so ``step`` prunes them by weight magnitude (and the methods that
        update weights leave the kept ones as they are, up to rounding) rather than
        refusing a layer calibration never reached."""
        for group in self._select(tensor_fqns, "assume_white_inputs"):
            weight = out_in(group["module"], self._original(group["module"], "weight"))
            self._stats[group["tensor_fqn"]] = self.white_statistic(weight)
            self._tokens[group["tensor_fqn"]] = 1

    def share_statistic(self, source: str, targets: Iterable[str]) -> None:
        """Give ``targets`` the statistic collected for ``source``: layers that read the
        very same input (q/k/v of attention) need it computed only once. Replaces what
        ``targets`` had collected."""
        if source not in self._stats:
            raise StateError(f"share_statistic: {source!r} has not been calibrated")
        for group in self._select([source, *targets], "share_statistic")[1:]:
            fqn = group["tensor_fqn"]
            width = in_features(group["module"])
            if width != self._stats[source].shape[0]:
                raise ConfigError(
                    f"share_statistic: {fqn!r} reads {width} inputs, "
                    f"{source!r} {self._stats[source].shape[0]}; they cannot share an input"
                )
            self._stats[fqn], self._tokens[fqn] = self._stats[source], self._tokens[source]

    # -- step ------------------------------------------------------------------------
    def step(self, use_path: bool = True, *, tensor_fqns: Iterable[str] | None = None) -> None:
        """Prune every prepared layer (or only ``tensor_fqns``) from its statistics.

        All named layers must have been calibrated; every check runs before any weight
        or mask changes. The raw statistics are freed as soon as every named layer's is
        prepared (SparseGPT: factored), so a Hessian and its factor never meet the
        solve's own memory.
        """
        if not self.enable_mask_update:
            return
        self._check_prepared("step")
        groups = self._select(tensor_fqns, "step")
        for group in groups:
            self.validate_group(group)
        missing = [g["tensor_fqn"] for g in groups if self._tokens.get(g["tensor_fqn"], 0) == 0]
        if missing:
            raise StateError(
                f"step: no calibration data reached {missing}; run the model on calibration "
                "batches inside `with sparsifier.calibrate():` first"
            )
        with torch.no_grad():
            ready = self._prepare_statistics(groups)
            for group in groups:
                del self._stats[group["tensor_fqn"]], self._tokens[group["tensor_fqn"]]
            for group, statistic in zip(groups, ready, strict=True):
                self.update_mask(**group, statistic=statistic)
                module = group["module"]
                _fake_sparsity(module, "weight").apply_(self._original(module, "weight"))
