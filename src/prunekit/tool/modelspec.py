"""Turn the command line's MODEL into a model: ``package.module:factory`` (plus optional
``--weights file.safetensors``) or a ``torch.export`` ``.pt2`` file.

Files are read without pickle: weights through safetensors, programs through
``torch.export.load``. Every user mistake becomes a one-line ``ConfigError``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError

__all__ = ["LoadedModel", "load_model", "resolve_factory"]


@dataclass
class LoadedModel:
    """A model with how to build it again and the example inputs it carries, if any."""

    model: nn.Module
    factory: Callable[[], nn.Module]
    example_inputs: tuple | None
    exported: bool


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:attr`` → the callable it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model '{spec}': expected package.module:factory or a .pt2 file")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model '{spec}': cannot import module '{module_name}' ({exc})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model '{spec}': module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigTypeError(f"model '{spec}': '{attr}' is {type(target).__name__}, not callable")
    return target


def _call_factory(spec: str, factory: Callable[[], Any]) -> nn.Module:
    try:
        model = factory()
    except TypeError as exc:
        raise ConfigError(f"model '{spec}': calling the factory failed ({exc})") from None
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model '{spec}': the factory returned {type(model).__name__}, "
                              "expected a torch.nn.Module")
    return model


def _load_weights(model: nn.Module, weights: str) -> None:
    try:
        state = load_file(weights)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise ConfigError(f"weights '{weights}': cannot read a safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0].rstrip(":")
        raise ConfigError(f"weights '{weights}': do not fit the model ({first})") from None


def _load_exported(path: str) -> LoadedModel:
    if not Path(path).is_file():
        raise ConfigError(f"model '{path}': no such file")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)  # torch logs a traceback before it raises
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch.export raises many types for a bad archive
        raise ConfigError(f"model '{path}': not a torch.export program ({type(exc).__name__})") \
            from None
    finally:
        export_log.setLevel(level)
    args, kwargs = program.example_inputs or ((), {})

    def factory() -> nn.Module:
        return torch.export.load(path).module()

    return LoadedModel(program.module(), factory, tuple(args) if not kwargs else None, True)


def load_model(spec: str, weights: str | None = None) -> LoadedModel:
    """Build the model MODEL names, with ``weights`` loaded when given."""
    if spec.endswith(".pt2"):
        if weights is not None:
            raise ConfigError(
                f"--weights: a .pt2 file carries its own weights; got --weights {weights}")
        return _load_exported(spec)
    factory = resolve_factory(spec)
    model = _call_factory(spec, factory)
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"weights '{weights}': no such file")
        _load_weights(model, weights)
    return LoadedModel(model, lambda: _call_factory(spec, factory), None, False)
