"""Pickle-free checkpoints: ``save(model, path)`` / ``load(factory_or_model, path)``.

A checkpoint is a folder with ``weights.safetensors`` (every tensor of the state_dict,
tied tensors stored once) and ``structure.json``: for every module its class, its plain
attributes (``out_channels``, ``num_features``, ``normalized_shape``, ...) and the shape
and dtype of each of its own parameters and buffers, plus any structured-pruning plans
recorded on the model. ``load`` builds the original architecture, replays every
difference (shrunk tensors, changed attributes) and loads the weights, so the result
computes bit-identical outputs. Nothing is ever unpickled.

>>> import prunekit, tempfile, torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> path = tempfile.mkdtemp() + "/ckpt"
>>> prunekit.save(model, path)
>>> prunekit.load(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)), path)[0].out_features
3
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import ConfigError, ConfigTypeError, StateDictError, StateError

__all__ = [
    "FORMAT", "describe", "load", "read_structure", "record_plan", "replace_dir", "save",
    "write_checkpoint",
]

FORMAT = "prunekit-checkpoint/1"
WEIGHTS = "weights.safetensors"
STRUCTURE = "structure.json"
PLANS_ATTR = "_prunekit_plans"  # structured plans (JSON descriptions) recorded on a model
_SKIP_ATTRS = {"training"}
_log = logging.getLogger(__name__)

def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_is_plain(v) for v in value)


def _module_record(module: nn.Module) -> dict[str, Any]:
    """Class, plain attributes and own tensor shapes of one module."""
    attrs = {
        k: v for k, v in vars(module).items()
        if not k.startswith("_") and k not in _SKIP_ATTRS and _is_plain(v)
    }
    tensors = {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
               "kind": "parameter" if name in module._parameters else "buffer"}
        for name, t in [*module._parameters.items(), *module._buffers.items()]
        if t is not None
    }
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "attrs": attrs, "tensors": tensors}


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON-serialisable structure of ``model`` that ``load`` replays."""
    return {
        "format": FORMAT,
        "modules": {fqn: _module_record(m) for fqn, m in model.named_modules()},
        "plans": list(getattr(model, PLANS_ATTR, [])),
    }


def record_plan(model: nn.Module, description: dict[str, Any]) -> None:
    """Keep an applied structured plan's JSON description with the model (saved by ``save``)."""
    try:
        json.dumps(description)
    except (TypeError, ValueError) as exc:
        raise ConfigTypeError(
            f"record_plan: the description is not JSON-serialisable: {exc}") from None
    setattr(model, PLANS_ATTR, [*getattr(model, PLANS_ATTR, []), description])


def _check_saveable(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"save: model must be a torch.nn.Module, got {type(model).__name__}")
    for fqn, module in model.named_modules():
        if parametrize.is_parametrized(module):
            names = ", ".join(module.parametrizations.keys())
            raise StateError(
                f"save: module '{fqn}' still has parametrizations on {names}; call "
                "sparsifier.squash_mask() (or remove the parametrizations) before saving"
            )


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once: safetensors refuses tensors that share memory."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensor = tensor.detach().cpu().contiguous()
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        unique[key] = tensor if whole else tensor.clone()  # a view: own its memory
    return unique, aliases


def save(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``model`` to the folder ``path`` (weights + structure), atomically.

    Refuses a model that still carries sparsity parametrizations (squash them first) and
    an existing ``path`` unless ``overwrite``.
    """
    _check_saveable(model)
    target = Path(path)
    if target.exists() and not overwrite:
        raise ConfigError(f"save: '{target}' already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_checkpoint(model, staging)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_checkpoint(model: nn.Module, folder: Path) -> None:
    """Write the two checkpoint files into the existing ``folder`` (not atomic: ``save``
    and ``prunekit prune`` call it on a staging folder they rename when done)."""
    _check_saveable(model)
    tensors, aliases = _dedupe(model.state_dict())
    structure = describe(model) | {"aliases": aliases}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT})
    (folder / STRUCTURE).write_text(json.dumps(structure, indent=1, sort_keys=True))


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` folder to ``target``, replacing it if it exists."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def read_structure(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``structure.json`` of a checkpoint folder, checked for its format."""
    file = Path(path) / STRUCTURE
    try:
        structure = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"load: '{path}' is not a prunekit checkpoint (no {STRUCTURE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"load: cannot read '{file}': {exc}") from None
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        got = structure.get("format") if isinstance(structure, dict) else type(structure).__name__
        raise ConfigError(f"load: '{file}' has format {got!r}; expected {FORMAT!r}")
    return structure


def _build(factory_or_model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(factory_or_model, nn.Module):
        return factory_or_model
    if not callable(factory_or_model):
        raise ConfigTypeError(
            "load: expected an nn.Module or a callable that builds one, got "
            f"{type(factory_or_model).__name__}"
        )
    model = factory_or_model()
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(
            f"load: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _same(fresh: Any, saved: Any) -> bool:
    return json.loads(json.dumps(fresh)) == saved


def _module_changes(fqn: str, module: nn.Module, record: dict) -> list[tuple]:
    """The (kind, module, name, value) edits that turn ``module`` into ``record``."""
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" != record["class"]:
        raise StateDictError(
            f"load: module '{fqn}' is {cls.__qualname__} in the fresh model but "
            f"{record['class']} in the checkpoint; module swaps cannot be replayed"
        )
    edits: list[tuple] = []
    for name, value in record["attrs"].items():
        current = getattr(module, name, None)
        if not _same(current, value):
            new = tuple(value) if isinstance(current, tuple) else value
            edits.append(("attr", module, name, new))
    for name, spec in record["tensors"].items():
        current = getattr(module, name, None)
        if not isinstance(current, torch.Tensor) or list(current.shape) != spec["shape"]:
            edits.append(("tensor", module, name, spec))
    return edits


def _plan_changes(model: nn.Module, structure: dict) -> list[tuple]:
    """Every edit of every module, computed before anything changes."""
    modules = dict(model.named_modules())
    missing = sorted(set(structure["modules"]) - set(modules))
    if missing:
        raise StateDictError(
            f"load: the checkpoint has modules {missing[:5]} that the fresh model lacks; "
            "was it built by the same factory?"
        )
    edits: list[tuple] = []
    for fqn, record in structure["modules"].items():
        edits += _module_changes(fqn, modules[fqn], record)
    return edits


def _apply(edit: tuple) -> None:
    kind, module, name, value = edit
    if kind == "attr":
        setattr(module, name, value)
        return
    dtype = getattr(torch, value["dtype"])
    old = getattr(module, name, None)
    device = old.device if isinstance(old, torch.Tensor) else torch.device("cpu")
    tensor = torch.empty(value["shape"], dtype=dtype, device=device)
    if value["kind"] == "parameter":
        module._parameters[name] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    else:
        module._buffers[name] = tensor


def _read_weights(path: Path, aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise ConfigError(f"load: cannot read '{path / WEIGHTS}': {exc}") from None
    for alias, key in aliases.items():
        tensors[alias] = tensors[key]
    return tensors


def _replay_plans(model: nn.Module, plans: list[dict[str, Any]]) -> int:
    """Apply recorded structured plans with the engine that made them (each plan checks
    every shape before it slices). Without the engine, the per-module diff that follows
    rebuilds the same shapes, so the plans are only kept as a record."""
    try:
        from prunekit.structured.engine import ConfigNotUpdatedWarning, PrunePlan
        from prunekit.structured.engine.plan import FORMAT as PLAN_FORMAT
    except ImportError:
        return 0
    ours = [p for p in plans if isinstance(p, dict) and p.get("format") == PLAN_FORMAT]
    with warnings.catch_warnings():  # its advice (replay the plan) is what this does
        warnings.simplefilter("ignore", ConfigNotUpdatedWarning)
        for plan in ours:
            PrunePlan.from_dict(model, plan).apply()
    return len(ours)


def _check_weights(model: nn.Module, structure: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Keys must match the model's state_dict and shapes the recorded structure."""
    keys = set(model.state_dict())
    if keys != set(tensors):
        raise StateDictError(
            f"load: weights do not fit the model: missing {sorted(keys - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - keys)[:5]}"
        )
    for fqn, record in structure["modules"].items():
        for name, spec in record["tensors"].items():
            key = f"{fqn}.{name}" if fqn else name
            if key in tensors and list(tensors[key].shape) != spec["shape"]:
                raise StateDictError(
                    f"load: tensor '{key}' has shape {list(tensors[key].shape)} in the weights "
                    f"but {spec['shape']} in {STRUCTURE}; the checkpoint is inconsistent"
                )


def load(
    factory_or_model: nn.Module | Callable[[], nn.Module], path: str | os.PathLike
) -> nn.Module:
    """Rebuild a saved model: build it (or take ``factory_or_model`` as built), replay the
    recorded structural changes, load the weights (strict); returns the model."""
    structure = read_structure(path)
    tensors = _read_weights(Path(path), structure.get("aliases", {}))
    model = _build(factory_or_model)
    _plan_changes(model, structure)  # raises on a foreign architecture, before any change
    _check_weights(model, structure, tensors)
    replayed = _replay_plans(model, structure.get("plans", []))
    edits = _plan_changes(model, structure)
    for edit in edits:
        _apply(edit)
    _log.info("load: replayed %d structured plans and %d other changes", replayed, len(edits))
    model.load_state_dict(tensors, strict=True)
    if structure.get("plans"):
        setattr(model, PLANS_ATTR, list(structure["plans"]))
    return model
