"""Reports: the before/after table, the per-layer table, a Markdown summary and plots.

A report is plain data (``report.json``) rendered to text for the terminal, to
``report.md`` and, when matplotlib is installed (``pip install 'prunekit[plot]'``), to
PNG plots. ``prunekit report DIR`` re-renders a saved ``report.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.errors import ConfigError
from prunekit.tool.measure import LayerRow, Summary

__all__ = [
    "Report", "add_model", "make_report", "read_report", "render_layers", "render_summary",
    "write_report",
]

REPORT_JSON = "report.json"
_log = logging.getLogger(__name__)

Report = dict[str, Any]
"""``{"title", "kind", "metric", "models": {label: {...summary, "metric"}},
"layers": {label: [row, ...]}, "curves": {label: [[sparsity, metric], ...]}, "notes": [...]}``"""


def make_report(title: str, kind: str, metric: str) -> Report:
    """An empty report; fill it with ``add_model`` and ``add_curve``."""
    return {"title": title, "kind": kind, "metric": metric, "models": {}, "layers": {},
            "curves": {}, "notes": []}


def add_model(report: Report, label: str, summary: Summary, layers: Sequence[LayerRow],
              metric: float | None = None) -> None:
    """Record one model's summary (and its task metric, if measured) and layer table."""
    report["models"][label] = summary.as_dict() | {"metric": metric}
    report["layers"][label] = [row.as_dict() for row in layers]


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _summary_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    metric = report["metric"]
    head = ["model", metric, "params", "nonzero", "MACs", "size", "gzip size", "latency"]
    rows = []
    for label, m in report["models"].items():
        value = "-" if m["metric"] is None else f"{m['metric']:.2%}" if metric == "accuracy" \
            else f"{m['metric']:.3f}"
        rows.append([label, value, _human(m["params"]), _human(m["nonzero"]), _human(m["macs"]),
                     _human(m["size_bytes"], "B"), _human(m["gzip_bytes"], "B"),
                     f"{m['latency_ms']:.3f} ms"])
    if all(m["metric"] is None for m in report["models"].values()):  # nothing measured
        return [head[0], *head[2:]], [[r[0], *r[2:]] for r in rows]
    return head, rows


def _layer_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["layer", "type", "shape", "params", "nonzero", "sparsity", "MACs"]
    body = [[r["name"], r["kind"], "x".join(map(str, r["shape"])), _human(r["params"]),
             _human(r["nonzero"]), f"{r['sparsity']:.1%}", _human(r["macs"])] for r in rows]
    return head, body


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def render_summary(report: Report) -> str:
    """The before/after table as aligned text for a terminal."""
    return _text_table(*_summary_rows(report))


def render_layers(report: Report, label: str | None = None) -> str:
    """The per-layer table of one model (the last one recorded by default)."""
    labels = list(report["layers"])
    if not labels:
        return "(no layers recorded)"
    return _text_table(*_layer_rows(report["layers"][label or labels[-1]]))


def render_markdown(report: Report, images: Sequence[str]) -> str:
    """The whole report as Markdown."""
    parts = [f"# {report['title']}", "", _md_table(*_summary_rows(report)), ""]
    parts += [f"- {note}" for note in report["notes"]] + [""]
    if "llm" in report:
        llm = report["llm"]
        row = [llm["model"], llm["method"], f"{llm['sparsity']:.0%}",
               f"{llm['perplexity_before']:.2f}", f"{llm['perplexity_after']:.2f}"]
        head = ["language model", "method", "sparsity", "perplexity before", "after"]
        parts += [_md_table(head, [row]), ""]
    parts += [f"![{Path(i).stem}]({i})" for i in images] + [""]
    for label, rows in report["layers"].items():
        parts += [f"## Layers: {label}", "", _md_table(*_layer_rows(rows)), ""]
    return "\n".join(parts)


def write_report(report: Report, folder: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``folder``."""
    from prunekit.tool.plots import plot_report

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=1))
    images = plot_report(report, folder)
    if not images:
        report["notes"].append("plots need matplotlib: pip install 'prunekit[plot]'")
    (folder / "report.md").write_text(render_markdown(report, [p.name for p in images]))
    return [folder / REPORT_JSON, folder / "report.md", *images]


def read_report(folder: str | Path) -> Report:
    """Load a ``report.json`` written by ``write_report``."""
    file = Path(folder) / REPORT_JSON
    try:
        report = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"report: '{folder}' holds no {REPORT_JSON}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"report: cannot read '{file}': {exc}") from None
    missing = {"title", "metric", "models", "layers", "curves", "notes"} - set(report)
    if missing:
        raise ConfigError(f"report: '{file}' lacks keys {sorted(missing)}")
    return report
