"""Data-aware channel importance: how much signal the calibration data sends through each
channel, rather than how large the weights around it are.

Weight norms say little about a pretrained language model's channels: a channel with
small weights can carry large activations (RMSNorm scales, outlier features) and the
reverse. ``ActivationImportance`` runs calibration batches once and scores the input
channels of every layer that reads them (``nn.Linear``, transformers' ``Conv1D``,
``nn.Conv1d/2d/3d`` with ``groups=1``): ``"activation"`` by the channel's input norm
``‖x_j‖₂``, ``"wanda"`` by that times the layer's weight column norm ``‖W[:, j]‖₂`` (the
structured Wanda score). The engine averages the readers of a channel, so a hidden
channel of a transformer is scored by what q/k/v, the MLP and the LM head receive on it,
an MLP channel by what the down projection receives, a head by what the output
projection receives. Channels no such layer reads (a grouped convolution's only) are
kept.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.linear_like import is_conv1d, is_linear_like
from prunekit.structured.engine.importance import Importance

__all__ = ["ActivationImportance"]

SCORES = ("activation", "wanda")


def _input_dim(module: nn.Module) -> tuple[int, int] | None:
    """``(dim of the input holding channels, dim of the weight indexing them)``, or None
    for a layer whose input channels this criterion does not score."""
    if is_linear_like(module):  # transformers' Conv1D stores its weight in x out
        return -1, 0 if is_conv1d(module) else 1
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        return 1, 1
    return None


class ActivationImportance(Importance):
    """Input-channel scores of ``model``'s layers on ``calibration_batches`` (one pass in
    eval mode, no autograd; batches as ``prunekit.oneshot`` takes them: token-id tensors,
    tuples of arguments or dicts of keyword arguments). Pass it to ``prune`` of the same
    model, before it changes.

    >>> scores = ActivationImportance(model, batches)          # doctest: +SKIP
    >>> prune(model, batches[0], ratio=0.25, importance=scores).apply()  # doctest: +SKIP
    """

    name = "activation"

    def __init__(
        self, model: nn.Module, calibration_batches: Iterable[Any], score: str = "activation"
    ) -> None:
        # the calibration runner is one-shot's; imported here so the engine loads without it
        from prunekit.oneshot.engine import add_input_squares, batch_list, run_batches

        if score not in SCORES:
            raise ConfigError(f"ActivationImportance: score must be one of {SCORES}, got {score!r}")
        batches = batch_list("ActivationImportance", calibration_batches)
        self.score_kind = score
        # what the plan records as its importance
        self.name = "activation" if score == "activation" else "activation (wanda)"
        self._squares: dict[nn.Module, torch.Tensor] = {}
        handles = []
        for module in model.modules():
            dims = _input_dim(module)
            if dims is not None:
                total = torch.zeros(module.weight.shape[dims[1]], dtype=torch.float64)
                self._squares[module] = total
                hook = functools.partial(add_input_squares, total, dim=dims[0])
                handles.append(module.register_forward_pre_hook(hook))
        if not handles:
            raise ConfigError(
                "ActivationImportance: the model has no nn.Linear, Conv1D or ungrouped "
                "convolution whose inputs could be scored"
            )
        run_batches(model, batches, handles)

    def score(
        self, module: nn.Module, fqn: str, tensor: torch.Tensor, dim: int
    ) -> torch.Tensor | None:
        dims = _input_dim(module)
        if dims is None or tensor is not module.weight or dim != dims[1]:
            return None
        squares = self._squares.get(module)
        if squares is None or squares.numel() != tensor.shape[dim]:
            raise ConfigError(
                f"ActivationImportance has no activations for {fqn} of shape "
                f"{tuple(tensor.shape)}: build it on the model you prune, before pruning"
            )
        norms = squares.sqrt()
        if self.score_kind == "wanda":
            weight = tensor.detach().double().movedim(dim, 0).reshape(tensor.shape[dim], -1)
            norms = norms * weight.norm(dim=1).cpu()
        return norms
