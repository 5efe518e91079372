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
streams agree.

A block's last layer whose output the block adds to its result (a residual branch:
``down_proj``) is fitted to the dense *block* output instead: with ``E = Σ (out_d -
out_s) x_sᵀ``, ``W' = W + E (H + λI)⁻¹`` moves its output by the block's whole remaining
error, including what the residual stream carried in from earlier blocks, as far as its
inputs can explain it. The cost: a dense copy of one block and the dense hidden states
run alongside (one more forward per stage), and one more statistic per stage.
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

__all__ = ["DenseStream", "adds_to_output"]


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
    stage's paired inputs and writes the refit weights (see the module docstring) into
    its layers. The engine moves ``inputs`` (the dense hidden states) on through
    ``block``, the dense copy.
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
        run: Runner,
        to_output: bool = False,
    ) -> None:
        """Refit the layers of ``stage`` (``{fqn: module}`` of the pruned ``block``) to
        dense targets. ``shared_input``: the layers read one input tensor (q/k/v), so one
        statistic serves them all and forwards end at the last one's input.
        ``to_output``: the stage is one layer whose output the block adds to its result
        (see ``adds_to_output``), fitted to the dense **block** output instead, so that
        it also absorbs the error the residual stream brought in. The forwards of
        ``block`` are the ones a sparsifier calibrating it sees."""
        assert self.block is not None, "begin() first"
        names = list(stage)
        if to_output:
            self._fit_block_output(block, names[0], stage[names[0]], inputs, run)
            return
        record = names[:1] if shared_input else names
        stop = names[-1] if shared_input else None
        twins = {name: self._twin(name) for name in names}
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for sparse_record, dense_record in zip(inputs, self.inputs, strict=True):
            with _recording({n: twins[n] for n in record}) as dense:
                run(self.block, dense_record, stop and twins[stop])
            with _recording({n: stage[n] for n in record}) as sparse:
                run(block, sparse_record, stop and stage[stop])
            for name in record:
                _check_paired(name, sparse[name], dense[name])
                hessian, shift = _sums(sums, name, _rows(sparse[name][0]))
                for xs, xd in zip(sparse[name], dense[name], strict=True):
                    xs, xd = _rows(xs), _rows(xd)
                    hessian.addmm_(xs.T, xs)
                    shift.addmm_((xd - xs).T, xs)
        for name in names:
            hessian, shift = sums[record[0] if shared_input else name]
            weight = _original(stage[name])
            _apply(weight, weight.double() @ shift.double(), hessian, self.percdamp)

    def _fit_block_output(
        self, block: nn.Module, name: str, layer: nn.Module, inputs: list[BlockInput], run: Runner
    ) -> None:
        """``W' = W + E (H + λI)⁻¹`` with ``E = Σ (out_d - out_s) x_sᵀ``: the layer's
        output moves by the block's remaining error, as far as its inputs can explain."""
        assert self.block is not None, "begin() first"
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for sparse_record, dense_record in zip(inputs, self.inputs, strict=True):
            dense_out = run(self.block, dense_record, None)
            with _recording({name: layer}) as sparse:
                sparse_out = run(block, sparse_record, None)
            assert dense_out is not None and sparse_out is not None
            xs = _rows(sparse[name][0])
            hessian, error = _sums(sums, name, xs, rows=dense_out.shape[-1])
            hessian.addmm_(xs.T, xs)
            error.addmm_(_rows(dense_out - sparse_out).T, xs)
        hessian, error = sums[name]
        _apply(_original(layer), error.double(), hessian, self.percdamp)


Runner = Callable[[nn.Module, "BlockInput", "nn.Module | None"], "torch.Tensor | None"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def _apply(weight: torch.Tensor, shift: torch.Tensor, hessian: torch.Tensor, percdamp: float
           ) -> None:  # fmt: skip
    """``weight += shift (H + λI)⁻¹`` (float64 solve), in place."""
    upper = damped_cholesky(hessian, percdamp)
    delta = torch.cholesky_solve(shift.T, upper, upper=True).T
    weight.copy_((weight.double() + delta).to(weight.dtype))


def adds_to_output(block: nn.Module, layer: nn.Module, record: BlockInput, run: Runner) -> bool:
    """Whether ``block``'s output is something plus ``layer``'s output, checked on one
    batch by running the block again with that output replaced by zeros. A layer run
    more than once, or whose output shape differs from the block's, does not count."""
    outputs: list[torch.Tensor] = []
    full = _run_hooked(block, record, run, layer, lambda _m, _a, out: outputs.append(out))
    if len(outputs) != 1 or full is None or outputs[0].shape != full.shape:
        return False
    without = _run_hooked(block, record, run, layer, lambda _m, _a, out: torch.zeros_like(out))
    assert without is not None
    scale = float(full.abs().max()) + 1e-12
    return bool(torch.allclose(full - without, outputs[0], rtol=1e-4, atol=1e-5 * scale))


def _run_hooked(
    block: nn.Module, record: BlockInput, run: Runner, layer: nn.Module, hook: Callable
) -> torch.Tensor | None:
    """``run`` the whole block without autograd, with a forward ``hook`` on ``layer``."""
    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return run(block, record, None)
    finally:
        handle.remove()


def _check_paired(name: str, sparse: list[torch.Tensor], dense: list[torch.Tensor]) -> None:
    """Calls of a layer pair up in order only if both blocks ran it equally often."""
    if len(sparse) != len(dense) or not sparse:
        raise UnsupportedError(
            f"dense targets: {name!r} ran {len(sparse)} times in the pruned block but "
            f"{len(dense)} times in its dense copy; expected the same number, at least one"
        )


def _sums(
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]],
    name: str,
    like: torch.Tensor,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``name``'s running ``(H, second statistic)``, zeros at first, sized by ``like``
    (``tokens x width`` inputs): ``H`` is ``width x width``, the second ``rows x width``
    (square by default)."""
    if name not in sums:
        width = like.shape[-1]
        hessian = torch.zeros(width, width, dtype=torch.float32, device=like.device)
        second = torch.zeros(rows or width, width, dtype=torch.float32, device=like.device)
        sums[name] = (hessian, second)
    return sums[name]
