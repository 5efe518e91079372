"""Every benchmark runs once in its --quick mode (a smoke test; BENCH.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(
    p.stem
    for p in (ROOT / "benchmarks").glob("*.py")
    if not p.stem.startswith("_") and '__name__ == "__main__"' in p.read_text()
)


def test_every_benchmark_is_listed():
    assert "unstructured" in BENCHMARKS and len(BENCHMARKS) >= 5


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_mode_runs(name):
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((ROOT / "benchmarks" / "results").glob(f"{name}*-quick.md")), result.stdout[-500:]
