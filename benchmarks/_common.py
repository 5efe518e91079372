"""Shared benchmark plumbing: interleaved timing, medians, and result files.

Every benchmark runs prunekit and its peers in one process on the same tensors,
interleaved, and reports medians and ratios ``peer / prunekit`` (> 1: prunekit wins).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from prunekit._glibc import glibc_function

RESULTS = Path(__file__).parent / "results"


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    extra: Sequence[tuple[str, str]] = (),
) -> argparse.Namespace:
    """``--quick`` (CI smoke sizes), ``--repeats``, ``--threads``, ``--seed``, ``--jobs``,
    and a benchmark's own string options ``extra`` (``(flag, help)``, default None)."""
    parser = argparse.ArgumentParser(description=description)
    for flag, text in extra:
        parser.add_argument(flag, default=None, help=text)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, where a benchmark runs configurations apart")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    return args


MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, which frees of big blocks raise
HEAP_THRESHOLD = 32 * 1024 * 1024  # the highest glibc raises it to (64-bit)


def heap_allocations() -> bool:
    """Serve every allocation under ``HEAP_THRESHOLD`` from glibc's heap for the rest of
    this process, as it does once frees of big blocks have raised its threshold (False
    where that is not glibc). Otherwise a model built early gets its weights mapped on
    pages of their own and a deep copy built later gets them from the heap, and at one
    token the original reads its weights 5-10 % faster: a bias against any deployed copy
    that no timing method cancels. A low threshold instead would map (and fault in)
    every big temporary on every call, which slows the fast kernels 1.5-2x."""
    mallopt = glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(-3, HEAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
    }


def interleaved(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    setup: Callable[[str], Any] | None = None,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds of each candidate, run in turn (a, b, a, b, ...) so drift in the
    machine's load hits all of them alike. ``setup(name)`` runs untimed before each call."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for i in range(warmup + repeats):
        for name, fn in candidates.items():
            if setup is not None:
                setup(name)
            gc.collect()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_python_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated through Python's allocator while ``fn`` runs (tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def ratio(peer: float, ours: float) -> float:
    return float("inf") if ours == 0 else peer / ours


def write_results(
    name: str, rows: list[dict[str, Any]], notes: str = "", quick: bool = False
) -> Path:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (``NAME-quick`` in quick mode)."""
    RESULTS.mkdir(exist_ok=True)
    stem = f"{name}-quick" if quick else name
    payload = {"benchmark": name, "environment": environment(), "rows": rows, "notes": notes}
    results_json(name, quick).write_text(json.dumps(payload, indent=2, default=str))
    md = [f"# {name}", "", _env_line(payload["environment"]), ""]
    if notes:
        md += [notes, ""]
    md += markdown_table(rows)
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def results_json(name: str, quick: bool = False) -> Path:
    """Where ``write_results`` writes ``name``'s rows."""
    return RESULTS / f"{f'{name}-quick' if quick else name}.json"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file ``write_results`` wrote (none if there is no file)."""
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _env_line(env: dict[str, Any]) -> str:
    return f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}, Python {env['python']}"


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
