"""``post_training_sparse_quantize``: sparsify and int8-quantize a model's embeddings.

Same arguments and results as the reference's ``quantization_utils`` function; every
argument is checked (and every data name derived) before the model is touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.data.base import BaseDataSparsifier
from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.fqn import fqn_to_module, module_to_fqn

__all__ = ["post_training_sparse_quantize"]

SUPPORTED_MODULES = {nn.Embedding, nn.EmbeddingBag}


def _all_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Embedding/EmbeddingBag of ``model``, in the reference's (stack) order."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        for child in module.children():
            if type(child) in SUPPORTED_MODULES:
                found.append((module_to_fqn(model, child), child))
            else:
                stack.append(child)
    return found


def _selected(model: nn.Module, select_embeddings: Any) -> list[tuple[str, nn.Module]]:
    if not isinstance(select_embeddings, list):
        raise ConfigTypeError(
            "post_training_sparse_quantize: select_embeddings must be a list of embedding "
            f"modules, got {type(select_embeddings).__name__}"
        )
    chosen = []
    for i, emb in enumerate(select_embeddings):
        if type(emb) not in SUPPORTED_MODULES:
            raise ConfigTypeError(
                f"post_training_sparse_quantize: select_embeddings[{i}] is a "
                f"{type(emb).__name__}; expected nn.Embedding or nn.EmbeddingBag"
            )
        fqn = module_to_fqn(model, emb)
        if fqn is None:
            raise FqnError(
                f"post_training_sparse_quantize: select_embeddings[{i}] is not part of the model"
            )
        chosen.append((fqn, emb))
    return chosen


def _data_names(embeddings: list[tuple[str, nn.Module]]) -> list[str]:
    """Data names are fqns with '.' replaced by '_'; two fqns must not collide."""
    names = [fqn.replace(".", "_") for fqn, _ in embeddings]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(
            f"post_training_sparse_quantize: embeddings {[f for f, _ in embeddings]} map to the "
            f"same data name(s) {clashes} once '.' becomes '_'; rename a module"
        )
    return names


def _quantize(model: nn.Module, embeddings: list[tuple[str, nn.Module]]) -> None:
    for _, emb in embeddings:
        emb.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig
    torch.ao.quantization.prepare(model, inplace=True)
    torch.ao.quantization.convert(model, inplace=True)


def post_training_sparse_quantize(
    model: nn.Module,
    data_sparsifier_class: type[BaseDataSparsifier],
    sparsify_first: bool = True,
    select_embeddings: list[nn.Module] | None = None,
    **sparse_config: Any,
) -> None:
    """Sparsify (with ``data_sparsifier_class(**sparse_config)``) and quantize, in place,
    every embedding of ``model`` or those in ``select_embeddings``.

    ``sparsify_first=False`` quantizes first, then sparsifies the dequantized weights and
    requantizes them with the saved per-channel scales and zero points.

    >>> from prunekit.data import DataNormSparsifier
    >>> model = nn.Sequential(nn.Embedding(10, 8))
    >>> post_training_sparse_quantize(model, DataNormSparsifier, sparsity_level=1.0)
    >>> type(model[0]).__name__, int(model[0].weight().dequantize().count_nonzero())
    ('Embedding', 0)
    """
    if not (
        isinstance(data_sparsifier_class, type)
        and issubclass(data_sparsifier_class, BaseDataSparsifier)
    ):
        raise ConfigTypeError(
            "post_training_sparse_quantize: data_sparsifier_class must be a subclass of "
            f"BaseDataSparsifier, got {data_sparsifier_class!r}"
        )
    if select_embeddings is None:
        embeddings = _all_embeddings(model)
    else:
        embeddings = _selected(model, select_embeddings)
    names = _data_names(embeddings)
    sparsifier = data_sparsifier_class(**sparse_config)
    for name, (_, emb) in zip(names, embeddings, strict=True):
        sparsifier.validate_data(name, emb.weight, dict(sparsifier.defaults))
    if sparsify_first:
        _sparsify(sparsifier, names, [emb for _, emb in embeddings])
        _quantize(model, embeddings)
    else:
        _quantize(model, embeddings)
        _sparsify_quantized(model, sparsifier, names, [fqn for fqn, _ in embeddings])


def _sparsify(sparsifier: BaseDataSparsifier, names: list[str], data: list[Any]) -> None:
    """Add every item, compute the masks and bake them in."""
    for name, item in zip(names, data, strict=True):
        sparsifier.add_data(name=name, data=item)
    sparsifier.step()
    sparsifier.squash_mask()


def _sparsify_quantized(
    model: nn.Module, sparsifier: BaseDataSparsifier, names: list[str], fqns: list[str]
) -> None:
    """Sparsify the dequantized weights, then requantize them with their own qparams."""
    weights = [fqn_to_module(model, fqn).weight() for fqn in fqns]
    dequantized = [torch.dequantize(w) for w in weights]
    _sparsify(sparsifier, names, dequantized)
    for fqn, weight, data in zip(fqns, weights, dequantized, strict=True):
        requantized = torch.quantize_per_channel(
            data,
            scales=weight.q_per_channel_scales(),
            zero_points=weight.q_per_channel_zero_points(),
            axis=weight.q_per_channel_axis(),
            dtype=weight.dtype,
        )
        fqn_to_module(model, fqn).set_weight(requantized)
