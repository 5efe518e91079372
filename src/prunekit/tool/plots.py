"""PNG plots of a report, drawn with matplotlib (the optional ``plot`` extra).

Without matplotlib, ``plot_report`` draws nothing and returns an empty list, so a report
still gets its JSON and Markdown.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["plot_report"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _removed(rows: list[dict], base: dict[str, int]) -> dict[str, float]:
    """Share of each layer's weights gone (zeroed or sliced away) against ``base``."""
    return {r["name"]: 1.0 - r["nonzero"] / base.get(r["name"], r["params"]) for r in rows}


def _sparsity_plot(plt: Any, report: dict, file: Path) -> None:
    layers = report["layers"]
    first = next(iter(layers.values()))
    names, base = [r["name"] for r in first], {r["name"]: r["params"] for r in first}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 3.8))
    width = 0.8 / len(layers)
    for i, (label, rows) in enumerate(layers.items()):
        removed = _removed(rows, base)
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [100 * removed.get(n, 0.0) for n in names], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel("weights removed (%)")
    ax.set_ylim(0, 120)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"Weights zeroed or removed per layer (vs. {next(iter(layers))})")
    ax.legend(fontsize="small", loc="upper center", ncol=min(3, len(layers)))
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def _curve_plot(plt: Any, report: dict, file: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for label, points in report["curves"].items():
        xs, ys = zip(*points, strict=True)
        ax.plot([100 * x for x in xs], ys, marker="o", label=label)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(report["metric"])
    ax.set_title(f"{report['metric'].capitalize()} vs sparsity")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_report(report: dict, folder: Path) -> list[Path]:
    """Draw ``sparsity_per_layer.png`` and, where a metric was measured along the way,
    ``<metric>_vs_sparsity.png``; returns the files written."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    plt = _pyplot()
    written = []
    if report["layers"] and any(report["layers"].values()):
        _sparsity_plot(plt, report, folder / "sparsity_per_layer.png")
        written.append(folder / "sparsity_per_layer.png")
    if any(len(points) > 0 for points in report["curves"].values()):
        file = folder / f"{report['metric']}_vs_sparsity.png"
        _curve_plot(plt, report, file)
        written.append(file)
    return written
