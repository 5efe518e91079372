"""Demo stage (c): one-shot SparseGPT at 50 % on SmolLM2-135M, measured by perplexity.

Runs only when the ``llm`` extra and the offline model and text packages are installed
(``prunekit.oneshot.data`` says which, and how to install them); nothing is downloaded.
Calibration and evaluation use disjoint halves of English Wikipedia summaries.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from prunekit.errors import UnsupportedError
from prunekit.tool.report import Report
from prunekit.tool.stages import backend, oneshot_stage

__all__ = ["run_llm_stage"]

LABEL = "(c) SmolLM2-135M, SparseGPT 50%"


def _data_module() -> Any:
    try:
        return importlib.import_module("prunekit.oneshot.data")
    except ImportError:
        raise UnsupportedError("this prunekit installation has no prunekit.oneshot.data") \
            from None


def run_llm_stage(report: Report, n_seqs: int = 8, seq_len: int = 128,
                  eval_seqs: int = 4) -> None:
    """Prune SmolLM2 to 50 % with SparseGPT (``n_seqs`` x ``seq_len`` calibration tokens,
    sized for the demo's time budget); add perplexity before/after to ``report``."""
    backend("oneshot")  # fail before loading a model this installation cannot prune
    data = _data_module()
    model, tokenizer = data.load_smollm2()
    calibration_texts, held_out = data.split_texts(data.wiki_summaries(), holdout=0.5)
    calibration = data.token_batches(tokenizer, calibration_texts, n_seqs, seq_len)
    evaluation = data.token_batches(tokenizer, held_out, eval_seqs, seq_len)
    with torch.inference_mode():
        before = data.perplexity(model, evaluation)
    levels = oneshot_stage(model, calibration, method="sparsegpt", sparsity=0.5)
    with torch.inference_mode():
        after = data.perplexity(model, evaluation)
    zeros = sum(levels.values()) / len(levels)
    report["llm"] = {"model": "SmolLM2-135M-Instruct", "method": "sparsegpt", "sparsity": 0.5,
                     "perplexity_before": before, "perplexity_after": after,
                     "mean_layer_sparsity": zeros, "layers": len(levels),
                     "calibration": f"{n_seqs} x {seq_len} tokens",
                     "evaluation": f"{eval_seqs} x {seq_len} tokens"}
    report["notes"].append(
        f"{LABEL}: perplexity {before:.2f} -> {after:.2f} on {eval_seqs} x {seq_len} held-out "
        f"Wikipedia tokens; {len(levels)} decoder Linear layers at {zeros:.1%} mean sparsity"
    )
