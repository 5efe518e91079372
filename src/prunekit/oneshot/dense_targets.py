"""Dense targets ("asymmetric calibration"): fit every layer to what the dense model
computes, from the inputs the already-pruned model gives it.

Plain sequential calibration asks each layer to keep ``Ŵ X_s ≈ W X_s``, where ``X_s``
are its inputs in the partly pruned model; the error the earlier pruned layers made is
taken as given and piles up with depth. Asking instead for ``Ŵ X_s ≈ W X_d`` (``X_d``:
the same layer's inputs in the dense model) lets every layer absorb part of it. The
least-squares problem splits exactly: with ``H = X_sᵀX_s`` and ``C = X_dᵀX_s`` (tokens as
rows), the refit ``W' = W C H⁻¹`` is the best dense weight, and

    ||W X_dᵀ - Ŵ X_sᵀ||² = ||W X_dᵀ - W' X_sᵀ||² + ||(W' - Ŵ) X_sᵀ||²

so pruning ``W'`` with the usual objective (SparseGPT's Hessian ``H``, Wanda's norms)
minimises the dense-target error. The refit is damped towards ``W`` (ridge):
``W' = W + W (C - H)(H + λI)⁻¹``, which is ``W`` itself, bit for bit, where the two
streams agree. The cost: a dense copy of one block and the dense hidden states run
alongside (one more forward per stage), and one ``C`` per stage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import UnsupportedError
from prunekit.sparsifier.oneshot_math import damped_cholesky

if TYPE_CHECKING:
    from prunekit.oneshot.engine import BlockInput

__all__ = ["DenseStream"]


@contextmanager
def _recording(layers: dict[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inputs of ``layers`` (by call order) in the forwards run inside."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach()))
        for name, module in layers.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _original(module: nn.Module) -> torch.Tensor:
    """The stored weight, under a parametrization if there is one."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


class DenseStream:
    """The dense model run beside the pruned one, block by block.

    ``begin`` copies a block before any of its layers is pruned; ``refit`` collects one
    stage's paired inputs and writes ``W' = W C H⁻¹`` into its layers. The engine moves
    ``inputs`` (the dense hidden states) on through ``block``, the dense copy.
    """

    def __init__(self, inputs: list[BlockInput], percdamp: float) -> None:
        self.inputs = [type(r)(r.args, dict(r.kwargs)) for r in inputs]
        self.percdamp = percdamp
        self.block: nn.Module | None = None
        self.prefix = ""

    def begin(self, fqn: str, block: nn.Module) -> None:
        self.block, self.prefix = copy.deepcopy(block), f"{fqn}." if fqn else ""

    def _twin(self, name: str) -> nn.Module:
        """The dense copy's module at the pruned block's ``name`` (the block itself when
        the name is the block's own fqn)."""
        assert self.block is not None, "begin() first"
        inner = name[len(self.prefix):] if name.startswith(self.prefix) else ""
        return self.block.get_submodule(inner)

    def refit(
        self,
        block: nn.Module,
        stage: dict[str, nn.Module],
        shared_input: bool,
        inputs: list[BlockInput],
        forward_until: Callable[[nn.Module, BlockInput, nn.Module | None], None],
    ) -> None:
        """Refit the layers of ``stage`` (``{fqn: module}`` of the pruned ``block``) to
        dense targets. ``shared_input``: the layers read one input tensor (q/k/v), so one
        ``H`` and ``C`` serve them all and forwards end at the last one's input. The
        forwards of ``block`` are also the ones a sparsifier calibrating it sees."""
        assert self.block is not None, "begin() first"
        names = list(stage)
        record = names[:1] if shared_input else names
        stop = names[-1] if shared_input else None
        twins = {name: self._twin(name) for name in names}
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for sparse_record, dense_record in zip(inputs, self.inputs, strict=True):
            with _recording({n: twins[n] for n in record}) as dense:
                forward_until(self.block, dense_record, stop and twins[stop])
            with _recording({n: stage[n] for n in record}) as sparse:
                forward_until(block, sparse_record, stop and stage[stop])
            for name in record:
                _accumulate(sums, name, sparse[name], dense[name])
        for name in names:
            hessian, cross = sums[record[0] if shared_input else name]
            weight = _original(stage[name])
            upper = damped_cholesky(hessian, self.percdamp)
            w = weight.double()
            shift = torch.cholesky_solve((w @ (cross.double() - hessian.double())).T, upper,
                                         upper=True)
            weight.copy_((w + shift.T).to(weight.dtype))


def _accumulate(
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]],
    name: str,
    sparse: list[torch.Tensor],
    dense: list[torch.Tensor],
) -> None:
    """Add one batch's ``X_sᵀX_s`` and ``X_dᵀX_s`` (calls paired in order) to ``sums``."""
    if len(sparse) != len(dense) or not sparse:
        raise UnsupportedError(
            f"dense targets: {name!r} ran {len(sparse)} times in the pruned block but "
            f"{len(dense)} times in its dense copy; expected the same number, at least one"
        )
    width = sparse[0].shape[-1]
    if name not in sums:
        zeros = torch.zeros(width, width, dtype=torch.float32, device=sparse[0].device)
        sums[name] = (zeros, zeros.clone())
    hessian, cross = sums[name]
    for xs, xd in zip(sparse, dense, strict=True):
        xs, xd = xs.reshape(-1, width).float(), xd.reshape(-1, width).float()
        hessian.addmm_(xs.T, xs)
        cross.addmm_(xd.T, xs)
