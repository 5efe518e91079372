"""Gradual pruning (WeightNormSparsifier + CubicSL) under DDP and FSDP2 on 2 gloo ranks:
masks agree across ranks and with the single-process run on the same global batches.

One spawn runs every scenario (spawning is the slow part); the tests read its results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import prunekit
from tests.trust._helpers import CONFIG, make_sparsifier, single_process_run, tiny_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD = 2
SCENARIOS = ["ddp", "fsdp2", "fsdp2_root_eval"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from tests.trust._dist_worker import worker
    from tests.trust._helpers import free_port

    outdir = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(WORLD, free_port(), str(outdir)), nprocs=WORLD, join=True)
    return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return single_process_run()


def assert_masks_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() == {"0.weight", "2.weight"}
    for fqn in a:
        assert a[fqn].dtype == torch.bool
        assert torch.equal(a[fqn], b[fqn]), fqn


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_masks_identical_on_all_ranks(ranks: list[dict[str, Any]], scenario: str) -> None:
    assert_masks_equal(ranks[0][scenario]["masks"], ranks[1][scenario]["masks"])
    for key, value in ranks[0][scenario]["weights"].items():
        assert torch.equal(value, ranks[1][scenario]["weights"][key]), key


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_masks_and_weights_match_single_process(
    ranks: list[dict[str, Any]], single: dict[str, Any], scenario: str
) -> None:
    result = ranks[0][scenario]
    assert_masks_equal(result["masks"], single["masks"])
    # the final level of the schedule is reached: 80% and 60% of the blocks are zero
    assert float((~single["masks"]["0.weight"]).float().mean()) == pytest.approx(0.8, abs=0.05)
    assert float((~single["masks"]["2.weight"]).float().mean()) == pytest.approx(0.6, abs=0.1)
    for key, expected in single["weights"].items():
        # gradients are averaged over ranks in another order: equal up to fp64 rounding
        torch.testing.assert_close(result["weights"][key], expected, rtol=0, atol=1e-12)


def test_ddp_squash_bakes_the_masks(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    squashed = ranks[0]["ddp"]["squashed"]
    assert set(squashed) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for fqn, mask in single["masks"].items():
        assert torch.equal(squashed[fqn] != 0, mask), fqn
        torch.testing.assert_close(squashed[fqn], single["squashed"][fqn], rtol=0, atol=1e-12)


@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp2_root_eval"])
def test_fsdp2_sharded_weights_hold_the_zeros(ranks: list[dict[str, Any]], scenario: str) -> None:
    """Masks reach the sharded storage, also when FSDP2 had left the weights gathered
    after a no-grad forward (the sparsifier reshards before it steps)."""
    result = ranks[0][scenario]
    for fqn, mask in result["masks"].items():
        original = result["weights"][fqn.replace(".weight", ".parametrizations.weight.original")]
        assert not original[~mask].any(), fqn


def test_fsdp2_state_dict_is_sharded(ranks: list[dict[str, Any]]) -> None:
    keys = {
        "0.parametrizations.weight.original",
        "0.bias",
        "2.parametrizations.weight.original",
        "2.bias",
    }
    for rank in ranks:
        assert set(rank["fsdp2"]["is_dtensor"]) == keys
        assert all(rank["fsdp2"]["is_dtensor"].values())
    rows = [{k: int(v) for k, v in rank["fsdp2"]["local_rows"].items()} for rank in ranks]
    assert rows[0]["0.parametrizations.weight.original"] == rows[1]["0.bias"] == 3
    assert rows[0]["2.parametrizations.weight.original"] == rows[1]["2.bias"] == 2


def test_prepare_inside_ddp_is_refused(ranks: list[dict[str, Any]]) -> None:
    message = ranks[0]["ddp"]["refused"]
    assert "prepare: 'the model' is wrapped in DistributedDataParallel" in message
    assert "before DistributedDataParallel(model)" in message


def test_fsdp2_refusals_change_nothing(ranks: list[dict[str, Any]]) -> None:
    refused = ranks[0]["fsdp2"]["refused"]
    assert refused.keys() == {
        "prepare_config",
        "prepare_none",
        "load_state_dict",
        "squash_float_mask",
    }
    assert "squash_mask: '0.weight' is sharded" in refused["squash_float_mask"]
    assert "unsharded copy" in refused["squash_float_mask"]
    assert "config[0]: '0.weight' is already sharded" in refused["prepare_config"]
    assert "parameter '0.weight' is already sharded" in refused["prepare_none"]
    assert "before fully_shard(model)" in refused["prepare_none"]
    assert "load_state_dict: '0.weight' is already sharded" in refused["load_state_dict"]


@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp2_root_eval"])
def test_fsdp2_squash_mask_in_place(
    ranks: list[dict[str, Any]], single: dict[str, Any], scenario: str
) -> None:
    """squash_mask on the sharded model: plain keys, FSDP2 still manages the weights, the
    output is unchanged and the weights equal the single-process squash."""
    for rank in ranks:
        squash = rank[scenario]["squash"]
        wrapped = "FSDPLinear" if scenario == "fsdp2" else "Linear"
        assert squash["types"] == [wrapped, "ReLU", wrapped]
        assert squash["same_output"] and squash["grads"]
        assert set(squash["weights"]) == set(single["squashed"])
        for key, expected in single["squashed"].items():
            torch.testing.assert_close(squash["weights"][key], expected, rtol=0, atol=1e-12)
        for fqn, mask in single["masks"].items():
            assert torch.equal(squash["weights"][fqn] != 0, mask), fqn


def test_fsdp2_checkpoint_squashes_in_an_unsharded_copy(
    ranks: list[dict[str, Any]], single: dict[str, Any]
) -> None:
    """The documented route to a squashed model after sharded training."""
    saved = ranks[1]["fsdp2"]
    model = tiny_model()
    sparsifier = make_sparsifier(model)
    model.load_state_dict(saved["weights"])
    sparsifier.load_state_dict(saved["sparsifier_state"])
    sparsifier.squash_mask()
    assert not any("parametrizations" in k for k in model.state_dict())
    for fqn, mask in single["masks"].items():
        assert torch.equal(model.state_dict()[fqn] != 0, mask), fqn
    for key, expected in single["squashed"].items():
        torch.testing.assert_close(model.state_dict()[key], expected, rtol=0, atol=1e-12)
    assert [g["tensor_fqn"] for g in sparsifier.groups] == [c["tensor_fqn"] for c in CONFIG]
    assert isinstance(sparsifier, prunekit.WeightNormSparsifier)


def test_structured_mask_phase_in_ddp_matches_single_process(ranks: list[dict[str, Any]]) -> None:
    """SaliencyPruner + CubicSL inside DDP: the same row masks on every rank and as in one
    process, and prune() shrinks every rank to the same weights."""
    from tests.trust._helpers import single_structured_run

    expected = single_structured_run()
    assert int((~expected["masks"]["0.weight"]).sum()) == 3  # half of the 6 rows pruned
    for rank in ranks:
        result = rank["ddp_structured"]
        assert torch.equal(result["masks"]["0.weight"], expected["masks"]["0.weight"])
        assert result["pruned"]["0.weight"].shape == (3, 8)
        for key, value in expected["pruned"].items():
            torch.testing.assert_close(result["pruned"][key], value, rtol=0, atol=1e-12)
