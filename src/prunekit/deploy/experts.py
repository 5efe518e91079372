"""Expert banks in ``to_sparse``: every expert's projections get a layout of their own.

Inside ``unfused_experts`` each expert is an ``nn.Linear`` (a view of the bank's tensor),
and ``to_sparse`` chooses for it as for any layer, timed on the tokens routed to it. A
bank where some expert got a sparse layout is then replaced for good by its
``ExpertLayers`` holding the chosen modules, which runs only the experts tokens chose.
``layout="auto"`` decides per bank, on the bank's own inputs: the experts' own picks
and each layout for every expert, timed as whole banks, and the fastest must beat the
bank's forward (transformers' grouped or batched kernels, which run all experts at
once) by the margin in paired timing; otherwise the whole bank stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunekit.deploy.auto import Args, confirmed_speedup, time_candidates
from prunekit.deploy.modules import SparseLinear
from prunekit.deploy.report import DeployReport
from prunekit.errors import UnsupportedError
from prunekit.experts import ExpertLayers, put_module, unfused

__all__ = ["bank_of", "check_deployable", "choose_bank", "deploy_banks", "split_choices",
           "stand_in_inputs"]


def bank_of(fqn: str, banks: dict[str, ExpertLayers]) -> str | None:
    """The fqn of the bank whose expert layer ``fqn`` is, if any."""
    return next((bank for bank in banks if fqn.startswith(f"{bank}.")), None)


def check_deployable(banks: dict[str, ExpertLayers], targets: Iterable[str], caller: str
                     ) -> None:  # fmt: skip
    """Refuse, before anything changes, a bank with tensors of its own besides its
    experts' when one of ``targets`` (fqns) is its expert: the deployed layers could not
    carry them."""
    for fqn, layers in banks.items():
        foreign = layers.foreign_tensors()
        if foreign and any(t.startswith(f"{fqn}.") for t in targets):
            raise UnsupportedError(
                f"{caller}: expert bank {fqn!r} ({type(layers.bank).__name__}) holds "
                f"{foreign} besides its experts' weights; prunekit cannot deploy its experts "
                "(leave them out with modules=...)"
            )


def stand_in_inputs(inputs: dict[str, torch.Tensor], banks: dict[str, ExpertLayers]
                    ) -> dict[str, str]:  # fmt: skip
    """Give each expert ``example_inputs`` routed no token to the input of the expert of
    its projection with the median token count (a layer is not timed on no rows); its
    rows' values do not change a kernel's time. Returns ``{fqn: why}`` for each expert
    left without an input (no expert of its projection got a token)."""
    notes: dict[str, str] = {}
    for bank_fqn, layers in banks.items():
        for projection in (layers.up_name, "down_proj"):
            names = [f"{bank_fqn}.{projection}.{e}" for e in range(len(layers.ups))]
            names = [n for n in names if n in inputs]
            routed = sorted((n for n in names if len(inputs[n])), key=lambda n: len(inputs[n]))
            stand_in = routed[(len(routed) - 1) // 2] if routed else None
            for name in names:
                if len(inputs[name]):
                    continue
                if stand_in is None:
                    del inputs[name]
                    notes[name] = "example_inputs routed no token to this projection's experts"
                else:
                    inputs[name] = inputs[stand_in]
                    notes[name] = (f"example_inputs routed no token to it; timed on the input "
                                   f"of {stand_in}")
    return notes


def split_choices(new: dict[str, nn.Module], targets: dict[str, nn.Module],
                  banks: dict[str, ExpertLayers]
                  ) -> tuple[dict[str, nn.Module], dict[str, dict[str, nn.Module]]]:  # fmt: skip
    """``new`` (``{fqn: chosen module}``) split into the layers outside any bank and,
    per bank, its experts that got a module other than their own (``{"down_proj.3":
    module}``): the ones the deployed bank must hold."""
    outside: dict[str, nn.Module] = {}
    per_bank: dict[str, dict[str, nn.Module]] = {fqn: {} for fqn in banks}
    for fqn, module in new.items():
        bank = bank_of(fqn, banks)
        if bank is None:
            outside[fqn] = module
        elif module is not targets[fqn]:
            per_bank[bank][fqn[len(bank) + 1:]] = module
    return outside, per_bank


def _rebuilt(layers: ExpertLayers, modules: dict[str, nn.Module]) -> ExpertLayers:
    """A new ``ExpertLayers`` of the bank with ``modules`` at their names; its other
    layers view the bank."""
    deployed = unfused(layers.bank)
    deployed.call_every_expert = False
    for name, module in modules.items():
        projection, _, expert = name.rpartition(".")
        getattr(deployed, projection)[int(expert)] = module
    return deployed


def _plans(options: dict[str, dict[str, nn.Module]], picks: dict[str, nn.Module]
           ) -> dict[str, dict[str, nn.Module]]:  # fmt: skip
    """What a bank's experts may get, each plan ``{expert fqn: sparse module}``: every
    expert's own pick, and each layout that fits every expert, for all of them (unless
    that is what the picks are)."""
    own = {f: m for f, m in picks.items() if isinstance(m, SparseLinear)}
    plans = {"each expert's pick": own} if own else {}
    by_layout = [{m.layout.name: m for m in candidates.values() if isinstance(m, SparseLinear)}
                 for candidates in options.values()]
    for name in sorted(set.intersection(*(set(c) for c in by_layout)) if by_layout else ()):
        uniform = {fqn: layouts[name] for fqn, layouts in zip(options, by_layout, strict=True)}
        if uniform != own:
            plans[f"every expert {name}"] = uniform
    return plans


def choose_bank(fqn: str, layers: ExpertLayers, options: dict[str, dict[str, nn.Module]],
                picks: dict[str, nn.Module], args: Args, report: DeployReport,
                margin: float) -> dict[str, nn.Module]:  # fmt: skip
    """The sparse modules a bank's experts get (``{expert fqn: module}``; none: the bank
    stays), from ``options`` (each expert's fitting candidates, timed alone) and
    ``picks`` (the fastest of each). Each plan runs as a whole bank on the bank's own
    inputs ``args``, where the weights of all experts compete for the cache as in the
    model (a layer timed alone keeps its weight cached); the fastest must beat the
    bank's own forward by ``margin`` in paired timing. ``report`` says what each got."""
    plans = _plans(options, picks)
    if not plans:
        return {}
    bank = layers.bank
    names = {f: f[len(fqn) + 1:] for f in options}
    deployed = {plan: _rebuilt(layers, {names[f]: m for f, m in modules.items()})
                for plan, modules in plans.items()}
    times = time_candidates({"bank": bank, **deployed}, args)
    best = min(plans, key=times.__getitem__)
    speedup = confirmed_speedup(bank, deployed[best], args)
    kept = speedup * (1.0 - margin) > 1.0
    timed = ", ".join(f"{plan} {ms:.3f} ms" for plan, ms in times.items())
    verdict = (f"bank: {best} fastest ({timed}), {speedup:.2f}x its own forward "
               f"({type(bank).__name__}) in paired timing")
    if not kept:
        verdict += f": below the {margin:.0%} margin, the bank stays"
    for expert in options:
        module = plans[best].get(expert) if kept else None
        choice = report[expert]
        choice.layout = module.layout.describe() if module is not None else "dense"
        choice.reason += f"; {verdict}"
    return plans[best] if kept else {}


def deploy_banks(model: nn.Module, banks: dict[str, ExpertLayers],
                 per_bank: dict[str, dict[str, nn.Module]]) -> None:
    """Replace each bank that has experts in ``per_bank`` by its deployed layers, which
    own their weights; the bank's expert tensors are freed."""
    for fqn, modules in per_bank.items():
        if modules:
            deployed = _rebuilt(banks[fqn], modules)
            deployed.own_weights()
            put_module(model, fqn, deployed)
