"""The ``prunekit`` command: demo, prune, report, bench.

A thin layer over ``prunekit.tool``: it parses arguments, sets seeds, threads and
logging, prints tables, and turns user mistakes (prunekit errors, unreadable files) into
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
from collections.abc import Callable, Iterator

import torch
import yaml

from prunekit.errors import PruneKitError

__all__ = ["main"]

EXIT_USAGE = 2
_EPILOGS = {
    "demo": """examples:
  prunekit demo                       # train, prune, print the table, write prunekit-demo/
  prunekit demo --out /tmp/demo --threads 2 --seed 1""",
    "prune": """examples:
  prunekit prune prunekit.tool:DigitsCNN --recipe recipe.yaml --out pruned/
  prunekit prune mypkg.models:resnet --weights resnet.safetensors --recipe r.yaml --out out/
  prunekit prune model.pt2 --recipe recipe.yaml --out out/ --overwrite
recipe.yaml:
  input_shape: [1, 1, 8, 8]
  stages:
    - {type: unstructured, sparsity: 0.9, schedule: {steps: 10}}""",
    "report": """examples:
  prunekit report pruned/                         # a `prunekit prune` output folder
  prunekit report prunekit-demo/ --out gallery/   # re-render a saved report
  prunekit report prunekit.tool:DigitsCNN --input-shape 1,1,8,8""",
    "bench": """examples:
  prunekit bench --list
  prunekit bench masks --quick""",
}


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    noise = group.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    noise.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")


def _shape(text: str) -> list[int]:
    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers like 1,3,32,32, got {text!r}") from None
    if any(x < 1 for x in shape):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return shape


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _sub(sub: argparse._SubParsersAction, name: str, text: str,
         run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=text, description=text, epilog=_EPILOGS[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run)
    return parser


def _build_parser() -> argparse.ArgumentParser:
    from prunekit.tool import commands as cmd

    parser = argparse.ArgumentParser(prog="prunekit",
                                     description="Make PyTorch models sparse and smaller.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run `prunekit COMMAND --help` for examples")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = _sub(sub, "demo", "train a digits CNN, prune it three ways, report", cmd.demo)
    demo.add_argument("--out", default="prunekit-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    prune = _sub(sub, "prune", "prune MODEL as a YAML recipe says", cmd.prune)
    prune.add_argument("model", metavar="MODEL", help="package.module:factory or a .pt2 file")
    prune.add_argument("--recipe", required=True, help="YAML recipe")
    prune.add_argument("--out", required=True, help="result folder (must not exist)")
    prune.add_argument("--weights", help="safetensors weights for a factory MODEL")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    report = _sub(sub, "report", "per-layer table, plots and summary of DIR or MODEL", cmd.report)
    report.add_argument("target", metavar="DIR|MODEL")
    report.add_argument("--out", help="also write report.md, report.json and PNGs here")
    report.add_argument("--weights", help="safetensors weights for a factory MODEL")
    report.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,32,32")
    bench = _sub(sub, "bench", "run a benchmark of benchmarks/", cmd.bench)
    bench.add_argument("name", metavar="NAME", nargs="?", help="benchmark name")
    bench.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    for p in (demo, prune, report, bench):
        _common(p)
    return parser


@contextlib.contextmanager
def _session(args: argparse.Namespace) -> Iterator[None]:
    """Logging, threads and seeds for one command, restored afterwards (tests and other
    callers of ``main`` in the same process keep their settings)."""
    log = logging.getLogger("prunekit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level, threads = log.level, torch.get_num_threads()
    log.setLevel(logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    log.addHandler(handler)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (2 for user mistakes, one line on stderr)."""
    args = _build_parser().parse_args(argv)
    try:
        with _session(args):
            return args.func(args)
    except (PruneKitError, OSError, yaml.YAMLError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"prunekit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

