"""Recovery of a structurally pruned language model: SmolLM2-135M shrunk by the
dependency-graph engine (channels ranked by calibration activations, as in
``benchmarks.structured_llm``), then fine-tuned briefly with ``prunekit.finetune``,
distilling from the dense model. Held-out perplexity after each eighth of the training
sequences (cut from the calibration split; the held-out text is disjoint), and the
training time. One untuned recipe: Adam at lr 1e-4, one sequence per step, distillation
weight 0.5 at temperature 2.

    python -m benchmarks.structured_llm_recovery [--quick]
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import prunekit
from benchmarks._common import parse_args, write_results
from benchmarks.oneshot import smollm2, tiny_llama
from benchmarks.structured_llm import shrunk
from prunekit.oneshot.data import perplexity

FULL = {"train_seqs": 512, "calib_seqs": 32, "eval_seqs": 32, "seq_len": 256,
        "runs": [("kept", 0.5), ("pruned", 0.25)]}
QUICK = {"calib_seqs": 4, "runs": [("kept", 0.5)]}  # on benchmarks.oneshot's tiny Llama
CHUNKS = 8
RECIPE = {"lr": 1e-4, "kd_alpha": 0.5, "kd_temperature": 2.0}


def _setup(quick: bool) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The model, training sequences (whose first ``calib_seqs`` rank the channels) and
    held-out sequences."""
    if quick:
        return tiny_llama()
    return smollm2(FULL["train_seqs"], FULL["eval_seqs"], FULL["seq_len"])


def recover(dense: nn.Module, model: nn.Module, train: list[torch.Tensor],
            held_out: list[torch.Tensor]) -> list[tuple[int, float, float]]:  # fmt: skip
    """Fine-tune ``model`` on ``train`` in ``CHUNKS`` parts with one optimizer:
    ``(tokens trained, perplexity, training seconds)`` before and after each part."""
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    pairs = [(ids[:, :-1], ids[:, 1:]) for ids in train]
    size = -(-len(pairs) // CHUNKS)
    points, tokens, seconds = [(0, perplexity(model.eval(), held_out), 0.0)], 0, 0.0
    for start in range(0, len(pairs), size):
        chunk = pairs[start : start + size]
        began = time.perf_counter()
        prunekit.finetune(model, chunk, optimizer=optimizer, teacher=dense,
                          kd_alpha=RECIPE["kd_alpha"], kd_temperature=RECIPE["kd_temperature"])
        seconds += time.perf_counter() - began
        tokens += sum(target.numel() for _, target in chunk)
        points.append((tokens, perplexity(model.eval(), held_out), seconds))
    return points


def measure(quick: bool) -> list[dict[str, Any]]:
    sizes = QUICK if quick else FULL
    dense, train, held_out = _setup(quick)
    dense_ppl = perplexity(dense, held_out)
    rows = [{"hidden width": "-", "ratio": 0.0, "tokens trained": 0,
             "perplexity": round(dense_ppl, 2), "x dense ppl": 1.0, "train s": 0.0}]
    for hidden, ratio in sizes["runs"]:
        model = shrunk(dense, train[: sizes["calib_seqs"]], hidden, ratio, "activation")
        for tokens, ppl, seconds in recover(dense, model, train, held_out):
            rows.append({"hidden width": hidden, "ratio": ratio, "tokens trained": tokens,
                         "perplexity": round(ppl, 2), "x dense ppl": round(ppl / dense_ppl, 2),
                         "train s": round(seconds, 1)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = parse_args(__doc__)
    torch.manual_seed(args.seed)
    dense_model_note = ("Tiny random Llama, random tokens (smoke test)" if args.quick else
                        f"SmolLM2-135M-Instruct; {FULL['train_seqs']} training sequences of "
                        f"{FULL['seq_len']} tokens (the first {FULL['calib_seqs']} also rank "
                        f"the channels), {FULL['eval_seqs']} held-out, disjoint")
    notes = (f"{dense_model_note}. Channels ranked by `ActivationImportance`; `ratio` and "
             "`hidden width` as in `structured_llm` (speed-ups there). Fine-tune: "
             f"`prunekit.finetune`, Adam lr {RECIPE['lr']}, one sequence per step, "
             f"distillation from the dense model (alpha {RECIPE['kd_alpha']}, temperature "
             f"{RECIPE['kd_temperature']}), {CHUNKS} parts with one optimizer; `train s`: "
             "training time so far.")
    rows = measure(args.quick)
    path = write_results("structured_llm_recovery", rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
