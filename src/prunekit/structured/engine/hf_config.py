"""Keep a ``transformers`` model's config true to its shrunk widths, so that
``save_pretrained`` and ``from_pretrained`` rebuild the pruned model.

The new values are solved, not guessed from names: each width field is doubled in a
model built on the meta device (no memory, no weights) to see which tensor dims follow
it and by how much; the shrunk dims then give its value. A last meta build from the new
config must reproduce every tensor's shape and every float constant of every module
(Gemma scales embeddings by ``sqrt(hidden_size)``, set when it is built); otherwise
the config is left as it was and a warning says what it cannot describe (layers of
different widths, heads narrower than ``hidden_size / num_attention_heads``...).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["ConfigNotUpdatedWarning", "fit_config"]

# Fields that set tensor widths, under transformers' canonical names or the names some
# configs keep (GPT-2's ``n_inner``, T5's ``d_ff``); ``attribute_map`` resolves aliases.
WIDTH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_inner",
    "d_ff",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)

Widths = dict[str, tuple[int, ...]]


class ConfigNotUpdatedWarning(UserWarning):
    """``apply()`` shrank a transformers model that no config can describe."""


def fit_config(
    model: nn.Module, attributes: Iterable[tuple[str, str]] = ()
) -> dict[str, tuple[int, int]]:
    """Write the shrunk widths into ``model.config`` (in place, so a parent model sharing
    it sees them too) and return ``{field: (old, new)}``; ``{}`` when the model has no
    transformers config or its config already fits. ``attributes`` (owner, name) are
    integer module attributes the pruning changed (head counts): a rebuilt model must
    have them too, and they tell head counts apart where shapes cannot (GPT-2 derives
    its head width from ``n_embd / n_head``). Never raises: when no config rebuilds the
    model, it warns and leaves the config unchanged."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_dict", None)) or not hasattr(type(model), "_from_config"):
        return {}
    attributes = tuple(attributes)
    target = _widths(model, attributes)
    updates: dict[str, int] = {}
    built = _meta_build(model, config, updates)
    if built is None:
        _warn(model, f"{type(model).__name__} could not be built from its config")
        return {}
    if _mismatch(built, model, target, attributes) is None:
        return {}
    for name in WIDTH_FIELDS:
        value = getattr(config, name, None)
        if type(value) is not int or value < 1:
            continue
        new = _solve(model, config, updates, name, _widths(built, attributes), target,
                     attributes)  # fmt: skip
        rebuilt = None if new is None else _meta_build(model, config, {**updates, name: new})
        if rebuilt is not None:
            built, updates[name] = rebuilt, new
    problem = _mismatch(built, model, target, attributes)
    if problem is not None:
        _warn(model, problem)
        return {}
    changes = {name: (getattr(config, name), new) for name, new in updates.items()}
    for name, new in updates.items():
        setattr(config, name, new)
    return changes


def _meta_build(model: nn.Module, config: Any, updates: dict[str, int]) -> nn.Module | None:
    """The model's class built on the meta device from a copy of ``config`` with
    ``updates``, or None if the config or the class refuses them (transformers raises
    what each model checks: widths that do not divide into heads, ...)."""
    try:
        candidate = copy.deepcopy(config)
        for name, value in updates.items():
            setattr(candidate, name, value)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)._from_config(candidate)
    except Exception:  # any refusal means this config cannot be used
        return None


def _widths(model: nn.Module, attributes: tuple[tuple[str, str], ...]) -> Widths:
    """Every tensor's shape, and the value of each named integer attribute."""
    tensors = itertools.chain(
        model.named_parameters(remove_duplicate=False),
        model.named_buffers(remove_duplicate=False),
    )
    widths = {name: tuple(t.shape) for name, t in tensors}
    modules = dict(model.named_modules())
    for owner, name in attributes:
        value = getattr(modules.get(owner), name, None)
        widths[f"{owner}.{name}" if owner else name] = (value,) if type(value) is int else ()
    return widths


def _float_constants(model: nn.Module) -> dict[str, float]:
    return {
        f"{name}.{attr}": value
        for name, module in model.named_modules()
        for attr, value in vars(module).items()
        if type(value) is float
    }


def _solve(
    model: nn.Module, config: Any, updates: dict[str, int], name: str, base: Widths,
    target: Widths, attributes: tuple[tuple[str, str], ...],
) -> int | None:  # fmt: skip
    """The new value of field ``name`` if every width that follows it agrees on one.
    Doubling the field (on top of the ``updates`` so far) shows which widths follow it;
    they are linear in it, ``w = w0 + (w1 - w0) * (v / v0 - 1)``. Fields are solved one
    after another, so a width two fields share (heads x head width) moves once."""
    value = getattr(config, name)
    doubled = _meta_build(model, config, {**updates, name: 2 * value})
    if doubled is None:
        return None
    estimates = set()
    for key, dims in _widths(doubled, attributes).items():
        if key not in base or key not in target or len(dims) != len(base[key]):
            continue
        for w0, w1, now in zip(base[key], dims, target[key], strict=False):
            if w1 != w0:
                steps, rest = divmod((now - w0) * value, w1 - w0)
                estimates.add(value + steps if rest == 0 else None)
    if len(estimates) != 1 or None in estimates:
        return None
    (new,) = estimates
    return new if new != value and new >= 1 else None


def _mismatch(
    built: nn.Module, model: nn.Module, target: Widths, attributes: tuple[tuple[str, str], ...]
) -> str | None:
    """What a model built from the config gets wrong, or None if nothing."""
    widths = _widths(built, attributes)
    for name in sorted(widths.keys() | target.keys()):
        if widths.get(name) != target.get(name):
            return (
                f"the config gives {name} {widths.get(name)}, the shrunk model has "
                f"{target.get(name)}"
            )
    ours = _float_constants(model)
    for name, value in _float_constants(built).items():
        if name in ours and ours[name] != value:
            return f"a config that fits the shapes would change {name} from {ours[name]} to {value}"
    return None


def _warn(model: nn.Module, problem: str) -> None:
    warnings.warn(
        f"apply: {type(model).__name__}.config cannot describe the shrunk model: {problem}. "
        "(A config holds one width per field for every layer, and some models derive widths "
        "from others, as BERT's head width is hidden_size / num_attention_heads.) The config "
        "is left as it was, so from_pretrained will not rebuild this model: save the plan "
        "(plan.to_dict()) and the state_dict, then replay the plan on the original model "
        "with PrunePlan.from_dict before loading the state_dict",
        ConfigNotUpdatedWarning,
        stacklevel=4,
    )
