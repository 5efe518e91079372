"""Peak memory of one-shot pruning: what each method adds to the model while it prunes,
against the bound the sequential design promises (one block's calibration hidden states
and Hessians on top of the dense model).

Every configuration of ``benchmarks.oneshot`` runs in a fresh process of its own, on
SmolLM2-135M cut to its first ``--blocks`` decoder blocks (default 2): the engine holds
the same things at every block (the hidden states, one block's masks and one stage's
statistics), so the peak of block 2 is the peak of block 30 (``--blocks 30`` measured
it: within 4 MiB), and the cut model measures it in a minute instead of half an hour.
``MALLOC_MMAP_THRESHOLD_`` is fixed in the workers so that glibc maps every tensor over
128 KiB on its own and unmaps it when freed: the resident peak (``VmHWM`` after a reset)
is then what was alive at once, not what the allocator happened to keep cached.
``--quick`` runs the tiny random Llama; ``--only`` re-measures some rows as in
``benchmarks.oneshot``. Every calibrated configuration runs twice: as it is, and with
``offload_folder`` (the hidden states of both streams on disk, a batch's at a time in
memory). The rows' pruning times (of the cut model, two processes side by side) are
a by-product, a rough guide only; ``benchmarks.oneshot`` times offloading on the whole
model.

Before the baseline is read, each worker runs the dense model once on a calibration
batch: libraries load their code pages and oneDNN its JIT kernels on first use (about
13 MiB here), pruning or not. That forward also measures the working memory of one
block's forward on one batch (attention scores, MLP intermediates), which the bound
counts as part of "one block's activations" beside the kept hidden states.
Run: ``python -m benchmarks.oneshot_memory [--quick] [--jobs 2]``.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    MMAP_THRESHOLD,
    parse_args,
    read_rows,
    results_json,
    write_results,
)
from benchmarks.oneshot import (
    FULL,
    PLAIN,
    QUICK,
    MiB,
    Run,
    _key,
    _seed,
    _selected,
    _setup,
    merged,
    prune,
)
from benchmarks.oneshot import block_statistics_mib as hessians_mib
from prunekit.oneshot.blocks import resolve_blocks
from prunekit.oneshot.engine import (
    capture_inputs,
    forward_until,
    inference_context,
    release_free_heap,
)

BLOCKS = 2  # the cut model's default depth
RUNS = PLAIN + [run._replace(offload=True) for run in PLAIN if run.method != "magnitude"]


@contextmanager
def mapped_tensors() -> Iterator[None]:
    """Processes spawned inside map every allocation over 128 KiB on its own."""
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    try:
        yield
    finally:
        if before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_extra_mib(fn: Callable[[], Any]) -> float | None:
    """The peak resident MiB ``fn`` adds (Linux; None elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before: int | None = _kib("VmRSS")
    except (OSError, KeyError):
        before = None
    fn()
    return None if before is None else (_kib("VmHWM") - before) / 1024


def _trim() -> None:
    """Hand the heap's free pages back, so the baseline holds only live memory."""
    gc.collect()
    release_free_heap()


def block_forward_mib(model: torch.nn.Module, batch: torch.Tensor) -> float | None:
    """Warm the process up with one forward of ``model`` (the capture's, which runs the
    first batch through the whole model), then return the peak MiB one forward of its
    first block adds on ``batch`` (None off Linux)."""
    with inference_context(model):
        blocks = resolve_blocks(model, "auto")
        (record,) = capture_inputs(model, blocks, [batch])
        _trim()
        return peak_extra_mib(lambda: forward_until(blocks[0][1], record, None))


def cut(model: torch.nn.Module, blocks: int) -> torch.nn.Module:
    """``model`` (a Hugging Face decoder) keeping its first ``blocks`` blocks."""
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    return model


def measure(run: Run, quick: bool, blocks: int, threads: int) -> dict[str, Any]:
    """The resident memory one pruning adds, in this (fresh) process."""
    torch.set_num_threads(threads)
    model, calib, _ = _setup(quick)
    cut(model, blocks)
    forward = block_forward_mib(model, calib[0])
    _trim()
    start = time.perf_counter()
    peak = peak_extra_mib(lambda: prune(model, run, calib))
    seconds = time.perf_counter() - start
    label, sparsity = _key(run)
    row = {"method": label, "sparsity": sparsity, "peak extra MiB": peak,
           "block forward MiB": forward, "prune s": seconds}
    print(row, flush=True)
    return row


def measure_all(quick: bool, blocks: int, jobs: int, threads: int, runs: list[Run]
                ) -> list[dict[str, Any]]:  # fmt: skip
    """Every run in a process of its own (``jobs`` at a time)."""
    with mapped_tensors(), ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=_seed,
            initargs=(torch.initial_seed(),), max_tasks_per_child=1) as pool:
        n = len(runs)
        return list(pool.map(measure, runs, [quick] * n, [blocks] * n, [threads] * n))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=[
        ("--blocks", f"decoder blocks to keep (default {BLOCKS}; another number writes "
                     "results/oneshot_memory-blocksN)"),
        ("--only", "re-measure only these rows ('method label@sparsity', comma-separated); "
                   "the others are kept from the committed results")])
    blocks = int(args.blocks or BLOCKS)
    name = "oneshot_memory" if blocks == BLOCKS else f"oneshot_memory-blocks{blocks}"
    rows = measure_all(args.quick, blocks, args.jobs, args.threads, _selected(args.only, RUNS))
    if args.only is not None:
        rows = merged(rows, read_rows(results_json(name, args.quick)), RUNS)
    model, calib, _ = _setup(args.quick)
    sizes = QUICK if args.quick else FULL
    hidden = len(calib) * sizes["seq_len"] * model.config.hidden_size * 4 / MiB
    hessians = hessians_mib(model)
    forwards = [row["block forward MiB"] for row in rows if row["block forward MiB"] is not None]
    forward = statistics.median(forwards) if forwards else 0.0
    bound = hidden + forward + hessians
    for row in rows:
        row["x bound"] = None if row["peak extra MiB"] is None else row["peak extra MiB"] / bound
        row["prune s"] = row.pop("prune s", None)  # the last column (older rows have none)
    spread = f" (median of {min(forwards):.1f}-{max(forwards):.1f})" if forwards else ""
    what = "Tiny random Llama" if args.quick else "SmolLM2-135M-Instruct"
    notes = (
        f"{what} cut to its first {blocks} blocks; calibration {len(calib)} x "
        f"{sizes['seq_len']} tokens. Bound, on top of the model: one block's activations "
        f"(the calibration hidden states, {hidden:.1f} MiB, and one forward of the block "
        f"on one batch, {forward:.1f} MiB{spread}, measured in every row's process) + one "
        f"block's Hessians, {hessians:.1f} MiB = {bound:.1f} MiB. One process per row, "
        f"warmed up by one forward of the model; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}."
    )
    path = write_results(name, rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
