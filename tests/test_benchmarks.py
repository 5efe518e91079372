"""Every benchmark runs once in its --quick mode (a smoke test; BENCH.md)."""

import json
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


def test_oneshot_only_re_measures_the_named_rows_and_keeps_the_others(tmp_path):
    """``--only`` runs just its rows; ``--keep`` files give the others, later files win."""
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    row = {"perplexity": 1.0, "x dense": 1.0, "prune s": 0.0}
    labels = [("dense", "0%"), ("wanda", "50%"), ("sparsegpt", "2:4")]
    old.write_text(json.dumps({"rows": [{"method": m, "sparsity": s, **row} for m, s in labels]}))
    new.write_text(json.dumps({"rows": [{"method": "wanda", "sparsity": "50%", **row,
                                         "perplexity": 2.0}]}))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.oneshot", "--quick", "--only", "sparsegpt@50%",
         "--keep", f"{old},{new}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((ROOT / "benchmarks/results/oneshot-quick.json").read_text())["rows"]
    by = {(r["method"], r["sparsity"]): r for r in rows}
    assert list(by) == [("dense", "0%"), ("wanda", "50%"), ("sparsegpt", "50%"),
                        ("sparsegpt", "2:4")]
    assert by[("wanda", "50%")]["perplexity"] == 2.0
    assert by[("sparsegpt", "2:4")]["perplexity"] == 1.0
    assert by[("dense", "0%")]["perplexity"] > 1.0 and by[("sparsegpt", "50%")]["prune s"] > 0


def _deploy_row(sparsity: float, dense_ms: float = 1.0, x: float = 2.0) -> dict:
    return {"shape": "fc1", "tokens": 32, "pattern": "1x4", "sparsity": sparsity,
            "dense_ms": dense_ms, "csr_x": x, "bsr_x": None, "row_blocks_x": x,
            "sparse_int8_x": x}


def test_deploy_re_measures_only_the_cells_that_ran_disturbed():
    """A sparse layout far slower than at the sparsity below, or a dense time far above
    its peers', is measured again (the least disturbed run kept); plausible cells are not."""
    from benchmarks.deploy import remeasure_stalls

    oversubscribed = {**_deploy_row(0.9), "row_blocks_x": 0.1}
    stalled = _deploy_row(0.95, dense_ms=5.0)
    rows = [_deploy_row(0.5, x=1.0), _deploy_row(0.7, x=1.5), oversubscribed, stalled]
    calls = []

    def measure(row: dict) -> dict:
        calls.append(row["sparsity"])
        return _deploy_row(row["sparsity"], x=3.0)

    assert remeasure_stalls(rows, measure) == 2
    assert calls == [0.9, 0.95]
    assert rows[2]["row_blocks_x"] == 3.0 and rows[3]["dense_ms"] == 1.0
    assert remeasure_stalls([_deploy_row(0.5, x=1.0), _deploy_row(0.9, x=0.9)],
                            lambda row: pytest.fail("a plausible cell was re-measured")) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("heap", [False, True])
def test_big_allocations_come_from_the_heap_like_a_copy_made_later(heap):
    """Timings compare a deep copy with the original: both must come from the heap."""
    script = f"""
import torch
from benchmarks._common import heap_allocations
if {heap}:
    heap_allocations()
kept = [torch.empty(n) for n in range(300_000, 2_000_000, 170_001)]  # 1.2-8 MB
print(len({{t.data_ptr() % 4096 for t in kept}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    offsets = int(result.stdout)
    assert offsets > 1 if heap else offsets == 1  # mapped blocks all start a page in


@pytest.mark.parametrize("experts", [4, 1])
def test_the_upcycled_moe_twin_computes_what_its_dense_model_computes(experts):
    """benchmarks.oneshot_moe compares pruning SmolLM2 with pruning its MoE twin: a fair
    race only if the unpruned twin computes the same (top-2 weights sum to one; one
    expert gets all of every token)."""
    from benchmarks.oneshot import tiny_llama
    from benchmarks.oneshot_moe import upcycle

    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    llama, calibration, _ = tiny_llama()
    twin = upcycle(llama, experts=experts)
    bank = twin.model.layers[0].mlp.experts
    assert tuple(bank.gate_up_proj.shape) == (experts, 2 * 128, 64)
    assert bank.gate_up_proj.is_contiguous()
    with torch.no_grad():
        want, got = llama(calibration[0]).logits, twin(calibration[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
