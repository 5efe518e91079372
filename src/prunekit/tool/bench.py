"""``prunekit bench NAME``: run ``benchmarks/NAME.py`` from a prunekit checkout.

The benchmarks live beside the package in the repository (they are not installed), so
the runner looks for a ``benchmarks`` folder in the current directory and then next to
the package source of an editable install, and runs the module in a fresh interpreter
so its threads and seeds stay its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prunekit.errors import ConfigError

__all__ = ["available", "find_root", "run_benchmark"]


def find_root() -> Path:
    """The folder that holds ``benchmarks/_common.py``."""
    candidates = [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in candidates:
        if (root / "benchmarks" / "_common.py").is_file():
            return root
    raise ConfigError(
        "bench: no benchmarks/ folder found in the current directory or beside the package; "
        "run it from a prunekit checkout"
    )


def available(root: Path) -> list[str]:
    """Names of the runnable benchmarks (``benchmarks/*.py`` not starting with ``_``)."""
    return sorted(p.stem for p in (root / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def run_benchmark(name: str, quick: bool = False, threads: int | None = None,
                  seed: int | None = None) -> int:
    """Run one benchmark as ``python -m benchmarks.NAME``; returns its exit code."""
    root = find_root()
    names = available(root)
    if name not in names:
        raise ConfigError(f"bench: no benchmark {name!r}; available: {', '.join(names) or 'none'}")
    command = [sys.executable, "-m", f"benchmarks.{name}"]
    if quick:
        command.append("--quick")
    if threads is not None:
        command += ["--threads", str(threads)]
    if seed is not None:
        command += ["--seed", str(seed)]
    return subprocess.run(command, cwd=root, check=False).returncode
