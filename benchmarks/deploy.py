"""Sparse inference speed: prunekit.deploy layouts vs dense fp32 and dense dynamic int8.

Run: ``python -m benchmarks.deploy [--quick] [--dtype bfloat16]``. BERT-base sizes:
Linear 768->3072 (fc1), 3072->768 (fc2) and the encoder MLP (fc1-GELU-fc2), 1/32/128
tokens, 50/70/90/95% sparsity, unstructured and in 1x4, 4x4, 16x16 blocks. Each cell
compares with dense fp32, in one process on the same input: dense dynamic int8 (torch
quantize_dynamic), CSR, BSR (square blocks; MKL takes no other on the CPU), prunekit's
row-block kernel (h x c blocks inferred from the zeros: 1 x 1 for unstructured), sparse
dynamic int8 (``sparse_quantize``, 1x4 blocks, qnnpack), ``to_sparse(layout="auto")``
and an exact copy of the dense model (``dense_twin``: the noise between equals). Columns
``*_x`` are speed-ups over dense fp32 (> 1: faster), each the median ratio over
``repeats`` ABBA blocks timed against dense alone
(``prunekit.deploy.auto.paired_samples``): a rotation through every library's kernels
and thread pools left drift larger than the few percent "auto is never slower" is about,
and single AB pairs flip by the cost of a switch. All tensors come from the heap
(``heap_allocations``), so a deep copy of the model reads its weights as fast as the
original. Every cell seeds its own weights, so a cell that ran disturbed (the host
stalled the VM, or another process oversubscribed the cores) is re-measured on the same
weights (``remeasure_stalls``).

``--dtype bfloat16`` (or ``float16``) runs the model in that dtype against dense in
that dtype (``results/deploy-bfloat16.md``): torch's CPU CSR/BSR kernels and its int8
path take float32 only, so the row-block kernel and ``auto`` are the sparse columns.
"""

from __future__ import annotations

import copy
import gc
import operator
import statistics
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import quantize_dynamic

from benchmarks._common import heap_allocations, parse_args, write_results
from prunekit.deploy import sparse_quantize, to_sparse
from prunekit.deploy.auto import paired_samples

FULL = {
    "shapes": {"fc1": [(768, 3072)], "fc2": [(3072, 768)], "mlp": [(768, 3072), (3072, 768)]},
    "tokens": [1, 32, 128],
    "sparsity": [0.5, 0.7, 0.9, 0.95],
    "patterns": {"unstructured": (1, 1), "1x4": (1, 4), "4x4": (4, 4), "16x16": (16, 16)},
}
QUICK = {
    "shapes": {"mlp": [(128, 512), (512, 128)]},
    "tokens": [1, 32],
    "sparsity": [0.5, 0.9],
    "patterns": {"unstructured": (1, 1), "16x16": (16, 16)},
}
SPARSE = ["csr", "bsr", "row_blocks", "sparse_int8"]
FLOAT32_ONLY = {"int8", "csr", "bsr", "sparse_int8"}  # torch's CPU kernels for these
DENSE_NAMES = {"float32": "dense fp32", "bfloat16": "dense bf16", "float16": "dense fp16"}
STALL, STALL_TRIES = 1.3, 3


def masked_weight(out_f: int, in_f: int, block: tuple[int, int], sparsity: float) -> torch.Tensor:
    """A random weight with ``sparsity`` of its ``block``s zeroed (lowest-scoring blocks)."""
    scores = torch.rand(out_f // block[0], in_f // block[1])
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().argsort()[:k]] = False
    mask = keep.reshape(scores.shape).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return torch.randn(out_f, in_f) * 0.02 * mask


def make_model(dims: list[tuple[int, int]], block: tuple[int, int], sparsity: float) -> nn.Module:
    layers: list[nn.Module] = []
    for in_f, out_f in dims:
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(masked_weight(out_f, in_f, block, sparsity))
        layers += [lin, nn.GELU()]
    return nn.Sequential(*layers[:-1]).eval()


def candidates(model: nn.Module, x: torch.Tensor, pattern: str) -> tuple[dict[str, nn.Module], str]:
    """Every deployment of ``model`` that runs in its dtype, and what auto chose per layer."""
    builders: dict[str, Callable[[nn.Module], nn.Module]] = {
        "dense_twin": copy.deepcopy,  # gauges the timing noise between equals
        "int8": lambda m: quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8),
        "csr": lambda m: to_sparse(m, layout="csr"),
        "row_blocks": lambda m: to_sparse(m, layout="row_blocks"),
        "sparse_int8": sparse_quantize,
    }
    if pattern in ("4x4", "16x16"):
        builders["bsr"] = lambda m: to_sparse(m, layout="bsr")
    if x.dtype != torch.float32:
        builders = {k: v for k, v in builders.items() if k not in FLOAT32_ONLY}
    models = {"dense": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models |= {name: build(model) for name, build in builders.items()}
    models["auto"] = to_sparse(model, x)
    chosen = "/".join(models["auto"].deploy_report.chosen().values())
    return models, chosen


def cell(shape: str, dims: list, tokens: int, pattern: str, block: tuple, sparsity: float,
         repeats: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(zlib.crc32(repr((shape, tokens, pattern, sparsity)).encode()))
    model = make_model(dims, block, sparsity).to(dtype)
    x = torch.randn(tokens, dims[0][0]).to(dtype)
    models, chosen = candidates(model, x, pattern)
    dense_s: list[float] = []
    speedups: dict[str, float] = {}
    for name, other in models.items():
        if name != "dense":
            base_s, other_s = paired_samples(model, other, x, repeats)
            speedups[name] = statistics.median(map(operator.truediv, base_s, other_s))
            dense_s += base_s
    row: dict[str, Any] = {
        "shape": shape, "tokens": tokens, "pattern": pattern, "sparsity": sparsity,
        "dense_ms": 1e3 * statistics.median(dense_s), "int8_x": speedups.get("int8"),
    }  # fmt: skip
    for name in SPARSE:
        row[f"{name}_x"] = speedups.get(name)
    row["auto_x"] = speedups["auto"]
    row["dense_twin_x"] = speedups["dense_twin"]
    row["auto_chose"] = chosen
    return row


def _disturbance(row: dict[str, Any], dense_limit: float, lower: dict[str, Any] | None
                 ) -> float:  # fmt: skip
    """How far past plausible ``row`` ran (> 1: disturbed). Dense time does not
    depend on the zeros, so it may not exceed ``dense_limit``; a sparse layout's work
    only shrinks as sparsity rises, so its speed-up may not fall by ``STALL`` from the
    cell ``lower`` (same shape, tokens and pattern, the next sparsity down)."""
    worst = row["dense_ms"] / dense_limit
    if lower is None:
        return worst
    pairs = [(lower[f"{name}_x"], row[f"{name}_x"]) for name in SPARSE]
    return max([worst, *(before / (STALL * now) for before, now in pairs
                         if before is not None and now is not None)])


def remeasure_stalls(
    rows: list[dict[str, Any]], measure: Callable[[dict[str, Any]], dict[str, Any]]
) -> int:
    """Re-measure (up to ``STALL_TRIES`` times, keeping the least disturbed) every cell
    that ran disturbed (``_disturbance``): dense over ``STALL`` x the median of its
    shape and token count (the host stalled this VM: every model of the cell 3-7x slower
    for seconds), or a sparse layout ``STALL`` x slower than at the sparsity below (its
    kernel's threads fought another process's: 20-50x slower, dense barely touched).
    Cells are visited from low to high sparsity, so each is judged against a settled
    one. Returns how many cells were re-measured."""
    medians: dict[tuple, float] = {}
    for key in {(r["shape"], r["tokens"]) for r in rows}:
        medians[key] = statistics.median(
            r["dense_ms"] for r in rows if (r["shape"], r["tokens"]) == key)
    redone = 0
    lower: dict[tuple, dict[str, Any]] = {}
    for i, row in sorted(enumerate(rows), key=lambda item: item[1]["sparsity"]):
        group = (row["shape"], row["tokens"], row["pattern"])
        limit = STALL * medians[(row["shape"], row["tokens"])]
        score = _disturbance(row, limit, lower.get(group))
        if score > 1.0:
            redone += 1
            for _ in range(STALL_TRIES):
                again = measure(row)
                again_score = _disturbance(again, limit, lower.get(group))
                if again_score < score:
                    row, score = again, again_score
                if score <= 1.0:
                    break
            rows[i] = row
        lower[group] = row
    return redone


def crossover(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, tokens, pattern) and layout: the lowest sparsity from which the layout
    beats dense at every higher sparsity measured ("-" if it never does)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["tokens"], row["pattern"]), []).append(row)
    out = []
    for (shape, tokens, pattern), group in groups.items():
        group = sorted(group, key=lambda r: r["sparsity"])
        entry: dict[str, Any] = {"shape": shape, "tokens": tokens, "pattern": pattern}
        for name in SPARSE:
            beats = [r[f"{name}_x"] is not None and r[f"{name}_x"] > 1.0 for r in group]
            first = next((i for i in range(len(group)) if all(beats[i:])), None)
            entry[name] = f"{group[first]['sparsity']:.0%}" if first is not None else "-"
        out.append(entry)
    return out


def _all_dense(row: dict[str, Any]) -> bool:
    return set(row["auto_chose"].split("/")) == {"dense"}


def summary(rows: list[dict[str, Any]], dense: str) -> list[str]:
    """The headline figures; ``dense`` names the baseline (``dense fp32``)."""
    worst = min(rows, key=lambda r: r["auto_x"])
    low = sum(r["auto_x"] < 0.95 for r in rows)
    lines = [
        f"- auto/dense speed ratio: min {worst['auto_x']:.2f} ({worst['shape']}, "
        f"{worst['tokens']} tokens, {worst['pattern']}, {worst['sparsity']:.0%}); "
        f"{low} of {len(rows)} cells below 0.95 (target: none).",
        f"- of those, auto kept every layer dense (the same modules as dense) in "
        f"{sum(r['auto_x'] < 0.95 and _all_dense(r) for r in rows)}; the timing noise "
        f"between equals: an exact copy of the dense model measured "
        f"{min(r['dense_twin_x'] for r in rows):.2f}-{max(r['dense_twin_x'] for r in rows):.2f}x "
        "dense across the cells.",
    ]
    for tokens in (32, 128):
        picked = [r for r in rows if r["tokens"] == tokens and r["pattern"] != "unstructured"
                  and abs(r["sparsity"] - 0.9) < 1e-9]  # fmt: skip
        for r in picked:
            best = max(SPARSE, key=lambda n: r[f"{n}_x"] or 0.0)
            lines.append(
                f"- 90% {r['pattern']} blocks, {r['shape']}, {tokens} tokens: best sparse "
                f"{best} {r[f'{best}_x']:.2f}x {dense} (target >= 1.5x)"
            )
    return lines


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv,
                      [("--dtype", "float32 (default), bfloat16 or float16")])
    name = args.dtype or "float32"
    if name not in DENSE_NAMES:
        raise SystemExit(f"--dtype must be one of {list(DENSE_NAMES)}, got {name!r}")
    dtype, dense = getattr(torch, name), DENSE_NAMES[name]
    heap_allocations()
    gc.freeze()  # interleaved() collects before every call; skip torch's import-time objects
    config = QUICK if args.quick else FULL
    def measure(row: dict[str, Any]) -> dict[str, Any]:
        shape, pattern = row["shape"], row["pattern"]
        return cell(shape, config["shapes"][shape], row["tokens"], pattern,
                    config["patterns"][pattern], row["sparsity"], args.repeats, dtype)

    rows = [
        measure({"shape": shape, "tokens": tokens, "pattern": pattern, "sparsity": sparsity})
        for shape in config["shapes"] for tokens in config["tokens"]
        for pattern in config["patterns"] for sparsity in config["sparsity"]
    ]
    redone = remeasure_stalls(rows, measure)
    notes = "\n".join(
        [*summary(rows, dense), f"- {redone} cells re-measured as disturbed ({dense} more than "
         f"{STALL}x the median of its shape and tokens, or a sparse layout {STALL}x slower "
         "than at the sparsity below).", "",
         f"Crossover sparsity (beats {dense} from here up):", "", markdown(crossover(rows))]
    )  # fmt: skip
    stem = "deploy" if dtype == torch.float32 else f"deploy-{name}"
    path = write_results(stem, rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
