"""The README's Python examples run as written: blocks fenced ```python, in order, in one
namespace (each test runs the blocks before its own, whose names later examples use)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {}
    for block in BLOCKS[: index + 1]:  # later examples may use names set up earlier
        exec(compile(block, f"README block {index}", "exec"), namespace)
