"""Sensitivity scan of the quality benchmark's CNN, and pruning at the levels it allocates.

Trains the same dense CNN as ``benchmarks.quality`` (same seed and budget), scans every
layer at 30/50/70/90/95/98% on 5,000 held-in training images (the test set stays unseen),
turns the scan into per-layer levels for a 90% global target with ``prunekit.allocate``,
and prunes gradually to those levels with ``WeightNormSparsifier`` + ``CubicSL`` and the
same fine-tuning budget as the unstructured rows of ``benchmarks.quality``.

    python -m benchmarks.quality_sensitivity [--quick]
"""

from __future__ import annotations

import copy
import time
from typing import Any

import prunekit
from benchmarks._common import RESULTS, parse_args, write_results
from benchmarks.quality import CNN, FULL, QUICK, _events, _sgd, accuracy, zero_fraction
from benchmarks.quality_data import EpochLoader, load

TARGET = 0.9
LEVELS = (0.3, 0.5, 0.7, 0.9, 0.95, 0.98)  # beyond the target, or allocate cannot move


def _prune_to(model: Any, levels: dict[str, float], cfg: dict, loader: EpochLoader) -> None:
    sparsifier = prunekit.WeightNormSparsifier(sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight", "sparsity_level": level}
                               for name, level in levels.items()])
    sched = prunekit.CubicSL(sparsifier, init_sl=0.0, delta_t=1, total_t=_events(cfg, loader))
    opt, lr = _sgd(model, cfg["prune_epochs"] * len(loader))
    prunekit.gradual_prune(model, loader, opt, sparsifier, sched, epochs=cfg["prune_epochs"],
                           prune_every=cfg["prune_every"], lr_scheduler=lr)
    sparsifier.squash_mask()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    cfg = QUICK if args.quick else FULL
    name, data = load(args.quick)
    dense = CNN(data["x_train"].shape[-1], cfg["widths"], cfg["hidden"])
    prunekit.finetune(dense, EpochLoader(data["x_train"], data["y_train"], cfg["batch"], 0),
                      epochs=cfg["dense_epochs"], lr=1e-3)
    x_val, y_val = data["x_train"][-5000:], data["y_train"][-5000:]
    start = time.perf_counter()
    scan = prunekit.sensitivity_scan(dense, lambda m: accuracy(m, x_val, y_val), LEVELS)
    scan_s = time.perf_counter() - start
    levels = prunekit.allocate(scan, TARGET)
    rows = [{"layer": layer, "params": scan.sizes[layer],
             **{f"acc@{lv:.0%}": round(v, 1) for lv, v in zip(scan.levels, vals, strict=True)},
             f"allocated@{TARGET:.0%}": round(levels[layer], 3)}
            for layer, vals in scan.metrics.items()]
    model = copy.deepcopy(dense)
    _prune_to(model, levels, cfg, EpochLoader(data["x_train"], data["y_train"], cfg["batch"], 1))
    dense_acc = accuracy(dense, data["x_test"], data["y_test"])
    pruned_acc = accuracy(model, data["x_test"], data["y_test"])
    notes = (f"{name}; scan on {len(y_val)} training images (dense accuracy there "
             f"{scan.baseline:.2f}%), {scan_s:.1f} s. Pruned gradually to the allocated "
             f"levels ({zero_fraction(model):.3f} of the weights zero), same budget as "
             f"benchmarks.quality: test accuracy {pruned_acc:.2f}% vs dense {dense_acc:.2f}% "
             f"({pruned_acc - dense_acc:+.2f} points). {args.threads} thread(s).")
    write_results("quality_sensitivity", rows, notes, args.quick)
    stem = "quality_sensitivity-quick" if args.quick else "quality_sensitivity"
    scan.plot(str(RESULTS / f"{stem}.png"))
    print(notes)


if __name__ == "__main__":
    main()
