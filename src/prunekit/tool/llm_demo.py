"""Demo stage (c): one-shot SparseGPT at 50 % on SmolLM2, measured by perplexity.

Runs only when the ``llm`` extra (transformers) is installed, ``prunekit.oneshot``
exists and SmolLM2 is already in the local Hugging Face cache: the demo never downloads.
The text is CPython's own bundled help topics (``pydoc_data``): real English prose that
ships with every Python, split into calibration and evaluation halves.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

from prunekit.errors import UnsupportedError
from prunekit.tool.report import Report
from prunekit.tool.stages import backend, oneshot_stage

__all__ = ["MODEL_ID", "perplexity", "run_llm_stage", "text_chunks"]

MODEL_ID = "HuggingFaceTB/SmolLM2-135M"


def text_chunks(tokenizer: Any, n: int, length: int) -> list[torch.Tensor]:
    """``n`` token windows of ``length`` tokens from the bundled help topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return [ids[i * length : (i + 1) * length].unsqueeze(0) for i in range(n)]


def perplexity(model: Any, chunks: list[torch.Tensor]) -> float:
    """exp of the mean next-token loss over ``chunks``."""
    model.eval()
    with torch.inference_mode():
        losses = [float(model(input_ids=c, labels=c).loss) for c in chunks]
    return math.exp(sum(losses) / len(losses))


def _load_local(model_id: str) -> tuple[Any, Any]:
    if importlib.util.find_spec("transformers") is None:
        raise UnsupportedError("needs the llm extra: pip install 'prunekit[llm]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_id, local_files_only=True)
    except OSError:
        raise UnsupportedError(
            f"{model_id} is not in the local Hugging Face cache; the demo never downloads "
            f"(fetch it once with huggingface-cli download {model_id})"
        ) from None
    return model, tokenizer


def run_llm_stage(report: Report, model_id: str = MODEL_ID, n_chunks: int = 8,
                  length: int = 256) -> None:
    """Prune SmolLM2 to 50 % with SparseGPT and add its perplexities to ``report``'s notes."""
    backend("oneshot")  # fail before loading a model this installation cannot prune
    model, tokenizer = _load_local(model_id)
    chunks = text_chunks(tokenizer, 2 * n_chunks, length)
    calibration, evaluation = chunks[:n_chunks], chunks[n_chunks:]
    before = perplexity(model, evaluation)
    oneshot_stage(model, calibration, method="sparsegpt", sparsity=0.5)
    after = perplexity(model, evaluation)
    report["notes"].append(
        f"(c) {model_id}, SparseGPT 50 %: perplexity {before:.2f} -> {after:.2f} "
        f"on {n_chunks} x {length} held-out tokens of CPython's help topics"
    )
