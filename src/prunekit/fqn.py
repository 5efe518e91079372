"""Fully qualified names (fqns): the dotted paths that address modules and tensors.

``module_to_fqn``, ``fqn_to_module`` and ``get_arg_info_from_tensor_fqn`` behave like
their ``torch.ao.pruning`` namesakes (lenient: ``None`` when a path does not resolve).
``resolve_tensor_fqn`` is the strict form the sparsifiers use: it names the part of
the path that failed and suggests the nearest existing names.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from prunekit.errors import ConfigTypeError, FqnError

__all__ = [
    "fqn_to_module",
    "get_arg_info_from_tensor_fqn",
    "module_to_fqn",
    "resolve_tensor_fqn",
]


def module_to_fqn(model: nn.Module, module: nn.Module, prefix: str = "") -> str | None:
    """Return the dotted path of ``module`` inside ``model`` ("" for the model itself).

    Modules are compared by identity; ``None`` means ``module`` is not in ``model``.
    """
    if module is model:
        return ""
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return prefix + name
    return None


def fqn_to_module(model: Any, path: str) -> Any:
    """Follow ``path`` attribute by attribute from ``model``; ``None`` at the first miss.

    Resolves modules, parameters and buffers alike; ``""`` returns ``model``.
    """
    if path == "":
        return model
    for name in path.split("."):
        model = getattr(model, name, None)
    return model


def get_arg_info_from_tensor_fqn(model: nn.Module, tensor_fqn: str) -> dict[str, Any]:
    """Split ``tensor_fqn`` into its module path and tensor name, and look the module up.

    Returns ``{"module_fqn", "module", "tensor_name", "tensor_fqn"}``; ``module`` is
    ``None`` when the path does not resolve.
    """
    tensor_name = tensor_fqn.split(".")[-1]
    module_fqn = tensor_fqn[: -len(tensor_name) - ("." in tensor_fqn)]
    return {
        "module_fqn": module_fqn,
        "module": fqn_to_module(model, module_fqn),
        "tensor_name": tensor_name,
        "tensor_fqn": tensor_fqn,
    }


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    shown = ", ".join(repr(c) for c in choices[:8]) + (", ..." if len(choices) > 8 else "")
    return f"it has: {shown or 'nothing'}"


def resolve_tensor_fqn(model: nn.Module, tensor_fqn: Any) -> dict[str, Any]:
    """Strict ``get_arg_info_from_tensor_fqn``: raise ``FqnError`` if any part is missing.

    A leading "." is tolerated, as in the reference's config checks.
    """
    if not isinstance(tensor_fqn, str):
        raise ConfigTypeError(
            f"tensor_fqn must be a str such as 'layer.weight', got {type(tensor_fqn).__name__} "
            f"{tensor_fqn!r}"
        )
    path = tensor_fqn[1:] if tensor_fqn.startswith(".") else tensor_fqn
    info = get_arg_info_from_tensor_fqn(model, path)
    module: Any = model
    walked = []
    for part in info["module_fqn"].split(".") if info["module_fqn"] else []:
        children = dict(module.named_children()) if isinstance(module, nn.Module) else {}
        if part not in children:
            where = ".".join(walked) or "the model"
            raise FqnError(
                f"tensor_fqn {tensor_fqn!r}: {where!r} has no submodule {part!r}; "
                f"{_suggest(part, list(children))}"
            )
        module = children[part]
        walked.append(part)
    name = info["tensor_name"]
    tensors = [n for n, _ in module.named_parameters(recurse=False)]
    tensors += [n for n, _ in module.named_buffers(recurse=False)]
    if hasattr(module, "parametrizations"):
        tensors += list(module.parametrizations.keys())
    if name not in tensors:
        where = info["module_fqn"] or "the model"
        raise FqnError(
            f"tensor_fqn {tensor_fqn!r}: module {where!r} ({type(module).__name__}) has no "
            f"parameter or buffer {name!r}; {_suggest(name, sorted(set(tensors)))}"
        )
    info["module"] = module
    return info
