"""``prunekit report TARGET``: build the report of a result folder or of a model.

TARGET is a ``prunekit prune`` output (rebuilt from its checkpoint and ``run.json``), a
folder holding a ``report.json`` (the demo's, re-rendered as is), or a MODEL as
``prunekit prune`` takes it (``package.module:factory`` or a ``.pt2`` file).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from prunekit.errors import ConfigError
from prunekit.tool.checkpoint import load
from prunekit.tool.measure import layer_table, summarize
from prunekit.tool.modelspec import load_model
from prunekit.tool.prune import RUN_JSON, check_fits, example_from_shape
from prunekit.tool.report import REPORT_JSON, Report, add_model, make_report, read_report

__all__ = ["report_for"]


def _model_report(title: str, model: nn.Module, example: tuple) -> Report:
    report = make_report(title, "model", "metric")
    add_model(report, "model", summarize(model, example, repeats=10), layer_table(model, example))
    return report


def _from_run(folder: Path) -> Report:
    try:
        run = json.loads((folder / RUN_JSON).read_text())
        example = tuple(example_from_shape(s, run["example_dtype"].removeprefix("torch."))[0]
                        for s in run["example_shapes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"report: cannot read '{folder / RUN_JSON}' ({exc})") from None
    if (folder / "model.pt2").is_file():
        model = load_model(str(folder / "model.pt2")).model
    else:
        model = load(load_model(run["model"]).factory, folder)
    return _model_report(f"prunekit report {folder}", model, example)


def report_for(target: str, weights: str | None = None, input_shape: list[int] | None = None,
               input_dtype: str = "float32") -> Report:
    """The report of ``target`` (see the module docstring)."""
    path = Path(target)
    if path.is_dir():
        if (path / RUN_JSON).is_file():
            return _from_run(path)
        if (path / REPORT_JSON).is_file():
            return read_report(path)
        raise ConfigError(f"report: folder '{target}' holds neither {RUN_JSON} nor {REPORT_JSON}")
    loaded = load_model(target, weights)
    if input_shape is not None:
        example = example_from_shape(input_shape, input_dtype)
    elif loaded.example_inputs is not None:
        example = loaded.example_inputs
    else:
        raise ConfigError(f"report: model '{target}' needs --input-shape (e.g. 1,3,32,32)")
    check_fits(loaded.model, example, "--input-shape")
    return _model_report(f"prunekit report {target}", loaded.model, example)

