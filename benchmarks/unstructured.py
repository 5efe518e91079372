"""prunekit vs torch.ao.pruning: WeightNormSparsifier step, mask memory, masked forward, squash.

Run: ``python -m benchmarks.unstructured [--quick]``. Full size: 8 x Linear(4096, 4096)
(134M parameters). Ratios are reference / prunekit (> 1: prunekit is faster or smaller),
except the forward columns, which are slowdowns against the plain model (lower is better).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.ao import pruning as reference

import prunekit
from benchmarks._common import interleaved, parse_args, ratio, write_results

CONFIGS = {
    "unstructured 1x1, 50%": {
        "sparsity_level": 0.5,
        "sparse_block_shape": (1, 1),
        "zeros_per_block": 1,
    },
    "blocks 1x4, 50%": {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4},
    "2:4": {"sparsity_level": 1.0, "sparse_block_shape": (1, 4), "zeros_per_block": 2},
}
MIB = 2**20


def make_model(width: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def transient_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory during ``fn`` above the resident memory before it.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``), so every allocation
    torch makes counts, not only Python's.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def mask_bytes(sparsifier: object) -> int:
    masks = [s["mask"] for s in sparsifier.state.values() if "mask" in s]
    return sum(m.numel() * m.element_size() for m in masks)


def bench_config(name: str, config: dict, base: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    models = {"prunekit": copy.deepcopy(base), "reference": copy.deepcopy(base)}
    sparsifiers = {
        "prunekit": prunekit.WeightNormSparsifier(**config),
        "reference": reference.WeightNormSparsifier(**config),
    }
    for lib, sparsifier in sparsifiers.items():
        sparsifier.prepare(models[lib], None)
    steps = interleaved({lib: s.step for lib, s in sparsifiers.items()}, repeats=repeats)
    transient = {lib: transient_bytes(s.step) for lib, s in sparsifiers.items()}
    masks = {lib: mask_bytes(s) for lib, s in sparsifiers.items()}
    differing = sum(
        int((a.parametrizations.weight[0].mask != b.parametrizations.weight[0].mask.bool()).sum())
        for a, b in zip(models["prunekit"][::2], models["reference"][::2], strict=True)
    )
    with torch.inference_mode():
        forward = interleaved(
            {"plain": lambda: base(x), **{lib: (lambda m=m: m(x)) for lib, m in models.items()}},
            repeats=repeats * 4,
        )
    squash = {}
    for lib, sparsifier in sparsifiers.items():
        start = time.perf_counter()
        sparsifier.squash_mask()
        squash[lib] = time.perf_counter() - start
    return {
        "config": name,
        "mask entries differing from ref": differing,
        "step ref (s)": steps["reference"],
        "step prunekit (s)": steps["prunekit"],
        "step speed-up": ratio(steps["reference"], steps["prunekit"]),
        "masks ref (MiB)": masks["reference"] / MIB,
        "masks prunekit (MiB)": masks["prunekit"] / MIB,
        "mask memory ratio": ratio(masks["reference"], masks["prunekit"]),
        "step transient ref (MiB)": transient["reference"] / MIB,
        "step transient prunekit (MiB)": transient["prunekit"] / MIB,
        "transient ratio": ratio(transient["reference"], max(transient["prunekit"], 1)),
        "forward plain (ms)": forward["plain"] * 1e3,
        "forward ref / plain": forward["reference"] / forward["plain"],
        "forward prunekit / plain": forward["prunekit"] / forward["plain"],
        "squash ref (s)": squash["reference"],
        "squash prunekit (s)": squash["prunekit"],
        "squash speed-up": ratio(squash["reference"], squash["prunekit"]),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(__doc__, argv)
    width, layers = (512, 8) if args.quick else (4096, 8)
    repeats = 2 if args.quick else args.repeats
    base = make_model(width, layers).requires_grad_(False)
    x = torch.randn(8, width)
    rows = [bench_config(name, cfg, base, x, repeats) for name, cfg in CONFIGS.items()]
    n_params = sum(p.numel() for p in base.parameters())
    notes = (
        f"{layers} x Linear({width}, {width}) with ReLU between, {n_params:,} parameters; "
        f"forward at batch {x.shape[0]} under torch.inference_mode; medians of {repeats} "
        "interleaved step runs (forward: 4x as many). Transient = peak resident memory during one "
        "step above the resident memory before it (/proc/self/clear_refs + VmHWM). Differing "
        "mask entries can only be ties at the selection threshold (equal scores), where the "
        "reference's topk order is an implementation detail."
    )
    path = write_results("unstructured", rows, notes=notes, quick=args.quick)
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
