"""Recovery training: gradual pruning with masks kept through the optimizer, knowledge
distillation from the dense model, and short fine-tunes after structured pruning.

A mask only zeroes a weight in the forward pass; SGD momentum, Adam's moments and weight
decay keep moving the stored value behind it. ``keep_masks`` re-zeroes those values and
the optimizer state after every ``optimizer.step()``, so a pruned weight stays exactly
zero and cannot come back with stale momentum when masks change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.scheduler.base import BaseScheduler
from prunekit.sparsifier.base import BaseSparsifier

__all__ = ["distillation_loss", "finetune", "gradual_prune", "keep_masks", "masked_tensors"]

log = logging.getLogger("prunekit")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def masked_tensors(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(stored tensor, keep-mask)`` for every masked tensor of ``model``: parametrizations
    with a ``mask`` (prunekit and torch.ao.pruning; structured row masks come shaped
    ``(out, 1, ...)``) and ``torch.nn.utils.prune``'s ``<name>_orig``/``<name>_mask`` pairs."""
    out = []
    for module in model.modules():
        for plist in getattr(module, "parametrizations", {}).values():
            masks = [p.mask for p in plist if isinstance(getattr(p, "mask", None), torch.Tensor)]
            out.extend((plist.original, _broadcastable(m, plist.original)) for m in masks)
        for name, buf in module.named_buffers(recurse=False):
            orig = getattr(module, name.removesuffix("_mask") + "_orig", None)
            if name.endswith("_mask") and isinstance(orig, nn.Parameter):
                out.append((orig, buf))
    return out


def _broadcastable(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Row masks of structured pruning (one entry per output channel) as ``(out, 1, ...)``."""
    if mask.dim() == 1 and tensor.dim() > 1 and mask.shape[0] == tensor.shape[0]:
        return mask.view(-1, *([1] * (tensor.dim() - 1)))
    return mask


def keep_masks(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """After every ``optimizer.step()``, zero the masked entries of the stored weights and
    of their optimizer state (momentum, Adam moments). Masks are looked up at each step,
    so masks that change (gradual pruning) are followed. Returns the hook's handle."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigTypeError(
            f"optimizer must be a torch Optimizer, got {type(optimizer).__name__}"
        )

    @torch.no_grad()
    def hook(opt: torch.optim.Optimizer, *_: Any) -> None:
        for tensor, mask in masked_tensors(model):
            dropped = (mask == 0).expand_as(tensor)
            tensor.masked_fill_(dropped, 0)
            for value in opt.state.get(tensor, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    value.masked_fill_(dropped, 0)

    return optimizer.register_step_post_hook(hook)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, target)``
    (Hinton et al. 2015): the dense model's soft labels carry what pruning erased."""
    soft = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student, target)


def _check_train_args(model: Any, epochs: Any, alpha: float, temperature: float) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive int, got {epochs!r}")
    if not 0 <= alpha <= 1 or not temperature > 0:
        raise ConfigError(
            f"distillation needs 0 <= kd_alpha <= 1 and kd_temperature > 0, got kd_alpha="
            f"{alpha!r}, kd_temperature={temperature!r}"
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _batch_loss(
    model: nn.Module, batch: Any, loss_fn: LossFn, teacher: nn.Module | None,
    alpha: float, temperature: float,
) -> torch.Tensor:
    inputs, target = (t.to(_device(model)) for t in batch)
    output, flat = _per_token(model(inputs), target)
    if teacher is None:
        return loss_fn(output, flat)
    with torch.no_grad():
        soft, _ = _per_token(teacher(inputs), target)
    return distillation_loss(output, soft, flat, alpha, temperature)


def _per_token(output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers output (one with ``logits``, classes last) as ``(tokens, classes)``
    logits and flat targets, so that a language model's every position is one sample of
    the loss and of the distillation's batch mean; any other output as it is."""
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        return output, target
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ConfigError(f"targets of shape {tuple(target.shape)} do not match logits of "
                          f"shape {tuple(logits.shape)}: a language model's batch is "
                          "(ids[:, :-1], ids[:, 1:]), one target per position")
    return logits.flatten(0, -2), target.flatten()


def _zero_fraction(model: nn.Module) -> float:
    pairs = masked_tensors(model)
    total = sum(m.numel() for _, m in pairs)
    return sum(int((m == 0).sum()) for _, m in pairs) / total if total else 0.0


def _run(
    model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, epochs: int,
    options: dict[str, Any], after_batch: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """The training loop both helpers share: one log row per epoch."""
    teacher, eval_fn = options["teacher"], options["eval_fn"]
    if teacher is not None:
        teacher.eval()
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        start, total, count = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", disable=not options["progress"],
                   leave=False)
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = _batch_loss(model, batch, options["loss_fn"], teacher,
                               options["kd_alpha"], options["kd_temperature"])
            loss.backward()
            optimizer.step()
            if options["lr_scheduler"] is not None:
                options["lr_scheduler"].step()
            total, count = total + loss.item(), count + 1
            if after_batch is not None:
                after_batch()
        row = {"epoch": epoch, "loss": total / max(count, 1), "sparsity": _zero_fraction(model),
               "seconds": time.perf_counter() - start}
        if eval_fn is not None:
            model.eval()
            row["metric"] = float(eval_fn(model))
        log.info("epoch %d/%d: %s", epoch, epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        history.append(row)
    return history


def gradual_prune(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    sparsifier: BaseSparsifier,
    scheduler: BaseScheduler | None = None,
    epochs: int = 1,
    prune_every: int = 100,
    loss_fn: LossFn = F.cross_entropy,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    lr_scheduler: Any = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``model`` (already ``sparsifier.prepare``-d) while its masks grow.

    Every ``prune_every`` optimizer steps the scheduler advances one step and the
    sparsifier recomputes its masks (so the schedule's ``total_t`` counts those events).
    Masked weights and their optimizer state stay exactly zero (``keep_masks``). With
    ``teacher`` (e.g. a copy of the dense model) the loss is ``distillation_loss``.
    ``lr_scheduler`` (any ``torch.optim.lr_scheduler``) steps after every optimizer step.
    Returns one row per epoch: loss, sparsity, seconds and ``eval_fn(model)``.
    """
    _check_train_args(model, epochs, kd_alpha, kd_temperature)
    if not isinstance(sparsifier, BaseSparsifier) or not sparsifier.groups:
        raise ConfigTypeError("sparsifier must be a prunekit BaseSparsifier prepared on the "
                              f"model, got {type(sparsifier).__name__} with no groups")
    if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 1:
        raise ConfigError(f"prune_every must be a positive int, got {prune_every!r}")
    counter = {"steps": 0}

    def after_batch() -> None:
        counter["steps"] += 1
        if counter["steps"] % prune_every == 0:
            if scheduler is not None:
                scheduler.step()
            sparsifier.step()

    sparsifier.step()
    handle = keep_masks(optimizer, model)
    options = {"teacher": teacher, "eval_fn": eval_fn, "progress": progress, "loss_fn": loss_fn,
               "kd_alpha": kd_alpha, "kd_temperature": kd_temperature,
               "lr_scheduler": lr_scheduler}
    try:
        return _run(model, loader, optimizer, epochs, options, after_batch)
    finally:
        handle.remove()


def finetune(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn = F.cross_entropy,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    lr_scheduler: Any = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """A short fine-tune, e.g. after ``prunekit.structured.prune(...).apply()`` (the
    optimizer is built here, over the shrunk parameters, unless given: Adam at ``lr``).
    Any masks on the model are kept through the optimizer as in ``gradual_prune``.
    ``loader`` yields ``(inputs, targets)``; for a transformers language model
    ``(ids[:, :-1], ids[:, 1:])``: its logits are scored per token."""
    _check_train_args(model, epochs, kd_alpha, kd_temperature)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    handle = keep_masks(optimizer, model)
    options = {"teacher": teacher, "eval_fn": eval_fn, "progress": progress, "loss_fn": loss_fn,
               "kd_alpha": kd_alpha, "kd_temperature": kd_temperature,
               "lr_scheduler": lr_scheduler}
    try:
        return _run(model, loader, optimizer, epochs, options)
    finally:
        handle.remove()
