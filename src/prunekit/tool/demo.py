"""``prunekit demo``: train a small CNN on the bundled digits, prune it three ways and
report before/after figures.

(a) gradual unstructured pruning to 90 % with ``CubicSL`` while fine-tuning; (b) 50 %
channel pruning with a short fine-tune, when ``prunekit.structured.prune`` exists;
(c) one-shot SparseGPT on SmolLM2 when the ``llm`` extra and the model are installed
offline (see ``prunekit.tool.llm_demo``). Every model is saved as a pickle-free
checkpoint next to the report.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit.errors import PruneKitError
from prunekit.tool.checkpoint import save
from prunekit.tool.digits import Digits, DigitsCNN, accuracy, load_digits, train_epoch
from prunekit.tool.measure import layer_table, summarize
from prunekit.tool.report import Report, add_model, make_report
from prunekit.tool.stages import structured_stage, unstructured_stage

__all__ = ["DemoSettings", "run_demo"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Epoch counts and repeats; ``fast()`` is the seconds-long variant the tests run."""

    train_epochs: int = 12
    prune_epochs: int = 12
    structured_epochs: int = 4
    structured_ratio: float = 0.5
    sparsity: float = 0.9
    latency_repeats: int = 50
    lr: float = 3e-3
    llm: bool = True
    cnn_threads: int = 1  # a tiny CNN: more threads only add synchronisation

    @classmethod
    def fast(cls) -> DemoSettings:
        return cls(train_epochs=2, prune_epochs=3, structured_epochs=1, latency_repeats=3,
                   llm=False)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="epoch", leave=False, disable=not progress or None)


def _train(model: torch.nn.Module, data: Digits, epochs: int, lr: float, desc: str,
           progress: bool) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with _bar(epochs, desc, progress) as bar:
        for _ in range(epochs):
            loss = train_epoch(model, data, optimizer)
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()


def _stage_unstructured(dense: torch.nn.Module, data: Digits, s: DemoSettings,
                        progress: bool) -> tuple[torch.nn.Module, list[list[float]]]:
    """(a): prune to ``s.sparsity`` along a cubic schedule, one fine-tune epoch per step."""
    model = copy.deepcopy(dense)
    curve: list[list[float]] = []
    bar = _bar(s.prune_epochs, "(a) unstructured", progress)
    optimizer: list[torch.optim.Optimizer] = []

    def fine_tune(step: int, level: float) -> None:
        if not optimizer:  # built after prepare, when weights sit in their parametrizations
            optimizer.append(torch.optim.Adam(model.parameters(), lr=s.lr / 3))
        train_epoch(model, data, optimizer[0])
        curve.append([level, accuracy(model, data)])
        bar.set_postfix(sparsity=f"{level:.0%}", acc=f"{curve[-1][1]:.1%}")
        bar.update()

    with bar:
        unstructured_stage(model, s.sparsity, steps=s.prune_epochs, between_steps=fine_tune)
    return model, [[0.0, accuracy(dense, data)], *curve]


def _stage_structured(dense: torch.nn.Module, data: Digits, s: DemoSettings,
                      progress: bool) -> torch.nn.Module:
    """(b): remove ``s.structured_ratio`` of the channels, then fine-tune briefly."""
    model = copy.deepcopy(dense)
    structured_stage(model, (data.x_test[:1],), ratio=s.structured_ratio)
    _train(model, data, s.structured_epochs, s.lr / 3, "(b) structured fine-tune", progress)
    return model


def _record(report: Report, label: str, model: torch.nn.Module, data: Digits,
            s: DemoSettings, out: Path) -> None:
    example = (data.x_test[:1],)
    add_model(report, label, summarize(model, example, s.latency_repeats),
              layer_table(model, example), accuracy(model, data))
    save(model, out / "checkpoints" / label.split()[0], overwrite=True)


def _optional(name: str, report: Report, fn: Callable[[], Any]) -> Any:
    """Run an optional stage; a missing backend, package or model file becomes a note in
    the report instead of ending the demo."""
    try:
        return fn()
    except (PruneKitError, ImportError, OSError) as exc:
        report["notes"].append(f"{name} skipped: {exc}")
        _log.debug("%s skipped: %s", name, exc)
        return None


def run_demo(out: Path, settings: DemoSettings | None = None, seed: int = 0,
             progress: bool = True) -> Report:
    """Run the whole demo, saving checkpoints under ``out/checkpoints``; returns the report
    (the caller writes it with ``write_report``)."""
    s = settings or DemoSettings()
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(s.cnn_threads)
    try:
        report = _cnn_stages(out, s, seed, progress)
    finally:
        torch.set_num_threads(threads)
    if s.llm:
        from prunekit.tool.llm_demo import run_llm_stage

        _optional("(c) one-shot SparseGPT on SmolLM2", report, lambda: run_llm_stage(report))
    else:
        report["notes"].append("(c) one-shot SparseGPT on SmolLM2: not run in fast mode")
    report["notes"].append(
        "checkpoints: prunekit.load(prunekit.tool.DigitsCNN, 'checkpoints/<name>')")
    return report


def _cnn_stages(out: Path, s: DemoSettings, seed: int, progress: bool) -> Report:
    """The digits part: dense training, then stages (a) and (b)."""
    data = load_digits(seed)
    report = make_report("prunekit demo: digits CNN", "demo", "accuracy")
    dense = DigitsCNN()
    _train(dense, data, s.train_epochs, s.lr, "dense training", progress)
    _record(report, "dense", dense, data, s, out)
    sparse, curve = _stage_unstructured(dense, data, s, progress)
    report["curves"]["(a) unstructured + CubicSL"] = curve
    _record(report, f"unstructured {s.sparsity:.0%}", sparse, data, s, out)
    slim = _optional("(b) structured", report, lambda: _stage_structured(dense, data, s, progress))
    if slim is not None:
        _record(report, f"structured {s.structured_ratio:.0%}", slim, data, s, out)
    return report
