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

A layer whose output joins a residual sum (``o_proj``: its output plus the block's
input is what ``post_attention_layernorm`` reads; ``down_proj``: its output plus that sum
is the block's output) is fitted to the dense model's value of that *sum* instead: with
``E = Σ (sum_d - sum_s) x_sᵀ``, ``W' = W + E (H + λI)⁻¹`` moves its output by the whole
remaining error of the residual stream, including what it carried in from earlier
blocks, as far as the layer's inputs can explain it. The cost: a dense copy of one block
and the dense hidden states run alongside (one more forward per stage), and one more
statistic per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunekit.errors import UnsupportedError
from prunekit.linear_like import out_in
from prunekit.parametrization import deepcopy_model, original_tensor
from prunekit.sparsifier.oneshot_math import damped_cholesky

if TYPE_CHECKING:
    from prunekit.oneshot.engine import BlockInput, Records

__all__ = ["DenseStream", "residual_sink"]


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
    """The stored weight (under a parametrization if there is one), ``out x in``."""
    return out_in(module, original_tensor(module, "weight"))


class DenseStream:
    """The dense model run beside the pruned one, block by block.

    ``inputs``: the dense stream's own records, at first a copy of the pruned stream's.
    ``begin`` copies a block before any of its layers is pruned; ``refit`` collects one
    stage's paired inputs and writes the refit weights (see the module docstring) into
    its layers. The engine moves ``inputs`` (the dense hidden states) on through
    ``block``, the dense copy.
    """

    def __init__(self, inputs: Records, percdamp: float) -> None:
        self.inputs = inputs
        self.percdamp = percdamp
        self.block: nn.Module | None = None
        self.prefix = ""

    def begin(self, fqn: str, block: nn.Module) -> None:
        self.block, self.prefix = deepcopy_model(block), f"{fqn}." if fqn else ""

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
        inputs: Records,
        run: Runner,
        sink: str | None = None,
    ) -> None:
        """Refit the layers of ``stage`` (``{fqn: module}`` of the pruned ``block``) to
        dense targets. ``shared_input``: the layers read one input tensor (q/k/v), so one
        statistic serves them all and forwards end at the last one's input.
        ``sink``: the stage is one layer whose output joins a residual sum there (see
        ``residual_sink``), fitted to the dense value of that sum instead, so that it also
        absorbs the error the residual stream brought in. The forwards of ``block`` are
        the ones a sparsifier calibrating it sees."""
        assert self.block is not None, "begin() first"
        names = list(stage)
        if sink is not None:
            self._fit_to_sum(block, names[0], stage[names[0]], sink, inputs, run)
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

    def _fit_to_sum(
        self,
        block: nn.Module,
        name: str,
        layer: nn.Module,
        sink: str,
        inputs: Records,
        run: Runner,
    ) -> None:
        """``W' = W + E (H + λI)⁻¹`` with ``E = Σ (sum_d - sum_s) x_sᵀ``: the layer's
        output moves by the residual stream's remaining error at ``sink``, as far as its
        inputs can explain it."""
        assert self.block is not None, "begin() first"
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        where = f"{self.prefix}{sink}" if sink else self.prefix.rstrip(".") or "the block"
        for sparse_record, dense_record in zip(inputs, self.inputs, strict=True):
            dense_sum, _ = _sums_at(self.block, sink, dense_record, run)
            sparse_sum, seen = _sums_at(block, sink, sparse_record, run, layer)
            _check_paired(where, sparse_sum, dense_sum)
            _check_paired(name, seen, sparse_sum)
            for x, target, value in zip(seen, dense_sum, sparse_sum, strict=True):
                xs = _rows(x)
                hessian, error = _sums(sums, name, xs, rows=target.shape[-1])
                hessian.addmm_(xs.T, xs)
                error.addmm_(_rows(target - value).T, xs)
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


def _sums_at(
    block: nn.Module, sink: str, record: BlockInput, run: Runner, layer: nn.Module | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The residual sum at ``sink`` in one forward of ``block`` (the input of the module
    of that name, ended there; ``""``: the block's output), and ``layer``'s inputs."""
    watch = {} if layer is None else {"layer": layer}
    stop = block.get_submodule(sink) if sink else None
    if stop is not None:
        watch["sum"] = stop
    with _recording(watch) as seen:
        output = run(block, record, stop)
    values = seen["sum"] if stop is not None else [] if output is None else [output]
    return values, seen.get("layer", [])


@dataclass
class _Probe:
    """One forward of a block watched around one of its layers."""

    outputs: list[torch.Tensor]  # the layer's, per call
    later: dict[str, list[torch.Tensor]]  # inputs of the modules called after it
    result: torch.Tensor | None  # the block's hidden states


def _probe(block: nn.Module, layer: nn.Module, record: BlockInput, run: Runner, zero: bool
           ) -> _Probe:  # fmt: skip
    """Run ``block`` without autograd, recording ``layer``'s outputs (replaced by zeros
    if ``zero``) and the first input of every module called after it."""
    probe = _Probe([], {}, None)

    def after(_m: nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
        probe.outputs.append(out)
        return torch.zeros_like(out) if zero else out

    def before(_m: nn.Module, args: tuple, name: str) -> None:
        if probe.outputs and args and isinstance(args[0], torch.Tensor):
            probe.later.setdefault(name, []).append(args[0].detach().clone())

    handles = [layer.register_forward_hook(after)] + [
        module.register_forward_pre_hook(lambda m, a, name=name: before(m, a, name))
        for name, module in block.named_modules() if module is not block and module is not layer
    ]
    try:
        with torch.no_grad():
            probe.result = run(block, record, None)
    finally:
        for handle in handles:
            handle.remove()
    return probe


def residual_sink(block: nn.Module, layer: nn.Module, record: BlockInput, run: Runner
                  ) -> str | None:  # fmt: skip
    """Where ``layer``'s output joins a residual sum: the name (in ``block``) of the
    first module called after it whose input is that sum, ``""`` if the sum is the
    block's output, None if there is none. Checked on one batch by running the block
    again with the layer's output replaced by zeros: a sum moves by exactly that output.
    The input of a module that is the layer's output alone (a dropout) is no sum; a
    layer run more than once has none."""
    full = _probe(block, layer, record, run, zero=False)
    if len(full.outputs) != 1:
        return None
    without = _probe(block, layer, record, run, zero=True)
    out = full.outputs[0]
    for name, values in full.later.items():
        others = without.later.get(name, [])
        if len(values) == len(others) == 1 and _adds(values[0], others[0], out) and bool(
                others[0].abs().max() > 1e-6 * (values[0].abs().max() + 1e-12)):
            return name
    if full.result is not None and without.result is not None and _adds(
            full.result, without.result, out):
        return ""
    return None


def _adds(value: torch.Tensor, without: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``value`` is ``without`` plus ``out``."""
    if value.shape != out.shape or without.shape != out.shape:
        return False
    scale = float(value.abs().max()) + 1e-12
    return bool(torch.allclose(value - without, out, rtol=1e-4, atol=1e-5 * scale))


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
