"""Structured pruning of a pretrained language model: SmolLM2-135M shrunk by the
dependency-graph engine, scored by weight norms (``l2``, Torch-Pruning's default) or by
calibration activations (``ActivationImportance``), side by side in one process.

For each ratio of channels (MLP width and key/value groups with their query heads, and
the hidden width or not), no fine-tuning: held-out Wikipedia perplexity, parameters, MACs,
prefill latency (one 128-token sequence) and decode latency (one token after a 128-token
cache) against the dense model (interleaved medians), plan time, and whether a model
rebuilt from the updated config computes the same logits. Torch-Pruning is not a peer
here: on a 2-layer transformers Llama it did not finish planning in 10 minutes.

    python -m benchmarks.structured_llm [--quick]
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import interleaved, parse_args, ratio, write_results
from benchmarks.oneshot import smollm2, tiny_llama
from prunekit.oneshot.data import perplexity
from prunekit.structured.engine import ActivationImportance, prune

FULL = {"calib_seqs": 32, "eval_seqs": 32, "seq_len": 256,
        "runs": [("pruned", r) for r in (0.125, 0.25, 0.5)] + [("kept", r) for r in (0.25, 0.5)]}
QUICK = {"runs": [("pruned", 0.25), ("kept", 0.25)]}  # on benchmarks.oneshot's tiny Llama
SCORES = ("l2", "activation", "wanda")
PROMPT = 128


def _setup(quick: bool) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    if quick:
        return tiny_llama()
    model, calibration, held_out = smollm2(FULL["calib_seqs"], FULL["eval_seqs"], FULL["seq_len"])
    return model.eval(), calibration, held_out


def _macs(model: nn.Module, ids: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(ids)
    return counter.get_total_flops() // 2


def _decode_step(model: nn.Module, prompt: torch.Tensor) -> Any:
    """One new token after ``prompt``, its keys and values cached: what generation
    repeats. The cache is cut back to the prompt after every step."""
    with torch.inference_mode():
        cache = model(prompt, use_cache=True).past_key_values
    last = prompt[:, -1:]

    def step() -> None:
        with torch.inference_mode():
            model(last, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the new token again

    return step


def _latencies(dense: nn.Module, pruned: nn.Module, prompt: torch.Tensor, repeats: int
               ) -> dict[str, float]:  # fmt: skip
    """Dense / pruned speed ratios, each model timed in turn (interleaved medians)."""
    def prefill(model: nn.Module) -> Any:
        return lambda: model(prompt, use_cache=False)

    with torch.inference_mode():
        fill = interleaved({"dense": prefill(dense), "pruned": prefill(pruned)}, repeats)
    step = interleaved({"dense": _decode_step(dense, prompt),
                        "pruned": _decode_step(pruned, prompt)}, repeats)  # fmt: skip
    return {"prefill x": ratio(fill["dense"], fill["pruned"]),
            "decode x": ratio(step["dense"], step["pruned"])}  # fmt: skip


def _rebuilds(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether a model built from the (updated) config loads the weights and computes the
    same logits: what save_pretrained / from_pretrained rely on."""
    rebuilt = type(model)(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.inference_mode():
        return torch.equal(rebuilt(ids).logits, model(ids).logits)


def shrunk(dense: nn.Module, calibration: list[torch.Tensor], hidden: str, ratio: float,
           score: str) -> nn.Module:  # fmt: skip
    """A copy of ``dense`` with ``ratio`` of its channels removed, ranked by ``score``;
    ``hidden="kept"`` keeps the residual stream's width (the embedding is ignored)."""
    model = copy.deepcopy(dense)
    importance = score if score == "l2" else ActivationImportance(model, calibration, score=score)
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    ignored = [embedding] if hidden == "kept" else []
    prune(model, calibration[0], ratio=ratio, importance=importance,
          ignored_layers=ignored).apply()
    return model


def measure(quick: bool, repeats: int) -> list[dict[str, Any]]:
    sizes = QUICK if quick else FULL
    dense, calibration, held_out = _setup(quick)
    prompt = held_out[0][:, :PROMPT]
    dense_ppl = perplexity(dense, held_out)
    dense_params = sum(p.numel() for p in dense.parameters())
    dense_macs = _macs(dense, prompt)
    rows = [{"hidden width": "-", "importance": "dense", "ratio": 0.0,
             "perplexity": round(dense_ppl, 2), "x dense ppl": 1.0,
             "params M": round(dense_params / 1e6, 1), "MACs x": 1.0,
             "prefill x": 1.0, "decode x": 1.0, "plan s": 0.0, "config rebuilds": True}]
    for hidden, r in sizes["runs"]:
        for score in SCORES:
            start = time.perf_counter()
            model = shrunk(dense, calibration, hidden, r, score)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, held_out)
            rows.append({
                "hidden width": hidden, "importance": score, "ratio": r,
                "perplexity": round(ppl, 2),
                "x dense ppl": round(ppl / dense_ppl, 2),
                "params M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "MACs x": round(dense_macs / _macs(model, prompt), 2),
                **{k: round(v, 2) for k, v in _latencies(dense, model, prompt, repeats).items()},
                "plan s": round(seconds, 1), "config rebuilds": _rebuilds(model, prompt),
            })
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = parse_args(__doc__)
    torch.manual_seed(args.seed)
    rows = measure(args.quick, 3 if args.quick else args.repeats)
    what = ("Tiny random Llama, random tokens (smoke test)" if args.quick else
            f"SmolLM2-135M-Instruct; {FULL['calib_seqs']} calibration and "
            f"{FULL['eval_seqs']} held-out sequences of {FULL['seq_len']} tokens "
            "(Wikipedia summaries, disjoint)")
    notes = (f"{what}. `ratio`: share of the channels of every group removed (MLP width, "
             "key/value groups with their query heads and, where `hidden width` is `pruned`, "
             "the residual stream; `kept`: the embedding is an ignored layer); no fine-tuning. "
             "`prefill x` / `decode x`: dense time over pruned time, interleaved medians, "
             f"a {PROMPT}-token prompt / one token after it. `plan s`: scoring, capture, "
             "planning and apply.")
    path = write_results("structured_llm", rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
