"""``auto``'s last look: the deployed model against its dense layers, on ``example_inputs``.

Each layer was timed alone, on its input as the dense model computes it. In the model a
sparse layer's output is a transposed view, and what reads it may run slower than it
was timed (a dense float16 matmul on a transposed input is 7-10x slower on the CPU,
bfloat16 1.1-1.4x), refuse it (``torch.view_as_complex`` in some rotary embeddings), or
read it faster (the next layer in row blocks, with no copy). So ``auto`` runs the whole
model as chosen, as chosen with contiguous outputs, with every layer that has a fitting
sparse layout in its fastest one, and with the chosen layers dense (only layers outside
expert banks: banks were decided on their own inputs, by ``prunekit.deploy.experts``),
and keeps the fastest that runs: the deployed model must not run slower than dense.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.deploy.auto import RUN_ERRORS, confirmed_speedup, run_model, time_candidates
from prunekit.deploy.modules import SparseLinear
from prunekit.deploy.report import DeployReport
from prunekit.experts import put_module

__all__ = ["model_round"]


class _Variant(nn.Module):
    """The model with ``layers`` put in place and every sparse layer's
    ``contiguous_output`` set before each call: variants of one model object take turns
    in paired timing without a copy of it."""

    def __init__(self, name: str, model: nn.Module, layers: dict[str, nn.Module],
                 contiguous: bool) -> None:  # fmt: skip
        super().__init__()
        object.__setattr__(self, "target", model)  # not a child: its modules stay its own
        object.__setattr__(self, "layers", layers)
        self.name, self.contiguous = name, contiguous  # name: the label tests time by
        # Found once, not on every timed call: the model's own sparse layers (experts of
        # deployed banks) and this variant's.
        found = [*model.modules(), *layers.values()]
        object.__setattr__(self, "sparse", list({id(m): m for m in found
                                                 if isinstance(m, SparseLinear)}.values()))

    def install(self) -> None:
        for fqn, layer in self.layers.items():
            if self.target.get_submodule(fqn) is not layer:
                put_module(self.target, fqn, layer)
        for module in self.sparse:
            module.contiguous_output = self.contiguous

    def forward(self, example_inputs: Any) -> Any:
        self.install()
        return run_model(self.target, example_inputs)


def _runs(variant: _Variant, example_inputs: Any) -> str | None:
    """``None`` if the model runs as ``variant``, else the error's first line."""
    try:
        with torch.inference_mode():
            variant(example_inputs)
    except RUN_ERRORS as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _fastest(running: dict[str, _Variant], base: _Variant, args: tuple[Any], margin: float,
             notes: list[str]) -> tuple[str, float]:  # fmt: skip
    """The variant to keep and its paired speed-up over ``base``: the fastest in an
    interleaved round, if it also beats "as chosen" by ``margin / 2`` in paired timing
    (a copy, or a layer its own round kept dense, must pay for itself)."""
    times = time_candidates({"dense": base, **running}, args)
    notes.append(", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()))
    best = min(running, key=times.__getitem__)
    if best != "as chosen" and "as chosen" in running:
        gain = confirmed_speedup(running["as chosen"], running[best], args)
        notes.append(f"{best} {gain:.2f}x as chosen in paired timing")
        if gain * (1 - margin / 2) <= 1:
            best = "as chosen"
    return best, confirmed_speedup(base, running[best], args)


def model_round(
    model: nn.Module,
    dense: dict[str, nn.Module],
    chosen: dict[str, nn.Module],
    alternatives: dict[str, nn.Module],
    example_inputs: Any,
    contiguous: bool,
    margin: float,
    report: DeployReport,
) -> None:
    """Leave ``model`` (deployed with ``chosen``, ``{fqn: module}`` of the layers outside
    banks, whose dense modules are ``dense``) in its fastest variant that runs on
    ``example_inputs``, and say which in ``report``. ``alternatives`` holds, for layers
    kept dense that have a fitting sparse layout, the fastest one. Contiguous outputs
    (unless ``contiguous`` asked for them anyway) and every layer sparse replace the
    choice if they beat it by ``margin / 2`` in paired timing; the layers go back to
    dense if the model as kept runs slower than dense by ``margin / 2`` (the noise
    between equal models here is about 5 %)."""
    sparse = [f for f, m in chosen.items() if m is not dense[f]]
    if not sparse and not alternatives:
        return
    options = [("as chosen", chosen, contiguous)]
    if sparse and not contiguous:
        options.append(("contiguous outputs", chosen, True))
    if alternatives:
        options.append(("every layer sparse", {**chosen, **alternatives}, contiguous))
    variants = {name: _Variant(name, model, *rest) for name, *rest in options}
    failed = {name: error for name, v in variants.items()
              if (error := _runs(v, example_inputs)) is not None}
    running = {name: v for name, v in variants.items() if name not in failed}
    base = _Variant("dense", model, dense, contiguous)
    notes = [f"{name} failed ({error})" for name, error in failed.items()]
    best, speedup = "dense", 0.0
    if running:
        best, speedup = _fastest(running, base, (example_inputs,), margin, notes)
    if best == "as chosen" and not sparse:
        best, verdict = "dense", "kept as chosen (dense)"
    elif speedup < 1 - margin / 2:
        shortfall = f"ran {speedup:.2f}x dense in paired timing" if running else "failed"
        verdict = f"the deployed model {shortfall}: these layers were put back dense"
        best = "dense"
    else:
        verdict = f"kept {best}, {speedup:.2f}x dense in paired timing"
    (base if best == "dense" else running[best]).install()
    report.model = f"model round on example_inputs ({'; '.join(notes)}): {verdict}"
    for fqn in dict.fromkeys([*sparse, *alternatives]):
        choice = report[fqn]
        choice.reason = f"{choice.reason}; {report.model}"
        if best == "dense":
            choice.layout = "dense"
        elif best == "every layer sparse" and fqn in alternatives:
            choice.layout = alternatives[fqn].layout.describe()
