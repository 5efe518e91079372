"""``BaseSparsifier``: the prepare → step → squash_mask life cycle shared by every
mask-only sparsifier, with the reference's groups, state and state_dict layout.

Differences from ``torch.ao.pruning`` (all listed in the README): masks are bool; every
call validates all of its input before touching the model; the masked entries of the
original weight are zeroed in place whenever a mask changes, so a prepared model runs
at plain-model speed in inference; ``state_dict`` returns copies and
``load_state_dict`` leaves the caller's dict alone.
"""

from __future__ import annotations

import abc
import copy
from collections import defaultdict
from collections.abc import Iterable
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
)
from prunekit.fqn import module_to_fqn, resolve_tensor_fqn
from prunekit.parametrization import (
    FakeSparsity,
    deepcopy_model,
    module_contains_param,
    original_tensor,
)
from prunekit.sparsifier._fsdp import remove_mask, sharded_homes
from prunekit.sparsifier._loading import (
    groups_to_load,
    install_mask,
    masks_to_load,
    sparsity_of,
)
from prunekit.sparsifier._tensors import (
    check_materialized,
    check_no_sharded_params,
    check_not_ddp_wrapped,
    check_not_sharded,
    check_not_tied,
    reshard_fsdp,
    tied_to,
)
from prunekit.swap import swap_module

__all__ = ["BaseSparsifier"]

SUPPORTED_MODULES = {nn.Linear}
KEYS_NOT_IN_STATE_DICT = ("module", "module_fqn", "tensor_name")
_INFO_KEYS = ("module_fqn", "module", "tensor_name", "tensor_fqn")


class BaseSparsifier(abc.ABC):
    """Abstract sparsifier: subclasses implement ``update_mask(module, tensor_name, **group)``.

    >>> import prunekit, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    >>> sparsifier.prepare(model, config=None)
    >>> sparsifier.step()
    >>> sparsifier.squash_mask()
    >>> float((model[0].weight == 0).float().mean())
    0.5
    """

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        if defaults is not None and not isinstance(defaults, dict):
            raise ConfigTypeError(f"defaults must be a dict, got {type(defaults).__name__}")
        self.defaults: dict[str, Any] = defaults or {}
        self.state: dict[str, dict] = defaultdict(dict)
        self.groups: list[dict[str, Any]] = []
        self.enable_mask_update = True

    # -- pickling and printing ---------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """The reference's ``defaults``/``state``/``groups`` plus the other attributes
        (``norm_fn``, ``model``, ...) so a copy can keep stepping."""
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.enable_mask_update = True  # absent from the reference's pickles
        self.__dict__.update(state)

    def __repr__(self) -> str:
        lines = [self.__class__.__name__ + " ("]
        for i, group in enumerate(self.groups):
            lines.append(f"\tGroup {i}")
            lines.append(f"\t    module: {group['module']}")
            lines.extend(f"\t    {k}: {group[k]}" for k in sorted(group) if k != "module")
        return "\n".join(lines) + "\n)"

    # -- hooks for subclasses ----------------------------------------------------------
    @abc.abstractmethod
    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Recompute the mask of ``module.<tensor_name>`` from the group's settings."""

    def validate_group(self, group: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Raise a prunekit error if ``group`` cannot be stepped; called before any change."""

    # -- prepare -------------------------------------------------------------------------
    def make_config_from_model(
        self, model: nn.Module, SUPPORTED_MODULES: set[type[nn.Module]] = SUPPORTED_MODULES
    ) -> None:
        """Config with one entry per child whose exact type is supported, in the
        reference's (stack) order; matched modules are not descended into."""
        self.config = []
        stack = [model]
        while stack:
            module = stack.pop()
            for _, child in module.named_children():
                if type(child) in SUPPORTED_MODULES:
                    self.config.append({"tensor_fqn": module_to_fqn(model, child) + ".weight"})
                else:
                    stack.append(child)

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None) -> None:
        """Attach a mask to every tensor of ``config`` (all ``nn.Linear`` weights if None).

        The whole config is checked first; on error nothing is changed.
        """
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                f"prepare: model must be an nn.Module, got {type(model).__name__}"
            )
        previous_config = getattr(self, "config", None)
        check_not_ddp_wrapped("prepare", model)
        auto = config is None
        if auto:
            check_no_sharded_params("prepare", model)
            self.make_config_from_model(model)
            config = self.config
            self.config = previous_config
        new_groups = self._groups_from_config(model, config, auto)
        self.model = model
        self.config = config
        self.groups.extend(new_groups)
        self._prepare()

    def check_config(self, model: nn.Module, config: list[dict[str, Any]]) -> None:
        """Raise the error ``prepare(model, config)`` would raise, changing nothing: lets a
        caller that prepares a model piece by piece check every piece first."""
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                f"check_config: model must be an nn.Module, got {type(model).__name__}"
            )
        self._groups_from_config(model, config)

    def _groups_from_config(
        self, model: nn.Module, config: Any, auto: bool = False
    ) -> list[dict[str, Any]]:
        """Groups for ``config``; a tied tensor listed twice is kept once when the config
        was built from the model (``auto``) and refused when the user wrote it."""
        if not isinstance(config, (list, tuple)):
            raise ConfigTypeError(
                f"config must be a list of dicts like [{{'tensor_fqn': 'linear.weight'}}], "
                f"got {type(config).__name__}"
            )
        groups, seen = [], {g["tensor_fqn"] for g in self.groups}
        tensors = {
            id(self._original(g["module"], g["tensor_name"])): g["tensor_fqn"] for g in self.groups
        }
        for i, entry in enumerate(config):
            group = self._group_from_entry(model, i, entry)
            fqn = group["tensor_fqn"]
            tensor = self._original(group["module"], group["tensor_name"])
            if fqn in seen or sparsity_of(group["module"], group["tensor_name"]) is not None:
                raise ConfigError(
                    f"config[{i}]: tensor {fqn!r} is already prepared; each tensor takes one "
                    "mask (squash_mask() first, or remove the duplicate entry)"
                )
            seen.add(fqn)
            if auto and id(tensor) in tensors:
                continue
            check_not_tied(i, fqn, tensor, tensors)
            self.validate_group(group)
            groups.append(group)
        return groups

    def _group_from_entry(self, model: nn.Module, i: int, entry: Any) -> dict[str, Any]:
        if not isinstance(entry, dict):
            raise ConfigTypeError(
                f"config[{i}] must be a dict like {{'tensor_fqn': 'linear.weight'}}, got "
                f"{type(entry).__name__}: {entry!r}"
            )
        if "tensor_fqn" not in entry:
            raise ConfigError(
                f"config[{i}] has no 'tensor_fqn' (got keys {sorted(entry)}); name the tensor to "
                "sparsify, e.g. {'tensor_fqn': 'linear.weight'}"
            )
        info = resolve_tensor_fqn(model, entry["tensor_fqn"])
        for key in _INFO_KEYS:
            if key in entry and key != "tensor_fqn" and entry[key] != info[key]:
                raise ConfigError(
                    f"config[{i}]: {key}={entry[key]!r} disagrees with tensor_fqn "
                    f"{entry['tensor_fqn']!r}, which gives {key}={info[key]!r}"
                )
        tensor = self._original(info["module"], info["tensor_name"])
        if not isinstance(tensor, nn.Parameter):
            raise ConfigTypeError(
                f"config[{i}]: {info['tensor_fqn']!r} is a {type(tensor).__name__}, not an "
                "nn.Parameter; only parameters can be sparsified"
            )
        check_not_sharded(
            f"config[{i}]", info["tensor_fqn"], info["module"], info["tensor_name"], tensor
        )
        group = copy.deepcopy(self.defaults)
        group.update(entry)
        group.update(info)
        mask = group.get("mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != tensor.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(
                f"config[{i}]: mask for {info['tensor_fqn']!r} has shape {got}, expected "
                f"{tuple(tensor.shape)}"
            )
        return group

    _original = staticmethod(original_tensor)

    def _prepare(self, *args: Any, **kwargs: Any) -> None:
        """Register a mask parametrization on every group's tensor that has none yet."""
        for group in self.groups:
            module, name, fqn = group["module"], group["tensor_name"], group["tensor_fqn"]
            if fqn in self.state and "mask" in self.state[fqn]:
                continue  # prepared by an earlier call
            tensor = self._original(module, name)
            mask = group.get("mask")
            if mask is None:
                mask = torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
            self.state[fqn]["mask"] = mask
            sparsity = group.get("parametrization", FakeSparsity)(mask)
            for holder, holder_name in [(module, name), *tied_to(self.model, tensor, module)]:
                parametrize.register_parametrization(holder, holder_name, sparsity)
        self._apply_masks()

    # -- step --------------------------------------------------------------------------
    def _check_prepared(self, action: str) -> None:
        for group in self.groups:
            if not parametrize.is_parametrized(group["module"], group["tensor_name"]):
                raise StateError(
                    f"{action}: {group['tensor_fqn']!r} has no mask any more (squash_mask() was "
                    "called); prepare the model again to keep sparsifying"
                )

    @torch.no_grad()
    def _apply_masks(self) -> None:
        """Zero the masked entries of every original tensor (enables the fast forward)."""
        for group in self.groups:
            sparsity = sparsity_of(group["module"], group["tensor_name"])
            if sparsity is not None:
                sparsity.apply_(self._original(group["module"], group["tensor_name"]))

    def step(self, use_path: bool = True) -> None:
        """Recompute every group's mask (no-op while ``enable_mask_update`` is False)."""
        if not self.enable_mask_update:
            return
        self._check_prepared("step")
        reshard_fsdp(getattr(self, "model", None))
        check_materialized("step", self.groups, self._original)
        for group in self.groups:
            self.validate_group(group)
        self._apply_masks()  # the score sees the current masked weight, as in the reference
        with torch.no_grad():
            for group in self.groups:
                self.update_mask(**group)
        self._apply_masks()

    # -- squash and convert ----------------------------------------------------------------
    def squash_mask(
        self,
        params_to_keep: tuple[str, ...] | None = None,
        params_to_keep_per_layer: dict[str, tuple[str, ...]] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Bake every mask into its tensor and remove the parametrizations.

        ``params_to_keep`` (group keys, for all layers) and ``params_to_keep_per_layer``
        (``{module_fqn: keys}``) are copied to ``module.sparse_params``.
        """
        self._check_prepared("squash_mask")
        reshard_fsdp(getattr(self, "model", None))
        homes = sharded_homes(getattr(self, "model", None), self.groups, self._original)
        kept = [
            self._params_to_keep(g, params_to_keep, params_to_keep_per_layer) for g in self.groups
        ]
        self._check_per_layer_fqns(params_to_keep_per_layer)
        self._apply_masks()
        for group, sparse_params in zip(self.groups, kept, strict=False):
            module, name = group["module"], group["tensor_name"]
            plist = module.parametrizations[name]
            already_masked = len(plist) == 1 and sparsity_of(module, name) is not None
            already_masked = already_masked and plist[0].mask.dtype == torch.bool
            tied = list(tied_to(self.model, plist.original, module))
            for holder, holder_name in [(module, name), *tied]:
                remove_mask(holder, holder_name, not already_masked, homes)
            if sparse_params:
                module.sparse_params = sparse_params

    @staticmethod
    def _params_to_keep(
        group: dict[str, Any],
        params_to_keep: Iterable[str] | None,
        per_layer: dict[str, Iterable[str]] | None,
    ) -> dict[str, Any]:
        keys = list(params_to_keep or ())
        if per_layer is not None:
            keys += list(per_layer.get(group["module_fqn"], ()))
        missing = [k for k in keys if k not in group]
        if missing:
            raise StateDictError(
                f"squash_mask: group {group['tensor_fqn']!r} has no key(s) {missing}; it has "
                f"{sorted(k for k in group if k != 'module')}"
            )
        return {k: group[k] for k in keys}

    def _check_per_layer_fqns(self, per_layer: dict[str, Any] | None) -> None:
        known = {g["module_fqn"] for g in self.groups}
        unknown = sorted(set(per_layer or {}) - known)
        if unknown:
            raise FqnError(
                f"squash_mask: params_to_keep_per_layer names {unknown}, which are not sparsified "
                f"modules; expected some of {sorted(known)}"
            )

    def convert(
        self,
        module: nn.Module,
        mapping: dict[type[nn.Module], type[nn.Module]] | None = None,
        inplace: bool = False,
        parameterization: type[nn.Module] = FakeSparsity,
    ) -> nn.Module:
        """Replace every child carrying ``parameterization`` whose type is in ``mapping`` by
        ``mapping[type].from_dense(child)`` (hooks kept); a copy unless ``inplace``."""
        if mapping is None:
            raise NotImplementedError("Need to auto generate mapping")
        if not inplace:
            module = deepcopy_model(module)
        swaps = list(self._swaps(module, mapping, parameterization))
        replaced = [(parent, name, swap_module(child, mapping)) for parent, name, child in swaps]
        for parent, name, new_child in replaced:
            setattr(parent, name, new_child)
        return module

    def _swaps(self, module: nn.Module, mapping: dict, parameterization: type[nn.Module]):
        for name, child in module.named_children():
            source = parametrize.type_before_parametrizations(child)
            if module_contains_param(child, parameterization) and source in mapping:
                yield module, name, child
            else:
                yield from self._swaps(child, mapping, parameterization)

    # -- state_dict ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"state": ..., "groups": ...}`` as in the reference, but copies: later steps do
        not change a state_dict already taken."""
        groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k not in KEYS_NOT_IN_STATE_DICT}
            for g in self.groups
        ]
        return {"state": copy.deepcopy(dict(self.state)), "groups": groups}

    def load_state_dict(
        self, state_dict: dict[str, Any], strict: bool = True, model: nn.Module | None = None
    ) -> None:
        """Restore masks and groups into ``model`` (default: the prepared model).

        Tensors without a mask get one. The incoming dict is not modified, and nothing
        changes if any entry does not fit.
        """
        model = model if model is not None else getattr(self, "model", None)
        if model is None:
            raise StateError(
                "load_state_dict: no model to load into; call prepare(model, config) first or "
                "pass model=..."
            )
        for key in ("state", "groups"):
            if key not in state_dict:
                raise StateDictError(
                    f"load_state_dict: missing key {key!r}; got {sorted(state_dict)}"
                )
        reshard_fsdp(model)
        masks = masks_to_load(model, state_dict["state"], strict)
        groups = groups_to_load(model, state_dict["groups"], strict, self.validate_group)
        self.model = model
        state: dict[str, dict] = defaultdict(dict)
        for fqn, entry in state_dict["state"].items():
            state[fqn] = {k: copy.deepcopy(v) for k, v in entry.items() if k != "mask"}
        for fqn, (module, name, mask) in masks.items():
            state[fqn]["mask"] = install_mask(model, module, name, mask)
        self.state, self.groups = state, groups
        self._apply_masks()
