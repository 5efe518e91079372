"""prunekit as a tool: recipes, reports, pickle-free checkpoints, the demo and the
benchmarks runner behind the ``prunekit`` command."""

from prunekit.tool.checkpoint import load, record_plan, save
from prunekit.tool.digits import DigitsCNN

__all__ = ["DigitsCNN", "load", "record_plan", "save"]
