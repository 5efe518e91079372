"""What each ``prunekit`` sub-command does once its arguments are parsed (the CLI's
output layer: the only place that writes tables to stdout)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from prunekit.errors import ConfigError
from prunekit.tool.checkpoint import replace_dir
from prunekit.tool.report import REPORT_JSON, Report, render_layers, render_summary, write_report

__all__ = ["bench", "demo", "prune", "report"]


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        sys.stdout.write(text + "\n")


def _print_report(args: argparse.Namespace, report: Report) -> None:
    _say(args, render_summary(report))
    for label in report["layers"]:
        _say(args, f"\nlayers of {label}:\n{render_layers(report, label)}")
    for note in report["notes"]:
        _say(args, f"note: {note}")


def _check_demo_out(out: Path) -> None:
    """The demo may replace its own earlier report folder, nothing else."""
    if not out.exists():
        return
    try:
        kind = json.loads((out / REPORT_JSON).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "demo":
        raise ConfigError(f"--out '{out}' exists and is not a prunekit demo report; "
                          "choose another folder")


def demo(args: argparse.Namespace) -> int:
    """Train, prune, print the before/after table and write the report folder."""
    import dataclasses

    from prunekit.tool.demo import DemoSettings, run_demo

    out = Path(args.out)
    _check_demo_out(out)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        settings = DemoSettings.fast() if args.fast else DemoSettings()
        if args.threads is not None:
            settings = dataclasses.replace(settings, cnn_threads=args.threads)
        result = run_demo(staging, settings, seed=args.seed, progress=not args.quiet)
        write_report(result, staging)
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(args, render_summary(result))
    for note in result["notes"]:
        _say(args, f"note: {note}")
    _say(args, f"report: {out / 'report.md'} ({time.perf_counter() - start:.0f} s)")
    return 0


def prune(args: argparse.Namespace) -> int:
    """Run a recipe on MODEL and write the result folder."""
    from prunekit.tool.prune import run_prune

    result = run_prune(args.model, args.recipe, args.out, weights=args.weights,
                       overwrite=args.overwrite, progress=not args.quiet)
    _say(args, render_summary(result))
    _say(args, f"pruned model, recipe and report: {args.out}")
    return 0


def report(args: argparse.Namespace) -> int:
    """Print the report of DIR or MODEL; write it to --out when given."""
    from prunekit.tool.inspect import report_for

    result = report_for(args.target, args.weights, args.input_shape)
    if args.out is not None:
        files = write_report(result, args.out)
        _say(args, "wrote " + ", ".join(str(f) for f in files))
    _print_report(args, result)
    return 0


def bench(args: argparse.Namespace) -> int:
    """List or run the benchmarks of the checkout."""
    from prunekit.tool.bench import available, find_root, run_benchmark

    if args.list:
        names = available(find_root())
        _say(args, "\n".join(names) if names else "no benchmarks found")
        return 0
    if args.name is None:
        names = ", ".join(available(find_root())) or "none"
        raise ConfigError(f"bench: name a benchmark or pass --list; available: {names}")
    return run_benchmark(args.name, quick=args.quick, threads=args.threads, seed=args.seed)
