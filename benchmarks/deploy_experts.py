"""Sparse inference of mixture-of-experts blocks: ``to_sparse`` on transformers' expert banks.

Run: ``python -m benchmarks.deploy_experts [--quick]``. A Mixtral MoE block (router and
an expert bank of 3-D weights), two bank shapes of equal size (37.7 M weights, 151 MB):
8 experts of width 2048, top-2 (Mixtral's shape, scaled), and 32 fine-grained experts of
width 512, top-4 (OLMoE, Qwen3-MoE, DeepSeek style); hidden size 768. 1, 32 and 128
tokens; 50/70/90/95% of every expert's weights zero, unstructured or in 4x4 blocks.
The baseline is the dense block as transformers runs it by default (``grouped_mm``:
one grouped matmul for all experts); ``eager_x`` is transformers' own per-expert loop.
Each deployed block holds every expert in one layout (``csr``, ``row_blocks``, ``bsr``
for 4x4 blocks) or what ``to_sparse(layout="auto")`` chose per expert, after its check
of the whole bank against the bank's own forward; ``dense_twin`` is an exact copy of
the dense block (the noise between equals). ``*_x`` columns are speed-ups over the
baseline (> 1: faster), each the median ratio over ``repeats`` ABBA blocks
(``prunekit.deploy.auto.paired_samples``).
"""

from __future__ import annotations

import collections
import copy
import gc
import operator
import statistics
import zlib
from typing import Any

import torch
from torch import nn

from benchmarks._common import heap_allocations, parse_args, write_results
from benchmarks.deploy import masked_weight
from prunekit.deploy import to_sparse
from prunekit.deploy.auto import paired_samples
from prunekit.experts import unfused_experts

HIDDEN = 768
FULL = {
    "banks": {"8x2048 top-2": (8, 2048, 2), "32x512 top-4": (32, 512, 4)},
    "tokens": [1, 32, 128],
    "sparsity": [0.5, 0.7, 0.9, 0.95],
    "patterns": {"unstructured": (1, 1), "4x4": (4, 4)},
}
QUICK = {
    "banks": {"4x128 top-2": (4, 128, 2)},
    "tokens": [1, 32],
    "sparsity": [0.5, 0.9],
    "patterns": {"unstructured": (1, 1), "4x4": (4, 4)},
}
LAYOUTS = ["eager", "csr", "row_blocks", "bsr", "auto"]


def moe_block(experts: int, width: int, top_k: int, block: tuple[int, int], sparsity: float
              ) -> nn.Module:  # fmt: skip
    """A Mixtral MoE block whose every expert weight (``out x in``) has ``sparsity`` of its
    ``block``s zero."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=width,
                           num_local_experts=experts, num_experts_per_tok=top_k)
    config._experts_implementation = "grouped_mm"
    model = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        model.gate.weight.normal_(0, 0.02)
        with unfused_experts(model) as banks:
            for bank in banks.values():
                for layer in [*bank.ups, *bank.down_proj]:
                    layer.weight.copy_(masked_weight(*layer.weight.shape, block, sparsity))
    return model


def deployments(model: nn.Module, x: torch.Tensor, pattern: str
                ) -> tuple[dict[str, nn.Module], str]:  # fmt: skip
    """Every deployment of ``model``, and what auto chose (layouts counted over experts)."""
    eager = copy.deepcopy(model)
    eager.experts.config._experts_implementation = "eager"
    models = {
        "dense_twin": copy.deepcopy(model),
        "eager": eager,
        "csr": to_sparse(model, layout="csr"),
        "row_blocks": to_sparse(model, layout="row_blocks"),
    }
    if pattern != "unstructured":
        models["bsr"] = to_sparse(model, layout="bsr")
    models["auto"] = to_sparse(model, x)
    counts = collections.Counter(models["auto"].deploy_report.chosen().values())
    return models, " ".join(f"{layout}:{n}" for layout, n in sorted(counts.items()))


def cell(bank: str, shape: tuple[int, int, int], tokens: int, pattern: str,
         block: tuple[int, int], sparsity: float, repeats: int) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(zlib.crc32(repr((bank, tokens, pattern, sparsity)).encode()))
    model = moe_block(*shape, block, sparsity)
    x = torch.randn(1, tokens, HIDDEN)
    models, chosen = deployments(model, x, pattern)
    dense_s: list[float] = []
    row: dict[str, Any] = {"bank": bank, "tokens": tokens, "pattern": pattern,
                           "sparsity": sparsity}
    speedups = {}
    for name, other in models.items():
        base_s, other_s = paired_samples(model, other, x, repeats)
        speedups[name] = statistics.median(map(operator.truediv, base_s, other_s))
        dense_s += base_s
    row["dense_ms"] = 1e3 * statistics.median(dense_s)
    row.update({f"{name}_x": speedups.get(name) for name in [*LAYOUTS, "dense_twin"]})
    row["auto_chose"] = chosen
    return row


def summary(rows: list[dict[str, Any]]) -> list[str]:
    worst = min(rows, key=lambda r: r["auto_x"])
    lines = [
        f"- auto / dense block (grouped_mm): min {worst['auto_x']:.2f} ({worst['bank']}, "
        f"{worst['tokens']} tokens, {worst['pattern']}, {worst['sparsity']:.0%}); "
        f"{sum(r['auto_x'] < 0.95 for r in rows)} of {len(rows)} cells below 0.95; an exact "
        f"copy of the dense block measured {min(r['dense_twin_x'] for r in rows):.2f}-"
        f"{max(r['dense_twin_x'] for r in rows):.2f}x.",
    ]
    for r in rows:
        if abs(r["sparsity"] - 0.9) < 1e-9:
            best = max(LAYOUTS[1:-1], key=lambda n: r[f"{n}_x"] or 0.0)
            lines.append(f"- 90% {r['pattern']}, {r['bank']}, {r['tokens']} tokens: best "
                         f"{best} {r[f'{best}_x']:.2f}x, auto {r['auto_x']:.2f}x "
                         f"({r['auto_chose']})")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    heap_allocations()
    gc.freeze()
    config = QUICK if args.quick else FULL
    rows = [
        cell(bank, shape, tokens, pattern, config["patterns"][pattern], sparsity, args.repeats)
        for bank, shape in config["banks"].items() for tokens in config["tokens"]
        for pattern in config["patterns"] for sparsity in config["sparsity"]
    ]
    path = write_results("deploy_experts", rows, notes="\n".join(summary(rows)),
                         quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
