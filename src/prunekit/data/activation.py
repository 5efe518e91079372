"""``ActivationSparsifier``: masks for the inputs of chosen layers, learnt from the
activations that flow through them.

Same names, arguments and ``data_groups``/``state`` layout as the reference's
``activation_sparsifier``: ``mask = mask_fn(reduce_fn(aggregate(inputs)), **sparse_config)``
per layer (per feature if ``features``), then ``squash_mask`` attaches a pre-hook that
multiplies the input by the mask. Fixes: hooks are plain objects, so the sparsifier
pickles; the sparsify hook never writes into the caller's input and keeps the layer's
other arguments; ``step()`` without a new forward keeps the masks; batches of varying
size aggregate (zero-padded along dim 0); aggregation does not record autograd history.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.data.base import DataNameError
from prunekit.errors import ConfigError, ConfigTypeError, FqnError, StateDictError, StateError
from prunekit.fqn import fqn_to_module, module_to_fqn

__all__ = ["ActivationSparsifier"]

_FN_KEYS = ("aggregate_fn", "reduce_fn", "mask_fn")
_HOOK_STATES = ("aggregate", "sparsify", "None")


class _LayerHook:
    """Forward pre-hook of one registered layer (an object, not a closure: it pickles)."""

    def __init__(self, sparsifier: ActivationSparsifier, name: str, kind: str) -> None:
        self.sparsifier, self.name, self.kind = sparsifier, name, kind

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.kind == "aggregate":
            self.sparsifier._aggregate(self.name, args)
            return None
        return self.sparsifier._sparsify(self.name, args)


def _first_tensor(name: str, args: tuple[Any, ...]) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        got = type(args[0]).__name__ if args else "no positional argument"
        raise ConfigTypeError(
            f"ActivationSparsifier layer {name!r}: first input must be a tensor, got {got}"
        )
    return args[0]


def _pad_batch(t: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``t`` along dim 0 to ``size`` rows."""
    if t.shape[0] == size:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, size - t.shape[0]))


def _aggregate_one(name: str, fn: Callable, old: torch.Tensor | None, new: torch.Tensor) -> Any:
    """``fn(old, new)`` starting from zeros; batches of different sizes are zero-padded."""
    if old is None:
        return fn(torch.zeros_like(new), new)
    if old.shape != new.shape:
        if old.dim() != new.dim() or old.dim() == 0 or old.shape[1:] != new.shape[1:]:
            raise ConfigError(
                f"ActivationSparsifier layer {name!r}: input of shape {tuple(new.shape)} cannot be "
                f"aggregated with earlier inputs of shape {tuple(old.shape)}; only the batch "
                "dimension (0) may vary"
            )
        size = max(old.shape[0], new.shape[0])
        old, new = _pad_batch(old, size), _pad_batch(new, size)
    return fn(old, new)


def _to_dense(mask: Any) -> Any:
    if isinstance(mask, list):
        return [_to_dense(m) for m in mask]
    if isinstance(mask, torch.Tensor) and mask.layout != torch.strided:
        return mask.to_dense()
    return mask


def _to_coo(mask: Any) -> Any:
    if isinstance(mask, list):
        return [_to_coo(m) for m in mask]
    return mask.to_sparse_coo() if isinstance(mask, torch.Tensor) else mask


class ActivationSparsifier:
    """Learn per-layer input masks from activations, then apply them with a pre-hook.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> s = ActivationSparsifier(
    ...     model, aggregate_fn=torch.add, reduce_fn=lambda x: x.abs().sum(0),
    ...     mask_fn=lambda x, threshold: (x > threshold).float(), threshold=0.0)
    >>> s.register_layer(model[0])
    >>> _ = model(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    >>> s.step()
    >>> s.get_mask("0").tolist()
    [1.0, 0.0, 1.0, 0.0]
    """

    def __init__(
        self,
        model: nn.Module,
        aggregate_fn: Callable | None = None,
        reduce_fn: Callable | None = None,
        mask_fn: Callable | None = None,
        features: list[int] | None = None,
        feature_dim: int | None = None,
        **sparse_config: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                f"ActivationSparsifier: model must be an nn.Module, got {type(model).__name__}"
            )
        self.model = model
        self.defaults: dict[str, Any] = {
            "sparse_config": sparse_config,
            "aggregate_fn": aggregate_fn,
            "reduce_fn": reduce_fn,
            "mask_fn": mask_fn,
            "features": features,
            "feature_dim": feature_dim,
        }
        self.data_groups: dict[str, dict[str, Any]] = {}
        self.state: dict[str, dict[str, Any]] = defaultdict(dict)

    # -- registration ----------------------------------------------------------------------
    @staticmethod
    def _check_args(name: str, args: dict[str, Any]) -> None:
        where = f"ActivationSparsifier layer {name!r}"
        features, feature_dim = args.get("features"), args.get("feature_dim")
        if features is not None:
            ints = isinstance(features, (list, tuple)) and all(
                isinstance(f, int) and not isinstance(f, bool) for f in features
            )
            if not ints:
                raise ConfigTypeError(f"{where}: features must be a list of ints, got {features!r}")
            if feature_dim is None:
                raise ConfigError(
                    f"{where}: features {list(features)} need a feature_dim to select them"
                )
        if feature_dim is not None and (
            isinstance(feature_dim, bool) or not isinstance(feature_dim, int)
        ):
            raise ConfigTypeError(f"{where}: feature_dim must be an int, got {feature_dim!r}")
        for key in _FN_KEYS:
            if not callable(args.get(key)):
                raise ConfigTypeError(f"{where}: {key} must be callable, got {args.get(key)!r}")
        if not isinstance(args.get("sparse_config"), dict):
            raise ConfigTypeError(
                f"{where}: sparse_config must be a dict, got {args.get('sparse_config')!r}"
            )

    def _name_of(self, layer: Any, action: str) -> str:
        name = module_to_fqn(self.model, layer) if isinstance(layer, nn.Module) else None
        if name is None:
            raise FqnError(f"{action}: {type(layer).__name__} is not a submodule of the model")
        return name

    def register_layer(
        self,
        layer: nn.Module,
        aggregate_fn: Callable | None = None,
        reduce_fn: Callable | None = None,
        mask_fn: Callable | None = None,
        features: list[int] | None = None,
        feature_dim: int | None = None,
        **sparse_config: Any,
    ) -> None:
        """Start aggregating the inputs of ``layer``; arguments left None use the defaults,
        ``sparse_config`` is merged into the default one. Re-registering warns and replaces."""
        name = self._name_of(layer, "register_layer")
        args = copy.deepcopy(self.defaults)
        given = {
            "aggregate_fn": aggregate_fn,
            "reduce_fn": reduce_fn,
            "mask_fn": mask_fn,
            "features": features,
            "feature_dim": feature_dim,
        }
        args.update((k, v) for k, v in given.items() if v is not None)
        args["sparse_config"] = {**(args["sparse_config"] or {}), **sparse_config}
        self._check_args(name, args)
        if name in self.data_groups:
            warnings.warn(
                f"register_layer: layer {name!r} already attached to the sparsifier, deregistering "
                "the layer and registering with new config",
                stacklevel=2,
            )
            self.unregister_layer(name)
        args["layer"] = layer
        args["hook"] = layer.register_forward_pre_hook(_LayerHook(self, name, "aggregate"))
        args["hook_state"] = "aggregate"
        self.data_groups[name] = args
        self.state[name]["mask"] = None

    def unregister_layer(self, name: str) -> None:
        """Detach the sparsifier from layer ``name`` (removing its hook)."""
        if name not in self.data_groups:
            raise DataNameError(
                f"unregister_layer: no layer named {name!r}; registered: {sorted(self.data_groups)}"
            )
        hook = self.data_groups.pop(name).get("hook")
        if hook is not None:
            hook.remove()
        self.state.pop(name, None)

    def get_mask(self, name: str | None = None, layer: nn.Module | None = None) -> Any:
        """The mask of a layer (by fqn or module): a tensor, or a list with one per feature."""
        if name is None and layer is None:
            raise ConfigError("get_mask: pass the layer's name or the layer itself")
        if name is None:
            name = self._name_of(layer, "get_mask")
        if name not in self.state:
            raise DataNameError(
                f"get_mask: no layer named {name!r}; registered: {sorted(self.state)}"
            )
        mask = self.state[name].get("mask")
        if mask is None:
            raise StateError(
                f"get_mask({name!r}): shape unknown; run the model at least once to infer the mask"
            )
        return mask

    # -- hooks -------------------------------------------------------------------------------
    def _aggregate(self, name: str, args: tuple[Any, ...]) -> None:
        """Fold this forward's input into the layer's aggregate (one per feature)."""
        config = self.data_groups[name]
        x = _first_tensor(name, args).detach()
        features, agg = config["features"], config["aggregate_fn"]
        with torch.no_grad():
            if features is None:
                data = _aggregate_one(name, agg, config.get("data"), x)
                first_mask: Any = torch.ones_like(x)
            else:
                old = config.get("data") or [None] * len(features)
                parts = [self._feature(x, config, f) for f in features]
                data = [_aggregate_one(name, agg, o, p) for o, p in zip(old, parts, strict=True)]
                first_mask = [torch.ones_like(p) for p in parts]
        config["data"] = data
        if self.state[name].get("mask") is None:
            self.state[name]["mask"] = first_mask

    @staticmethod
    def _feature(x: torch.Tensor, config: dict[str, Any], feature: int) -> torch.Tensor:
        index = torch.tensor([feature], device=x.device)
        return x.index_select(config["feature_dim"], index)

    def _sparsify(self, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The input times the mask, as a new tensor; other arguments pass through."""
        config = self.data_groups[name]
        x, mask = _first_tensor(name, args), self.state[name]["mask"]
        features = config["features"]
        if features is None:
            return (x * mask, *args[1:])
        out = x.clone()
        for feature, feature_mask in zip(features, mask, strict=True):
            index = torch.tensor([feature], device=x.device)
            part = x.index_select(config["feature_dim"], index) * feature_mask
            out.index_copy_(config["feature_dim"], index, part.to(out.dtype))
        return (out, *args[1:])

    # -- step and squash ---------------------------------------------------------------------
    def step(self) -> None:
        """Compute every layer's mask from the inputs aggregated since the last step; a layer
        that saw no forward since then keeps its mask (with a warning)."""
        idle = [name for name, config in self.data_groups.items() if "data" not in config]
        if idle:
            warnings.warn(
                f"ActivationSparsifier.step: no forward through layer(s) {idle} since the last "
                "step; their masks are kept",
                stacklevel=2,
            )
        with torch.no_grad():
            for name, config in self.data_groups.items():
                if name not in idle:
                    self.update_mask(name, config["data"], config)
                    config.pop("data")

    def update_mask(self, name: str, data: Any, configs: dict[str, Any]) -> None:
        """``mask = mask_fn(reduce_fn(data), **sparse_config)``, per feature if any; the mask
        object keeps its identity."""
        mask = self.get_mask(name)
        reduce_fn, mask_fn, sparse_config = (
            configs["reduce_fn"],
            configs["mask_fn"],
            configs["sparse_config"],
        )
        if configs["features"] is None:
            mask.data = mask_fn(reduce_fn(data), **sparse_config)
            return
        for i, feature_data in enumerate(data):
            mask[i].data = mask_fn(reduce_fn(feature_data), **sparse_config)

    def squash_mask(self, attach_sparsify_hook: bool = True, **kwargs: Any) -> None:
        """Remove the aggregation hooks and, if asked, attach hooks that apply the masks."""
        if attach_sparsify_hook:
            unknown = [n for n in self.data_groups if self.state[n].get("mask") is None]
            if unknown:
                raise StateError(
                    f"squash_mask: layer(s) {unknown} have no mask yet; run the model (and step) "
                    "first, or pass attach_sparsify_hook=False"
                )
        for name, config in self.data_groups.items():
            hook = config.pop("hook", None)
            if hook is not None:
                hook.remove()
            config["hook_state"] = "None"
            if attach_sparsify_hook:
                config["hook"] = config["layer"].register_forward_pre_hook(
                    _LayerHook(self, name, "sparsify")
                )
                config["hook_state"] = "sparsify"

    # -- state_dict ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"state": masks as sparse COO, "data_groups": configs without hook/layer,
        "defaults"}`` as in the reference, as copies."""
        groups = {
            name: {k: copy.deepcopy(v) for k, v in config.items() if k not in ("hook", "layer")}
            for name, config in self.data_groups.items()
        }
        state = {name: {"mask": _to_coo(entry.get("mask"))} for name, entry in self.state.items()}
        return {"state": state, "data_groups": groups, "defaults": copy.deepcopy(self.defaults)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore masks and configs, find the layers by fqn in ``self.model`` and attach the
        hook each ``hook_state`` names; current hooks are removed. Checked before any change."""
        layers = self._layers_to_load(state_dict)
        for config in self.data_groups.values():
            if config.get("hook") is not None:
                config["hook"].remove()
        self.defaults = copy.deepcopy(state_dict["defaults"])
        self.state = defaultdict(dict)
        self.data_groups = {}
        for name, config in state_dict["data_groups"].items():
            config = copy.deepcopy(config)
            self.state[name]["mask"] = _to_dense(
                copy.deepcopy(state_dict["state"][name].get("mask"))
            )
            config["layer"] = layers[name]
            if config["hook_state"] in ("aggregate", "sparsify"):
                hook = _LayerHook(self, name, config["hook_state"])
                config["hook"] = layers[name].register_forward_pre_hook(hook)
            self.data_groups[name] = config

    def _layers_to_load(self, state_dict: Any) -> dict[str, nn.Module]:
        for key in ("state", "data_groups", "defaults"):
            if not isinstance(state_dict, dict) or key not in state_dict:
                raise StateDictError(f"load_state_dict: missing key {key!r}")
        layers = {}
        for name, config in state_dict["data_groups"].items():
            where = f"load_state_dict: layer {name!r}"
            layer = fqn_to_module(self.model, name) if isinstance(name, str) else None
            if not isinstance(layer, nn.Module):
                raise StateDictError(f"{where} is not a submodule of the model")
            if name not in state_dict["state"]:
                raise StateDictError(f"{where} has no entry in 'state'")
            hook_state = config.get("hook_state", "None")
            if hook_state not in _HOOK_STATES:
                raise StateDictError(
                    f"{where}: hook_state must be one of {_HOOK_STATES}, got {hook_state!r}"
                )
            if hook_state == "sparsify" and state_dict["state"][name].get("mask") is None:
                raise StateDictError(f"{where}: hook_state 'sparsify' needs a mask")
            self._check_args(name, config)
            layers[name] = layer
        return layers

    def __repr__(self) -> str:
        lines = [self.__class__.__name__ + " ("]
        skip = ("data", "hook", *_FN_KEYS)
        for name, config in self.data_groups.items():
            lines += ["\tData Group", f"\t    name: {name}"]
            lines += [f"\t    {k}: {config[k]}" for k in sorted(config) if k not in skip]
        return "\n".join(lines) + "\n)"
