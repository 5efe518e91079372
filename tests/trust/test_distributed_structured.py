"""FSDP2 on 2 gloo ranks, part two: a structured pruner's mask phase (SaliencyPruner +
CubicSL) on sharded parameters, and exact resume through torch.distributed.checkpoint.

Two spawns: the first runs the structured scenario and the resume check's uninterrupted
and interrupted runs (saving a DCP checkpoint mid-schedule); the second, in new
processes, loads the checkpoint and finishes the schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    import torch.multiprocessing as mp

    from tests.trust._dist_structured_worker import resume_worker, worker
    from tests.trust._helpers import free_port

    outdir = tmp_path_factory.mktemp("dist_structured")
    loaded: dict[str, list[dict[str, Any]]] = {}
    for name, body in (("first", worker), ("resumed", resume_worker)):
        mp.spawn(body, args=(WORLD, free_port(), str(outdir)), nprocs=WORLD, join=True)
        paths = [Path(outdir) / f"{name}{r}.pt" for r in range(WORLD)]
        loaded[name] = [torch.load(path, weights_only=True) for path in paths]
    return loaded


def _single(finish: str) -> dict[str, Any]:
    """The same schedule in this process on the full batches, then ``prune`` or ``squash``."""
    from tests.trust._dist_structured_worker import structured_run

    run = structured_run()
    getattr(run["pruner"], "prune" if finish == "prune" else "squash_mask")()
    weights = {k: v.detach().clone() for k, v in run["model"].state_dict().items()}
    return {"history": run["history"], "weights": weights}


@pytest.fixture(scope="module")
def single_pruned() -> dict[str, Any]:
    return _single("prune")


@pytest.fixture(scope="module")
def single_squashed() -> dict[str, Any]:
    return _single("squash")


def _structured(outputs: dict) -> list[dict[str, Any]]:
    return [rank["fsdp2_structured"] for rank in outputs["first"]]


def test_row_masks_at_every_step_match_across_ranks_and_single_process(
    outputs: dict, single_pruned: dict[str, Any]
) -> None:
    expected = single_pruned["history"]
    assert expected.shape == (6, 6) and expected.dtype == torch.bool
    # the schedule prunes one row at a time, and the pruned rows lie on both ranks' shards
    assert [int((~m).sum()) for m in expected] == [0, 1, 2, 2, 3, 3]
    assert (~expected[-1]).nonzero().flatten().tolist() == [1, 3, 5]
    for rank in _structured(outputs):
        assert torch.equal(rank["history"], expected)


def test_fpgm_row_masks_match_across_ranks_and_single_process(outputs: dict) -> None:
    """FPGM compares every row with every other: each rank scores the gathered weight."""
    from tests.trust._dist_structured_worker import structured_run

    expected = structured_run(name="fpgm")["history"]
    assert int((~expected[-1]).sum()) == 3
    for rank in _structured(outputs):
        assert torch.equal(rank["fpgm_history"], expected)


def test_masks_sit_on_sharded_parameters(outputs: dict) -> None:
    for rank in _structured(outputs):
        assert rank["original_is_dtensor"]
        assert int(rank["local_rows"]) == 3  # half of the 6 rows on each rank
        assert int(rank["mask_rows"]) == 6  # the row mask stays full on every rank


def test_prune_on_a_sharded_model_is_refused_and_names_the_way(outputs: dict) -> None:
    """FSDP2 fixes parameter sizes; the refusal leaves the model unchanged (checked in
    the worker) and says how to prune an unsharded copy."""
    for rank in _structured(outputs):
        message = rank["prune_refused"]
        assert message.startswith("prune: parameter '0._bias' is sharded (a DTensor")
        assert "full_state_dict=True" in message
        assert "load pruner.state_dict() into its pruner" in message
        assert "fully_shard the pruned model again" in message


def test_pruned_unsharded_copy_matches_single_process(
    outputs: dict, single_pruned: dict[str, Any]
) -> None:
    expected = single_pruned["weights"]
    assert expected["0.weight"].shape == (3, 8) and expected["2.weight"].shape == (4, 3)
    for rank in _structured(outputs):
        assert rank["pruned"].keys() == expected.keys()
        for key, value in expected.items():
            # gradients are averaged over ranks in another order: equal up to fp64 rounding
            torch.testing.assert_close(rank["pruned"][key], value, rtol=0, atol=1e-12)


def test_squash_mask_on_the_sharded_model_bakes_the_rows(
    outputs: dict, single_squashed: dict[str, Any]
) -> None:
    expected = single_squashed["weights"]
    kept = single_squashed["history"][-1]
    assert not expected["0.weight"][~kept].any()
    for rank in _structured(outputs):
        squash = rank["squash"]
        assert squash["same_output"]
        assert squash["weights"].keys() == expected.keys()
        assert not squash["weights"]["0.weight"][~kept].any()
        for key, value in expected.items():
            torch.testing.assert_close(squash["weights"][key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["unstructured", "structured"])
def test_dcp_resume_in_new_processes_is_bit_identical(outputs: dict, kind: str) -> None:
    """Model, optimizer, sparsifier and scheduler saved mid-schedule with DCP and resumed
    in new processes end exactly where the uninterrupted run ends."""
    final = {"unstructured": 0.8, "structured": 0.5}[kind]
    from tests.trust._helpers import max_difference

    for first, resumed in zip(outputs["first"], outputs["resumed"], strict=True):
        whole, saved = first["resume"][kind]["whole"], first["resume"][kind]["saved"]
        assert 0 < float(saved["level"]) < final  # saved mid-schedule
        assert float(whole["level"]) == final
        assert max_difference(saved, whole) > 0  # the comparison can fail
        assert max_difference(resumed[kind], whole) == 0.0


def test_prepared_model_loads_its_own_state_dict_strictly() -> None:
    """DCP's set_state_dict loads strictly: the row masks belong to the pruner and are not
    expected in the model's state_dict (the reference's persistent buffer was)."""
    from tests.trust._dist_structured_worker import make_pruner, structured_model

    model = structured_model()
    make_pruner(model)
    state = model.state_dict()
    assert sorted(state) == ["0._bias", "0.parametrizations.weight.original", "2.bias", "2.weight"]
    model.load_state_dict(state)  # strict
