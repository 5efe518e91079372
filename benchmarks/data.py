"""DataNormSparsifier on an embedding table vs torch.ao.pruning's, in one process.

Measures the median ``step()`` time (interleaved), the bytes of mask each sparsifier holds
(after ``add_data`` and after ``step``), the peak extra resident memory of one ``step()``
(Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), and checks that
both masks are identical. Run: ``python -m benchmarks.data [--quick]``.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefDNS

from benchmarks._common import interleaved, parse_args, ratio, tensor_bytes, write_results
from prunekit.data import DataNormSparsifier, PackedSparsity

CONFIG = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)}


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_rss(fn: Callable[[], Any]) -> int | None:
    """Peak resident bytes above the level before ``fn`` (None where Linux tools lack)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) * 1024


def build(table: torch.Tensor) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = RefDNS(**CONFIG)
        ref.add_data("emb", table)
    ours = DataNormSparsifier(**CONFIG)
    ours.add_data("emb", table)
    packed = DataNormSparsifier(**CONFIG)
    packed.add_data("emb", table, parametrization=PackedSparsity)
    return {"torch.ao": ref, "prunekit": ours, "prunekit packed": packed}


def mask_bytes(sparsifier: Any) -> int:
    """Bytes the sparsifier keeps for the mask (bits for a packed item)."""
    stored = sparsifier.state["emb"]["mask"]
    return stored.nbytes if hasattr(stored, "bits") else tensor_bytes([stored])


def measure(rows: int, cols: int, repeats: int) -> list[dict[str, Any]]:
    table = torch.randn(rows, cols)
    sparsifiers = build(table)
    fresh = {name: mask_bytes(s) for name, s in sparsifiers.items()}
    peaks = {name: peak_extra_rss(s.step) for name, s in sparsifiers.items()}
    held = {name: mask_bytes(s) for name, s in sparsifiers.items()}
    ref_mask = sparsifiers["torch.ao"].get_mask("emb").bool()
    same = all(torch.equal(ref_mask, s.get_mask("emb")) for s in list(sparsifiers.values())[1:])
    times = interleaved({name: s.step for name, s in sparsifiers.items()}, repeats)
    shape = f"{rows:,} x {cols}"
    rows_out = [
        _row(shape, "step() time (s)", times, same),
        _row(shape, "mask bytes after add_data", fresh, same),
        _row(shape, "mask bytes after step", held, same),
    ]
    if None not in peaks.values():
        rows_out.append(_row(shape, "peak extra RSS of first step (bytes)", peaks, same))
    return rows_out


def _row(shape: str, metric: str, values: dict[str, Any], same: bool) -> dict[str, Any]:
    return {
        "table": shape,
        "metric": metric,
        "torch.ao": values["torch.ao"],
        "prunekit": values["prunekit"],
        "torch.ao / prunekit": ratio(values["torch.ao"], values["prunekit"]),
        "prunekit packed": values["prunekit packed"],
        "torch.ao / packed": ratio(values["torch.ao"], values["prunekit packed"]),
        "masks identical": same,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rows, repeats = (20_000, args.repeats) if args.quick else (1_000_000, min(args.repeats, 3))
    results = measure(rows, 64, repeats)
    notes = (
        "DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4)) on a fp32 table; "
        "'packed' stores the mask as bits (parametrization=PackedSparsity); ratios > 1 mean "
        "prunekit is faster / smaller. Targets: step >= 5x, mask memory <= 1/4."
    )
    path = write_results("data", results, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
