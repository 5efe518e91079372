"""``BaseStructuredSparsifier``: row masks on weights, then ``prune()`` physically removes
the masked rows and the inputs that read them.

Same life cycle, groups and state as the reference (``prepare`` → ``step`` → ``prune``),
with its bugs fixed: every input is validated before anything changes, LSTMs in an
automatic config get their real weight names, ``BiasHook`` no longer rewrites ``_bias``,
and ``prune()`` either handles every branch of the graph or refuses, naming the node.
"""

from __future__ import annotations

import abc
import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import (
    ConfigError,
    ConfigTypeError,
    FqnError,
    StateDictError,
    StateError,
    UnsupportedError,
)
from prunekit.fqn import resolve_tensor_fqn
from prunekit.parametrization import is_dtensor, module_contains_param
from prunekit.sparsifier._loading import groups_to_load
from prunekit.sparsifier.base import BaseSparsifier
from prunekit.structured import ops
from prunekit.structured.graph import plan_prune
from prunekit.structured.parametrization import BiasHook, FakeStructuredSparsity
from prunekit.structured.patterns import PatternIndex, default_patterns
from prunekit.structured.shrink import structured_mask

__all__ = ["SUPPORTED_STRUCTURED_PRUNING_MODULES", "BaseStructuredSparsifier"]

SUPPORTED_STRUCTURED_PRUNING_MODULES: frozenset[type[nn.Module]] = frozenset(
    {nn.Linear, nn.LSTM, *ops.CONV_TYPES}
)
_BIAS_HOOKED = (nn.Linear, *ops.CONV_TYPES)


class BaseStructuredSparsifier(BaseSparsifier):
    """Abstract structured pruner: subclasses implement ``update_mask`` on the 1-D row mask
    ``module.parametrizations[tensor_name][0].mask``.

    ``patterns`` maps tuples of module classes / functions / ``"output"`` to pattern
    functions, as in the reference (default: ``default_patterns()``).

    >>> import torch, prunekit.structured as ps
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
    >>> pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    >>> pruner.step()
    >>> pruned = pruner.prune()
    >>> pruned is model, model[0].out_features, model[2].in_features
    (True, 4, 4)
    """

    def __init__(
        self,
        defaults: dict[str, Any] | None,
        patterns: dict[Any, Callable[..., None]] | None = None,
    ) -> None:
        super().__init__(defaults)
        if patterns is not None and not isinstance(patterns, dict):
            raise ConfigTypeError(
                f"patterns must be a dict {{(nn.Linear, nn.Linear): fn, ...}}, got "
                f"{type(patterns).__name__}"
            )
        self.patterns = default_patterns() if patterns is None else patterns

    def __getstate__(self) -> dict[str, Any]:
        """Keep the pattern table in copies and pickles (the reference dropped it); the
        default table is rebuilt rather than stored (some of its functions do not pickle)."""
        custom = self.patterns if self.patterns != default_patterns() else None
        return {**super().__getstate__(), "patterns": custom}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        patterns = state.pop("patterns", None)
        super().__setstate__(state)
        self.patterns = default_patterns() if patterns is None else patterns

    def make_config_from_model(
        self, model: nn.Module, SUPPORTED_MODULES: set[type[nn.Module]] | None = None
    ) -> None:
        """One entry per Linear/ConvNd weight, and one per ``weight_ih_l*``/``weight_hh_l*``
        of each LSTM (the reference named a non-existent ``lstm.weight``)."""
        supported = SUPPORTED_MODULES or SUPPORTED_STRUCTURED_PRUNING_MODULES
        super().make_config_from_model(model, SUPPORTED_MODULES=set(supported))
        config = []
        for entry in self.config:
            fqn = entry["tensor_fqn"].rsplit(".", 1)[0]
            module = model.get_submodule(fqn)
            if isinstance(module, nn.LSTM):
                prefix = f"{fqn}." if fqn else ""
                names = [n for n, _ in module.named_parameters() if n.startswith("weight_")]
                config.extend({"tensor_fqn": prefix + n} for n in names)
            else:
                config.append(entry)
        self.config = config

    # -- validation (runs before any change) -------------------------------------------
    def _group_from_entry(self, model: nn.Module, i: int, entry: Any) -> dict[str, Any]:
        mask = entry.get("mask") if isinstance(entry, dict) else None
        stripped = {k: v for k, v in entry.items() if k != "mask"} if mask is not None else entry
        group = super()._group_from_entry(model, i, stripped)
        tensor = self._original(group["module"], group["tensor_name"])
        if tensor.dim() < 2:
            raise ConfigError(
                f"config[{i}]: {group['tensor_fqn']!r} has shape {tuple(tensor.shape)}; "
                "structured pruning removes rows of a weight with 2 or more dimensions"
            )
        if parametrize.is_parametrized(group["module"], group["tensor_name"]):
            raise ConfigError(
                f"config[{i}]: {group['tensor_fqn']!r} is already parametrized; prepare each "
                "tensor once"
            )
        if mask is not None:
            _check_row_mask(i, group["tensor_fqn"], mask, tensor)
            group["mask"] = mask
        return group

    # -- prepare ---------------------------------------------------------------------------
    def _prepare(self, *args: Any, **kwargs: Any) -> None:
        """Attach a row mask to every new group; move Linear/Conv biases behind a BiasHook
        and mask LSTM biases with their weight's mask."""
        for group in self.groups:
            module, name, fqn = group["module"], group["tensor_name"], group["tensor_fqn"]
            if "mask" in self.state.get(fqn, {}):
                continue  # prepared by an earlier call
            tensor = self._original(module, name)
            mask = group.get("mask")
            if mask is None:
                mask = torch.ones(tensor.shape[0], dtype=torch.bool, device=tensor.device)
            self.state[fqn]["mask"] = mask
            parametrization = group.get("parametrization", FakeStructuredSparsity)(mask)
            parametrize.register_parametrization(module, name, parametrization)
            if isinstance(module, nn.LSTM):
                _mask_lstm_bias(module, name, parametrization)
            elif isinstance(module, _BIAS_HOOKED) and name == "weight":
                _hook_bias(module, parametrization, group.get("prune_bias", True))

    # -- prune ---------------------------------------------------------------------------
    def prune(self) -> nn.Module:
        """Shrink the prepared model in place and return it.

        The whole graph is traced and checked first; if any prepared layer cannot be
        pruned, an ``UnsupportedError`` names the node and the model is left unchanged;
        so is a model sharded by FSDP2 (prune an unsharded copy: see the error).
        Afterwards no pruned layer carries a parametrization or a BiasHook. (The reference
        returned an fx ``GraphModule`` sharing the original's submodules.)
        """
        model = getattr(self, "model", None)
        if model is None:
            raise StateError("prune: nothing to prune; call prepare(model, config) first")
        _check_unsharded(model)
        plans = plan_prune(model, PatternIndex(self.patterns))
        for plan in plans:
            plan.apply()
        self._pruned = bool(plans) or getattr(self, "_pruned", False)
        for name, module in model.named_modules():
            if module_contains_param(module, FakeStructuredSparsity):
                raise StateError(
                    f"prune: pattern function left FakeStructuredSparsity on {name!r}"
                )
        return model

    @abc.abstractmethod
    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Update the row mask of ``module.<tensor_name>`` in place."""

    def step(self, use_path: bool = True) -> None:
        """As ``BaseSparsifier.step``; after ``prune()`` there are no masks left to step."""
        if getattr(self, "_pruned", False):
            raise StateError(
                "step: prune() already removed the masks and shrank the model; prepare the "
                "pruned model with a new pruner to keep pruning"
            )
        super().step(use_path)

    # -- squash and load ---------------------------------------------------------------------
    def squash_mask(self, *args: Any, **kwargs: Any) -> None:
        """As ``BaseSparsifier.squash_mask`` (weights keep full width, masked rows zero);
        the bias masks of LSTMs are baked too."""
        super().squash_mask(*args, **kwargs)
        for group in self.groups:
            module = group["module"]
            if isinstance(module, nn.LSTM) and parametrize.is_parametrized(module):
                for name in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)

    def load_state_dict(
        self, state_dict: dict[str, Any], strict: bool = True, model: nn.Module | None = None
    ) -> None:
        """Copy row masks into a model prepared with the same config (default: the prepared
        model) and restore state and groups; nothing changes if any entry does not fit."""
        model = model if model is not None else getattr(self, "model", None)
        if model is None:
            raise StateError("load_state_dict: no model; call prepare(model, config) first")
        missing = [k for k in ("state", "groups") if k not in state_dict]
        if missing:
            raise StateDictError(
                f"load_state_dict: missing keys {missing}; got {sorted(state_dict)}"
            )
        masks = _row_masks(model, state_dict["state"], strict)
        groups = groups_to_load(model, state_dict["groups"], strict, self.validate_group)
        state: dict[str, dict] = defaultdict(dict)
        for fqn, entry in state_dict["state"].items():
            state[fqn] = {k: copy.deepcopy(v) for k, v in entry.items() if k != "mask"}
        for fqn, (holder, mask) in masks.items():
            holder.copy_(mask)
            state[fqn]["mask"] = holder
        self.model, self.state, self.groups = model, state, groups


def _check_unsharded(model: nn.Module) -> None:
    """FSDP2 fixes every parameter's size when it wraps a module: refuse to shrink a
    sharded model (before any change) and name the way through an unsharded copy."""
    for fqn, param in model.named_parameters():
        if is_dtensor(param):
            raise UnsupportedError(
                f"prune: parameter {fqn!r} is sharded (a DTensor with placements "
                f"{tuple(param.placements)}) and FSDP2 cannot change its size in place; prune "
                "an unsharded copy instead: load the full model state dict "
                "(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))"
                " into the model built and prepared with the same config, load "
                "pruner.state_dict() into its pruner, call prune() there and fully_shard the "
                "pruned model again"
            )


def _check_row_mask(i: int, fqn: str, mask: Any, tensor: torch.Tensor) -> None:
    ok = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    if not ok or mask.shape != (tensor.shape[0],):
        got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask)
        raise ConfigError(
            f"config[{i}]: mask for {fqn!r} must be a bool tensor of shape "
            f"({tensor.shape[0]},) (one entry per row), got {got}"
        )


def _hook_bias(module: nn.Module, parametrization: FakeStructuredSparsity, prune_bias: bool):
    if module.bias is not None:
        module.register_parameter("_bias", nn.Parameter(module.bias.detach()))
        module.bias = None
        module.prune_bias = prune_bias
    module.register_forward_hook(BiasHook(parametrization, prune_bias))


def _mask_lstm_bias(lstm: nn.LSTM, name: str, parametrization: FakeStructuredSparsity) -> None:
    """A masked LSTM row must see no bias either, or its unit would not output zero."""
    bias_name = name.replace("weight_", "bias_", 1)
    if hasattr(lstm, bias_name) and not parametrize.is_parametrized(lstm, bias_name):
        bias_mask = FakeStructuredSparsity(parametrization.mask)
        parametrize.register_parametrization(lstm, bias_name, bias_mask)


def _row_masks(model: nn.Module, states: dict, strict: bool) -> dict:
    """``{fqn: (row mask in the model, mask to copy)}``, every entry checked."""
    masks = {}
    for fqn, entry in states.items():
        if entry.get("mask") is None:
            continue
        try:
            info = resolve_tensor_fqn(model, fqn)
        except FqnError as err:
            if strict:
                raise StateDictError(f"load_state_dict: {err}") from None
            continue
        mask, holder = entry["mask"], structured_mask(info["module"], info["tensor_name"])
        if holder is None:
            raise StateDictError(
                f"load_state_dict: {fqn!r} has no FakeStructuredSparsity; prepare(model, "
                "config) with the same config before loading row masks"
            )
        if not isinstance(mask, torch.Tensor) or mask.shape != holder.shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise StateDictError(
                f"load_state_dict: row mask for {fqn!r} has shape {got}, expected "
                f"{tuple(holder.shape)}"
            )
        masks[fqn] = (holder, mask.to(holder.device) != 0)
    return masks
