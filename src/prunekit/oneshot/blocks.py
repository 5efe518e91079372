"""Which blocks to run one after another, and which layers of them to prune.

Hugging Face decoder stacks are found by name (``model.layers`` for Llama, Gemma,
Mistral, Qwen; ``model.decoder.layers`` for OPT; ``transformer.h`` for GPT-2;
``gpt_neox.layers``; ...), or else as the largest ``nn.ModuleList`` of same-typed blocks
holding Linear layers (``nn.Linear``, or transformers' ``Conv1D`` as in GPT-2). A plain
module names its stack with ``blocks="fqn"`` or is calibrated as one block.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.experts import expand_parallel, routing_gates
from prunekit.fqn import fqn_to_module, resolve_tensor_fqn
from prunekit.linear_like import LAYER_KINDS, is_linear_like

__all__ = ["find_decoder_stack", "resolve_blocks", "resolve_layers"]

_KNOWN_STACKS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.blocks",
    "gpt_neox.layers",
)

Blocks = list[tuple[str, nn.Module]]


def _is_stack(module: Any) -> bool:
    """A non-empty ``ModuleList``/``Sequential`` of same-typed blocks holding Linears."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    if len({type(child) for child in module}) != 1:
        return False
    return any(is_linear_like(m) for m in module[0].modules())


def find_decoder_stack(model: nn.Module) -> str:
    """The fqn of the stack of transformer blocks of a Hugging Face causal LM."""
    for fqn in _KNOWN_STACKS:
        if _is_stack(fqn_to_module(model, fqn)):
            return fqn
    sizes = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in model.named_modules()
        if name and isinstance(module, nn.ModuleList) and _is_stack(module)
    }
    if not sizes:
        raise ConfigError(
            f"{type(model).__name__}: no stack of transformer blocks found (an nn.ModuleList of "
            f"same-typed blocks with {LAYER_KINDS} layers); pass blocks='<fqn of the stack>' "
            "or blocks=None to calibrate the whole model at once"
        )
    return max(sizes, key=sizes.__getitem__)


def resolve_blocks(model: nn.Module, blocks: str | None) -> Blocks:
    """``[(fqn, block), ...]`` in execution order.

    ``"auto"``: the decoder stack of a Hugging Face model (one with a ``config``), the
    whole model otherwise; ``None``: the whole model as one block; a fqn: the children
    of that ``ModuleList``/``Sequential``, each one's output being the next one's input.
    """
    if blocks is not None and not isinstance(blocks, str):
        raise ConfigTypeError(
            f"blocks must be 'auto', None or the fqn of a ModuleList, got {blocks!r}"
        )
    if blocks is None or (blocks == "auto" and not hasattr(model, "config")):
        return [("", model)]
    fqn = find_decoder_stack(model) if blocks == "auto" else blocks
    stack = fqn_to_module(model, fqn)
    if stack is None:
        raise FqnError(f"blocks={fqn!r}: no such module in {type(model).__name__}")
    if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) == 0:
        raise ConfigError(
            f"blocks={fqn!r} is a {type(stack).__name__}; expected a non-empty ModuleList or "
            "Sequential of blocks"
        )
    prefix = f"{fqn}." if fqn else ""
    return [(f"{prefix}{name}", child) for name, child in stack.named_children()]


def _owner(name: str, blocks: Blocks) -> str | None:
    for fqn, _ in blocks:
        if fqn == "" or name == fqn or name.startswith(fqn + "."):
            return fqn
    return None


def _linears(fqn: str, block: nn.Module) -> list[str]:
    """The Linear-like layers of a block, the block itself included when it is one,
    but not the gates routing tokens among experts (``routing_gates``)."""
    prefix = f"{fqn}." if fqn else ""
    gates = routing_gates(block)
    return [prefix + n if n else fqn for n, m in block.named_modules()
            if (n or fqn) and is_linear_like(m) and id(m) not in gates]


def resolve_layers(
    model: nn.Module, blocks: Blocks, layers: list[str] | None
) -> dict[str, list[str]]:
    """``{block fqn: [Linear fqns]}``: the named ``layers`` (default: every Linear of
    every block but the gates routing tokens among experts), each checked to exist, to
    be Linear-like and to sit in a block."""
    if layers is None:
        return {fqn: _linears(fqn, block) for fqn, block in blocks}
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise ConfigTypeError(f"layers must be a list of module fqns, got {layers!r}")
    found: dict[str, list[str]] = {fqn: [] for fqn, _ in blocks}
    for name in expand_parallel(model, layers):
        module = resolve_tensor_fqn(model, f"{name}.weight")["module"]
        if not is_linear_like(module):
            raise ConfigError(f"layers: {name!r} is a {type(module).__name__}; expected "
                              f"{LAYER_KINDS}")
        owner = _owner(name, blocks)
        if owner is None:
            raise ConfigError(
                f"layers: {name!r} lies outside the blocks {[f for f, _ in blocks][:3]}...; "
                "only layers inside a block see calibration inputs"
            )
        found[owner].append(name)
    return found
