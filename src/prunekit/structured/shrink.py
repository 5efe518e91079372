"""Physically remove the masked output channels of a Linear/ConvNd and the matching inputs
of whatever reads them.

A pruned channel of the masked model outputs a constant (its bias when ``prune_bias`` is
False, else zero), carried through per-channel ops (activations, BatchNorm, pools,
dropout) to each consumer. Removing the channel is exact once that constant is folded into
the consumer's bias. When the constant is not zero and the consumer zero-pads, a bias
cannot reproduce the borders; but every pruned channel then shows the same spatial
pattern (constant inside, zero in the padding) scaled by its constant, so one pruned
channel (the *anchor*) is kept and the others are folded into its consumer column. Only
when no anchor works (an output branch, an average pool counting zero padding) is the
layer left at full width with the mask baked in, as the reference always did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import UnsupportedError
from prunekit.structured.parametrization import BiasHook, FakeStructuredSparsity

__all__ = [
    "Branch",
    "Step",
    "bake_mask",
    "check_branches",
    "shrink_layer",
    "slice_channels",
    "structured_mask",
]


@dataclass
class Step:
    """One per-channel op between a pruned layer and its consumer."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    module: nn.Module | None = None  # sliced along the channels when it has per-channel state
    zero_padded: bool = False  # an average pool that counts zero padding


@dataclass
class Branch:
    """One path from a pruned layer to a consumer (``None``: the model's output)."""

    name: str
    steps: list[Step]
    consumer: nn.Module | None
    flatten: bool = False  # the consumer reads the channels flattened with the spatial dims


def structured_mask(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor | None:
    """The row mask attached to ``module.<tensor_name>``, if any."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, FakeStructuredSparsity):
            return p.mask
    return None


def _weight(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _in_width(module: nn.Module) -> int:
    return _weight(module).shape[1]


def check_branches(producer: nn.Module, name: str, width: int, branches: Sequence[Branch]) -> None:
    """Raise before any change if a branch cannot take ``width`` pruned channels."""
    if getattr(producer, "groups", 1) != 1:
        raise UnsupportedError(
            f"prune: prepared layer {name!r} is a grouped convolution (groups="
            f"{producer.groups}); its output channels are tied to its inputs, which the pattern "
            "pruner does not follow (use prunekit.structured.prune)"
        )
    for branch in branches:
        for step in branch.steps:
            _check_step(step, width, name)
        consumer = branch.consumer
        if consumer is None:
            continue
        if getattr(consumer, "groups", 1) != 1:
            raise UnsupportedError(
                f"prune: {branch.name} is a grouped convolution (groups={consumer.groups}) fed "
                f"by pruned layer {name!r}; the pattern pruner only handles groups=1 consumers "
                "(use prunekit.structured.prune for grouped/depthwise convolutions)"
            )
        got = _in_width(consumer)
        ok = got % width == 0 if branch.flatten else got == width
        if not ok:
            raise UnsupportedError(
                f"prune: {branch.name} reads {got} input features but {name!r} produces {width} "
                f"channels{' (flattened: expected a multiple)' if branch.flatten else ''}"
            )


def _check_step(step: Step, width: int, name: str) -> None:
    module = step.module
    bad_bn = isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.num_features != width or module.running_mean is None
    )
    if bad_bn:
        raise UnsupportedError(
            f"prune: {step.name} after {name!r} must have num_features={width} and running "
            f"statistics; got num_features={module.num_features}, "
            f"track_running_stats={module.track_running_stats}"
        )
    if isinstance(module, nn.PReLU) and module.num_parameters not in (1, width):
        raise UnsupportedError(
            f"prune: {step.name} has {module.num_parameters} parameters; expected 1 or {width}"
        )


def _bias_slot(module: nn.Module) -> str:
    """Prepared layers keep their bias in ``_bias`` (added by a BiasHook)."""
    hooked = any(isinstance(h, BiasHook) for h in module._forward_hooks.values())
    return "_bias" if hooked else "bias"


def _pruned_constant(producer: nn.Module, mask: torch.Tensor, branch: Branch) -> torch.Tensor:
    """What each pruned channel outputs at the end of ``branch`` (eval mode)."""
    bias = getattr(producer, "_bias", None)
    x = torch.zeros(1, mask.numel(), dtype=_weight(producer).dtype, device=mask.device)
    if bias is not None and not getattr(producer, "prune_bias", True):
        x[0] = bias.detach()
    x = x * ~mask
    for step in branch.steps:
        x = step.fn(x)
    return x[0, ~mask]


def _remove_bias_hooks(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_hooks.items() if isinstance(h, BiasHook)]:
        del module._forward_hooks[key]


def bake_mask(producer: nn.Module, mask: torch.Tensor) -> None:
    """Keep the full width: the mask goes into the weight, the masked bias into ``bias``."""
    bias = getattr(producer, "_bias", None)
    with torch.no_grad():
        parametrize.remove_parametrizations(producer, "weight", leave_parametrized=True)
        if bias is not None:
            keep_all = not getattr(producer, "prune_bias", True)
            producer.bias = nn.Parameter(bias.detach() if keep_all else bias.detach() * mask)
    _drop_moved_bias(producer)


def _drop_moved_bias(module: nn.Module) -> None:
    _remove_bias_hooks(module)
    if hasattr(module, "_bias"):
        delattr(module, "_bias")


def _cut_rows(producer: nn.Module, mask: torch.Tensor, keep: torch.Tensor) -> None:
    """Keep the ``keep`` rows; a kept masked row (the anchor) keeps its masked-model bias."""
    bias = getattr(producer, "_bias", None)
    with torch.no_grad():
        parametrize.remove_parametrizations(producer, "weight", leave_parametrized=True)
        producer.weight = nn.Parameter(producer.weight[keep])
        if bias is not None:
            bias = bias.detach() * mask if getattr(producer, "prune_bias", True) else bias
            producer.bias = nn.Parameter(bias.detach()[keep])
    _drop_moved_bias(producer)
    attr = "out_features" if isinstance(producer, nn.Linear) else "out_channels"
    setattr(producer, attr, int(keep.sum()))


def slice_channels(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep the ``keep`` channels of a per-channel module (BatchNorm, PReLU, LayerNorm)."""
    with torch.no_grad():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean = module.running_mean[keep]
            module.running_var = module.running_var[keep]
            module.num_features = int(keep.sum())
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = (int(keep.sum()),)
        elif isinstance(module, nn.PReLU) and module.num_parameters > 1:
            module.num_parameters = int(keep.sum())
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter) and param.numel() == keep.numel():
                setattr(module, name, nn.Parameter(param[keep]))


def _feed_consumer(
    branch: Branch, mask: torch.Tensor, constant: torch.Tensor | None, keep: torch.Tensor,
    anchor: int | None,
) -> None:
    """Fold the pruned channels' constant into the consumer (its bias, or the anchor's
    column), then drop the inputs that are not kept."""
    consumer = branch.consumer
    weight = _weight(consumer)
    # (out, channels, spatial positions of a flattened input (else 1), *kernel)
    grouped = weight.reshape(weight.shape[0], mask.numel(), -1, *weight.shape[2:])
    with torch.no_grad():
        if constant is not None and anchor is None:
            _fold(consumer, grouped, ~mask, constant)
        elif constant is not None:
            grouped = _fold_into_anchor(grouped, mask, constant, anchor)
        new = nn.Parameter(grouped[:, keep].reshape(weight.shape[0], -1, *weight.shape[2:]))
        if parametrize.is_parametrized(consumer, "weight"):
            consumer.parametrizations.weight.original = new
        else:
            consumer.weight = new
    attr = "in_features" if isinstance(consumer, nn.Linear) else "in_channels"
    setattr(consumer, attr, new.shape[1])


def _fold(consumer: nn.Module, grouped: torch.Tensor, pruned: torch.Tensor, value: torch.Tensor):
    """consumer bias += (masked) W[:, pruned] · value, summed over the kernel window."""
    row_mask = structured_mask(consumer)
    columns = grouped[:, pruned]
    if row_mask is not None:  # masked rows of the consumer never saw the constant
        columns = columns * row_mask.reshape([-1] + [1] * (columns.dim() - 1))
    shape = [1, -1] + [1] * (columns.dim() - 2)
    added = (columns * value.reshape(shape)).sum(dim=tuple(range(1, columns.dim())))
    slot = _bias_slot(consumer)
    old = getattr(consumer, slot, None)
    new = added if old is None else old.detach() + added
    setattr(consumer, slot, nn.Parameter(new))


def _fold_into_anchor(
    grouped: torch.Tensor, mask: torch.Tensor, value: torch.Tensor, anchor: int
) -> torch.Tensor:
    """Pruned channel j outputs value[j] * (the same map) for every j: its weights, scaled
    by value[j] / value[anchor], move onto the anchor's column."""
    pruned = (~mask).nonzero().flatten()
    scale = value / value[int((pruned == anchor).nonzero())]
    shape = [1, -1] + [1] * (grouped.dim() - 2)
    grouped = grouped.clone()
    grouped[:, anchor] = (grouped[:, pruned] * scale.reshape(shape)).sum(dim=1)
    return grouped


def _anchor(mask: torch.Tensor, branches: Sequence[Branch], constants: list) -> int | None:
    """The pruned channel whose constant is largest (in the worst branch), if one works."""
    if any(b.consumer is None or any(s.zero_padded for s in b.steps) for b in branches):
        return None
    if int(mask.sum()) + 1 >= mask.numel():
        return None  # keeping an anchor would save nothing
    needed = torch.stack([c.abs() for c in constants if c is not None]).amin(dim=0)
    best = int(needed.argmax())
    if float(needed[best]) == 0.0:
        return None
    return int((~mask).nonzero().flatten()[best])


def _zero_pads(consumer: nn.Module | None) -> bool:
    if consumer is None or isinstance(consumer, nn.Linear):
        return False
    if getattr(consumer, "padding_mode", "zeros") != "zeros":
        return False  # reflect/replicate/circular padding repeats the constant
    padding = consumer.padding
    if isinstance(padding, str):
        return padding == "same" and any(k > 1 for k in consumer.kernel_size)
    return any(p > 0 for p in padding)


def shrink_layer(producer: nn.Module, branches: Sequence[Branch]) -> None:
    """Remove the masked output channels of a prepared Linear/ConvNd (see module doc).

    Call ``check_branches`` first: this function assumes the branches fit.
    """
    mask = structured_mask(producer)
    constants = []
    for branch in branches:
        value = _pruned_constant(producer, mask, branch)
        constants.append(value if bool((value != 0).any()) else None)
    needs_borders = any(
        value is not None and (_zero_pads(b.consumer) or any(s.zero_padded for s in b.steps))
        for b, value in zip(branches, constants, strict=False)
    )
    keep, anchor = mask, None
    if needs_borders:
        anchor = _anchor(mask, branches, constants)
        if anchor is None:
            bake_mask(producer, mask)
            return
        keep = mask.clone()
        keep[anchor] = True
    _cut_rows(producer, mask, keep)
    modules = {id(s.module): s.module for b in branches for s in b.steps if s.module is not None}
    for module in modules.values():
        slice_channels(module, keep)
    for branch, value in zip(branches, constants, strict=False):
        if branch.consumer is not None:
            _feed_consumer(branch, mask, value, keep, anchor)


def batchnorm_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """BatchNorm in eval mode as a per-channel map of a ``(1, C)`` tensor."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, module.running_mean, module.running_var, module.weight, module.bias,
            False, 0.0, module.eps,
        )

    return apply
