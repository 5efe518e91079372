"""Exact resume: a schedule saved mid-way through the four state_dicts and resumed in a
new process ends bit-identical (max difference 0) to the uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from tests.trust._helpers import max_difference
from tests.trust._resume_worker import STEPS, build, checkpoint, result, run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def threads():
    """build() pins one thread; give the test process its setting back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_resume_in_a_new_process_is_bit_identical(tmp_path: Path, threads) -> None:
    stop_at = 3
    whole = build()
    run(whole, 0, STEPS)
    expected = result(whole)

    interrupted = build()
    run(interrupted, 0, stop_at)
    level = interrupted["sparsifier"].groups[0]["sparsity_level"]
    assert 0 < level < 0.8  # saved mid-schedule
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint(interrupted), path)
    torch.load(path, weights_only=True)  # tensors and plain containers only

    out = tmp_path / "resumed.pt"
    cmd = [sys.executable, "-m", "tests.trust._resume_worker", str(path), str(stop_at), str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    resumed = torch.load(out, weights_only=True)

    assert max_difference(resumed, expected) == 0.0
    # the schedule ran to its end: round(0.8 * 24) of the 24 (1, 2) blocks are zero
    assert int((~expected["masks"]["0.weight"]).sum()) == 2 * 19


def test_resume_detects_a_wrong_checkpoint(tmp_path: Path, threads) -> None:
    """The comparison can fail: resuming from a checkpoint one step early differs."""
    whole = build()
    run(whole, 0, STEPS)
    early = build()
    run(early, 0, 2)
    resumed = build()
    for name, part in resumed.items():
        part.load_state_dict(checkpoint(early)[name])
    run(resumed, 3, STEPS)
    assert max_difference(result(resumed), result(whole)) > 0


def _lambda_run(saved: bytes | None, start: int, stop: int) -> tuple[dict, bytes]:
    """LambdaSL variant of the loop, in this process; returns its result and checkpoint."""
    import io

    parts = build(lambda sparsifier: prunekit.LambdaSL(sparsifier, lambda epoch: min(1, epoch / 4)))
    if saved is not None:
        loaded = torch.load(io.BytesIO(saved), weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(loaded[name])
    run(parts, start, stop)
    buffer = io.BytesIO()
    torch.save(checkpoint(parts), buffer)
    return result(parts), buffer.getvalue()


def test_lambda_sl_checkpoint_loads_with_weights_only(threads) -> None:
    """LambdaSL leaves its lambdas out of the state_dict (as torch's LambdaLR does): the
    reference's dict holds functions, which torch.save cannot write."""
    expected, _ = _lambda_run(None, 0, STEPS)
    _, saved = _lambda_run(None, 0, 3)
    resumed, _ = _lambda_run(saved, 3, STEPS)
    assert max_difference(resumed, expected) == 0.0
    assert int((~expected["masks"]["0.weight"]).sum()) == 2 * 19  # levels 0.8 and 0.6 reached
    sparsifier = build()["sparsifier"]
    reference_style = {**prunekit.LambdaSL(sparsifier, abs).state_dict(), "sl_lambdas": [round]}
    scheduler = prunekit.LambdaSL(sparsifier, lambda epoch: 0.5)
    scheduler.load_state_dict(reference_style)
    assert scheduler.sl_lambdas[0](7) == 0.5
