"""Measurements, tables, Markdown and plots of a report."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.tool import plots
from prunekit.tool.measure import layer_table, macs_per_module, summarize
from prunekit.tool.report import (
    add_model,
    make_report,
    read_report,
    render_layers,
    render_summary,
    write_report,
)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    with torch.no_grad():
        model[2].weight[:, :72] = 0
    return model


def test_layer_table_counts_shapes_nonzeros_and_macs():
    rows = layer_table(_model(), (torch.randn(1, 1, 8, 8),))
    assert [(r.name, r.kind, r.shape) for r in rows] == [
        ("0", "Conv2d", (4, 1, 3, 3)), ("2", "Linear", (10, 144))]
    conv, linear = rows
    assert conv.macs == 4 * 9 * 6 * 6 and linear.macs == 1440
    assert linear.params == 1440 and linear.nonzero == 720 and linear.sparsity == 0.5


def test_summary_figures():
    model = _model()
    summary = summarize(model, (torch.randn(1, 1, 8, 8),), repeats=2)
    assert summary.params == 4 * 9 + 4 + 1440 + 10
    assert summary.nonzero == summary.params - 720
    assert summary.macs == macs_per_module(model, (torch.randn(1, 1, 8, 8),))[""] == 1296 + 1440
    assert summary.size_bytes > 4 * summary.params and summary.gzip_bytes < summary.size_bytes
    assert summary.latency_ms > 0


def _report() -> dict:
    model, x = _model(), (torch.randn(1, 1, 8, 8),)
    report = make_report("test", "demo", "accuracy")
    add_model(report, "dense", summarize(model, x, repeats=1), layer_table(model, x), 0.975)
    report["curves"]["gradual"] = [[0.0, 0.97], [0.5, 0.96], [0.9, 0.95]]
    return report


def test_text_tables():
    report = _report()
    lines = render_summary(report).splitlines()
    assert lines[0].split() == ["model", "accuracy", "params", "nonzero", "MACs", "size",
                                "gzip", "size", "latency"]
    assert lines[2].split()[:5] == ["dense", "97.50%", "1.49k", "770", "2.74k"]
    layers = render_layers(report).splitlines()
    assert layers[3].split() == ["2", "Linear", "10x144", "1.44k", "720", "50.0%", "1.44k"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_write_report_makes_pngs_markdown_and_json(tmp_path):
    files = write_report(_report(), tmp_path)
    assert [f.name for f in files] == ["report.json", "report.md", "sparsity_per_layer.png",
                                       "accuracy_vs_sparsity.png"]
    for png in files[2:]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    markdown = (tmp_path / "report.md").read_text()
    assert "![sparsity_per_layer](sparsity_per_layer.png)" in markdown
    assert "| dense | 97.50% |" in markdown
    assert read_report(tmp_path)["curves"]["gradual"][2] == [0.9, 0.95]


def test_without_matplotlib_the_report_says_how_to_get_plots(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(plots.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    files = write_report(_report(), tmp_path)
    assert [f.name for f in files] == ["report.json", "report.md"]
    assert "pip install 'prunekit[plot]'" in (tmp_path / "report.md").read_text()


def test_read_report_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no report\.json"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text('{"title": "x"}')
    with pytest.raises(ConfigError, match=r"lacks keys \['curves', 'layers', 'metric'"):
        read_report(tmp_path)


def test_unmeasured_metric_column_is_left_out():
    model, x = _model(), (torch.randn(1, 1, 8, 8),)
    report = make_report("prune", "prune", "metric")
    add_model(report, "after", summarize(model, x, repeats=1), layer_table(model, x))
    assert render_summary(report).splitlines()[0].split()[:3] == ["model", "params", "nonzero"]
