"""``BaseDataSparsifier``: masks for data that is not a layer weight (tensors, embeddings).

Same layout as ``torch.ao.pruning._experimental.data_sparsifier``: every item lives in
``_container`` as a buffer parametrized with ``FakeSparsity``, configs in ``data_groups``,
masks in ``state`` and, in ``state_dict()``, as sparse COO tensors. Differences: masks are
bool and keep their identity across steps; every call validates all of its input before
changing anything; the caller's tensor keeps its values until ``squash_mask`` (which
zeroes it in place instead of rebinding its storage).
"""

from __future__ import annotations

import abc
import copy
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.data.packed import PackedMask, PackedSparsity
from prunekit.errors import ConfigError, ConfigTypeError, FqnError, StateDictError, StateError
from prunekit.parametrization import FakeSparsity
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["BaseDataSparsifier", "DataNameError"]

EMBEDDING_TYPES = {nn.Embedding, nn.EmbeddingBag}
SUPPORTED_TYPES = {torch.Tensor, nn.Parameter, *EMBEDDING_TYPES}
_RESERVED = {"parametrizations"}  # created by the first parametrization
_OWN_PARAMETRIZATIONS = (FakeSparsity, PackedSparsity)


class DataNameError(FqnError, ValueError):
    """A data name is unknown or unusable: a ``ValueError`` as in the reference, and a
    ``KeyError`` like every prunekit name error."""


class _Container(nn.Module):
    """Holds every item as a (parametrized) buffer; it has no forward."""


def as_bool_mask(mask: Any, shape: torch.Size, device: torch.device, where: str) -> torch.Tensor:
    """A user or reference mask (float/int 0-1, dense or sparse) as a bool tensor of ``shape``."""
    if not isinstance(mask, torch.Tensor):
        raise ConfigTypeError(f"{where}: mask must be a tensor, got {type(mask).__name__}")
    if mask.layout != torch.strided:
        mask = mask.to_dense()
    if mask.shape != shape:
        raise ConfigError(
            f"{where}: mask has shape {tuple(mask.shape)}, expected the data's shape {tuple(shape)}"
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ConfigError(f"{where}: mask holds values other than 0 and 1")
        mask = mask != 0
    return mask.to(device)


class BaseDataSparsifier(BaseSparsifier):
    """Abstract data sparsifier: subclasses implement ``update_mask(name, data, **config)``.

    >>> import torch
    >>> from prunekit.data import DataNormSparsifier
    >>> s = DataNormSparsifier([("table", torch.randn(8, 8))], sparsity_level=0.5)
    >>> s.step()
    >>> float(s.get_mask("table").float().mean())
    0.5
    """

    def __init__(self, data_list: list[tuple[str, Any]] | None = None, **defaults: Any) -> None:
        super().__init__(defaults=defaults)
        self._container = _Container()
        self.data_groups: dict[str, dict[str, Any]] = {}
        if data_list is not None:
            if not isinstance(data_list, (list, tuple)):
                raise ConfigTypeError(
                    "data_list must be a list of (name, data) pairs, got "
                    f"{type(data_list).__name__}"
                )
            for i, item in enumerate(data_list):
                if not isinstance(item, (list, tuple)) or len(item) != 2:
                    raise ConfigTypeError(
                        f"data_list[{i}] must be a (name, data) pair, got {item!r}"
                    )
                self.add_data(item[0], item[1], **self.defaults)

    # -- hooks for subclasses ----------------------------------------------------------
    @abc.abstractmethod
    def update_mask(self, name: str, data: torch.Tensor, **kwargs: Any) -> None:  # type: ignore[override]
        """Recompute ``self.get_mask(name)`` in place from the unmasked ``data``."""

    def validate_data(self, name: str, data: torch.Tensor, config: dict[str, Any]) -> None:
        """Raise a prunekit error if ``data`` with ``config`` cannot be stepped.

        Called by ``add_data`` and ``step`` before anything changes.
        """

    def prepare(self, model: nn.Module, config: Any) -> None:
        raise NotImplementedError("this function is undefined for this class")

    # -- adding and reading data -------------------------------------------------------
    def _extract_weight(self, data: Any) -> torch.Tensor:
        """The tensor behind ``data`` (an embedding's ``weight``)."""
        return data.weight if type(data) in EMBEDDING_TYPES else data

    def _check_name(self, name: Any, action: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise DataNameError(
                f"{action}: data name must be a non-empty string without '.', got {name!r} "
                "(use '_' instead of '.', e.g. 'emb_bag' for 'emb.bag')"
            )
        if name not in self.data_groups and (name in _RESERVED or hasattr(self._container, name)):
            raise DataNameError(
                f"{action}: data name {name!r} clashes with an attribute of nn.Module; pick another"
            )

    def _check_known(self, name: Any, action: str) -> None:
        if not isinstance(name, str) or name not in self.data_groups:
            raise DataNameError(
                f"{action}: no data named {name!r}; known names: {sorted(self.data_groups)}"
            )

    def add_data(
        self, name: str, data: Any, reuse_mask: bool = True, **config: Any
    ) -> torch.Tensor:
        """Register ``data`` under ``name`` (replacing, with a warning, an item of that name)
        and return its masked view. A replacement keeps the old config (updated with
        ``config``) and, with ``reuse_mask``, the old mask, whose shape must match."""
        self._check_name(name, "add_data")
        if type(data) not in SUPPORTED_TYPES:
            raise ConfigTypeError(
                f"add_data({name!r}): data of type {type(data).__name__} is not supported; "
                "expected torch.Tensor, nn.Parameter, nn.Embedding or nn.EmbeddingBag"
            )
        weight = self._extract_weight(data)
        old = self.data_groups.get(name)
        args = copy.deepcopy(old if old is not None else self.defaults)
        args.update(config)
        mask = self._initial_mask(name, weight, args, reuse_mask and old is not None)
        param_class = args.get("parametrization", FakeSparsity)
        if not (isinstance(param_class, type) and issubclass(param_class, nn.Module)):
            raise ConfigTypeError(
                f"add_data({name!r}): parametrization must be an nn.Module class such as "
                f"FakeSparsity or PackedSparsity, got {param_class!r}"
            )
        self.validate_data(name, weight, args)
        if old is not None:
            warnings.warn(
                f"add_data: replacing existing data {name!r} - did you mean a different name?",
                stacklevel=2,
            )
            self._delete_data(name)
        self._register(name, weight, mask, param_class)
        self.data_groups[name] = args
        return getattr(self._container, name)

    def _initial_mask(
        self, name: str, weight: torch.Tensor, args: dict[str, Any], reuse: bool
    ) -> torch.Tensor:
        if reuse:
            old_mask = self.state[name]["mask"]
            if old_mask.shape != weight.shape:
                raise ConfigError(
                    f"add_data({name!r}): reuse_mask=True keeps the old mask of shape "
                    f"{tuple(old_mask.shape)}, but the new data has shape {tuple(weight.shape)}; "
                    "pass reuse_mask=False or data of the old shape"
                )
            return old_mask
        if args.get("mask") is not None:
            return as_bool_mask(args["mask"], weight.shape, weight.device, f"add_data({name!r})")
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)

    def _register(
        self, name: str, weight: torch.Tensor, mask: torch.Tensor, param_class: type[nn.Module]
    ) -> None:
        """Buffer plus parametrization: the container shares the caller's storage."""
        if isinstance(mask, PackedMask) and param_class is not PackedSparsity:
            mask = mask.unpack()
        sparsity = param_class(mask)
        self._container.register_buffer(name, weight)
        parametrize.register_parametrization(
            self._container, name, sparsity, unsafe=param_class in _OWN_PARAMETRIZATIONS
        )
        self.state[name]["mask"] = sparsity.packed if param_class is PackedSparsity else mask

    def _delete_data(self, name: str) -> None:
        """Detach ``name`` without applying its mask."""
        if parametrize.is_parametrized(self._container, name):
            parametrize.remove_parametrizations(self._container, name, leave_parametrized=False)
        delattr(self._container, name)
        self.state.pop(name, None)
        self.data_groups.pop(name)

    def get_data(self, name: str, return_original: bool = True) -> torch.Tensor:
        """The unmasked data (``return_original``) or its masked view."""
        self._check_known(name, "get_data")
        if not return_original:
            return getattr(self._container, name)
        if not parametrize.is_parametrized(self._container, name):
            raise StateError(
                f"get_data({name!r}): mask squashed - the original data no longer exists; "
                "use return_original=False"
            )
        return self._container.parametrizations[name].original

    def get_mask(self, name: str) -> torch.Tensor:
        """The bool keep-mask of ``name`` (the same tensor object across steps; an unpacked
        copy for items stored with ``parametrization=PackedSparsity``)."""
        if name not in self.state or "mask" not in self.state[name]:
            raise DataNameError(
                f"get_mask: no data named {name!r}; known names: {sorted(self.state)}"
            )
        mask = self.state[name]["mask"]
        return mask.unpack() if isinstance(mask, PackedMask) else mask

    def _write_mask(self, name: str, keep: torch.Tensor) -> None:
        """Store a new bool mask for ``name`` in place (packing it if the item is packed)."""
        self.state[name]["mask"].copy_(keep)

    # -- step and squash -----------------------------------------------------------------
    def _check_parametrized(self, names: list[str], action: str) -> None:
        for name in names:
            self._check_known(name, action)
            if not parametrize.is_parametrized(self._container, name):
                raise StateError(
                    f"{action}: data {name!r} has no mask any more (squash_mask() was called); "
                    "add it again with add_data to keep sparsifying"
                )

    def step(self) -> None:  # type: ignore[override]
        """Recompute every mask from the unmasked data (no-op while
        ``enable_mask_update`` is False); all items are validated first."""
        if not self.enable_mask_update:
            return
        self._check_parametrized(list(self.data_groups), "step")
        for name, config in self.data_groups.items():
            self.validate_data(name, self.get_data(name), config)
        with torch.no_grad():
            for name, config in self.data_groups.items():
                self.update_mask(name, self.get_data(name), **config)

    def squash_mask(  # type: ignore[override]
        self,
        *args: Any,
        leave_parametrized: bool = True,
        names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Remove the parametrizations of ``names`` (default: all); with
        ``leave_parametrized`` the data keeps its masked values (zeroed in place)."""
        names = list(self.data_groups) if names is None else list(names)
        self._check_parametrized(names, "squash_mask")
        for name in names:
            plist = self._container.parametrizations[name]
            applied = False
            own = isinstance(plist[0], _OWN_PARAMETRIZATIONS)
            if leave_parametrized and len(plist) == 1 and own:
                mask = plist[0].mask
                if mask.dtype == torch.bool and mask.shape == plist.original.shape:
                    with torch.no_grad():
                        plist.original.masked_fill_(~mask, 0)
                    applied = True
            parametrize.remove_parametrizations(
                self._container, name, leave_parametrized=leave_parametrized and not applied
            )

    # -- state_dict and pickling ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"state": {name: {"mask": sparse COO}}, "data_groups", "_container"}`` as in
        the reference; masks and configs are copies, the container's tensors are shared."""
        state = {}
        for name, entry in self.state.items():
            state[name] = {k: copy.deepcopy(v) for k, v in entry.items() if k != "mask"}
            state[name]["mask"] = self.get_mask(name).to_sparse_coo()
        return {
            "state": state,
            "data_groups": copy.deepcopy(self.data_groups),
            "_container": self._container.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:  # type: ignore[override]
        """Restore data, masks and configs. ``strict`` replaces everything; otherwise the
        loaded items are added and current items of the same name win. The data is copied
        (the source keeps its own), and nothing changes if any entry does not fit."""
        self._load(state_dict, strict, clone=True)

    def _load(self, state_dict: dict[str, Any], strict: bool, clone: bool) -> None:
        items = self._items_to_load(state_dict)
        if strict:
            self._container = _Container()
            self.state = defaultdict(dict)
            self.data_groups = {}
        for name, (data, mask, parametrized, config, extra) in items.items():
            if name in self.data_groups:
                continue  # non-strict: the current item wins, as in the reference
            data = data.clone() if clone else data
            if parametrized:
                self._register(name, data, mask, config.get("parametrization", FakeSparsity))
            else:
                self._container.register_buffer(name, data)
                packed = config.get("parametrization") is PackedSparsity
                self.state[name]["mask"] = PackedMask(mask) if packed else mask
            self.state[name].update(extra)
            self.data_groups[name] = config

    def _items_to_load(self, state_dict: dict[str, Any]) -> dict[str, tuple]:
        """Validate a whole state_dict: ``{name: (data, mask, parametrized, config, extra)}``."""
        for key in ("state", "data_groups", "_container"):
            if not isinstance(state_dict, dict) or key not in state_dict:
                got = (
                    sorted(state_dict)
                    if isinstance(state_dict, dict)
                    else type(state_dict).__name__
                )
                raise StateDictError(f"load_state_dict: missing key {key!r}; got {got}")
        states, groups, tensors = (
            state_dict["state"],
            state_dict["data_groups"],
            state_dict["_container"],
        )
        extra_groups = sorted(set(groups) - set(states))
        if extra_groups:
            raise StateDictError(
                f"load_state_dict: data_groups {extra_groups} have no entry in 'state'"
            )
        items = {}
        for name, entry in states.items():
            where = f"load_state_dict: data {name!r}"
            if name not in groups:
                raise StateDictError(f"{where} has no entry in 'data_groups'")
            self._check_name_in_state_dict(name, where)
            data, parametrized = self._data_in(tensors, name, where)
            mask = entry.get("mask")
            mask = (
                torch.ones(data.shape, dtype=torch.bool, device=data.device)
                if mask is None
                else as_bool_mask(mask, data.shape, data.device, where)
            )
            extra = {k: copy.deepcopy(v) for k, v in entry.items() if k != "mask"}
            items[name] = (data, mask, parametrized, copy.deepcopy(groups[name]), extra)
        return items

    @staticmethod
    def _check_name_in_state_dict(name: Any, where: str) -> None:
        unusable = not isinstance(name, str) or not name or "." in name or name in _RESERVED
        if unusable or hasattr(_Container(), name):
            raise StateDictError(f"{where}: unusable data name {name!r}")

    @staticmethod
    def _data_in(tensors: dict[str, Any], name: str, where: str) -> tuple[torch.Tensor, bool]:
        """The item's tensor in the container dict, and whether it was parametrized."""
        parametrized_key = f"parametrizations.{name}.original"
        if name in tensors:
            data, parametrized = tensors[name], False
        elif parametrized_key in tensors:
            data, parametrized = tensors[parametrized_key], True
        else:
            raise StateDictError(
                f"{where}: '_container' has neither {name!r} nor {parametrized_key!r}"
            )
        if not isinstance(data, torch.Tensor):
            raise StateDictError(f"{where}: expected a tensor, got {type(data).__name__}")
        return data, parametrized

    def __getstate__(self) -> dict[str, Any]:
        """The state_dict format plus the other attributes (``norm``, ``enable_mask_update``);
        a scheduler's ``step`` wrapper is left out."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_container", "state", "step")}
        state.update(self.state_dict())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "_container" not in state:  # the reference's own partial updates
            self.__dict__.update(state)
            return
        loadable = {key: state.pop(key) for key in ("state", "data_groups", "_container")}
        self.__dict__.update(state)
        self._container = _Container()
        self.state = defaultdict(dict)
        self.data_groups = {}
        self._load(loadable, strict=True, clone=False)

    def __repr__(self) -> str:
        lines = [self.__class__.__name__ + " ("]
        for name, config in self.data_groups.items():
            lines += ["\tData Group", f"\t    name: {name}"]
            lines += [f"\t    {k}: {config[k]}" for k in sorted(config) if k != "data"]
        return "\n".join(lines) + "\n)"
