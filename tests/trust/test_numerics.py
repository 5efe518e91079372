"""Odd weights: NaN and Inf, fp16 and bf16, zero-size tensors, the meta device, and
weights tied between modules. Documented behaviour, never a crash deep inside."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.ao import pruning as ref
from torch.nn.utils import parametrize

import prunekit
from prunekit.masks import weight_norm_mask
from tests.trust._helpers import assert_same_model, model_snapshot

NAN, INF = float("nan"), float("inf")


def linear_with(weight: torch.Tensor) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0])).to(weight.dtype)
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


def odd_weight() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    w[0, 1], w[1, 2], w[2, 3], w[3, 0] = NAN, INF, -INF, NAN
    return w


# -- NaN and Inf ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("block", "zeros", "level"),
    [((1, 1), None, 0.5), ((1, 4), None, 0.5), ((1, 4), 2, 1.0), ((2, 2), None, 0.5)],
)
def test_nan_and_inf_rank_highest_like_the_reference(block, zeros, level) -> None:
    """Scores of NaN and +-Inf weights rank above every finite score (as torch.topk ranks
    them in the reference): they are kept, and exactly the scheduled count is pruned.
    (Only a level that must choose among the non-finite scores can break ties otherwise.)"""
    kwargs = {"sparsity_level": level, "sparse_block_shape": block}
    if zeros is not None:
        kwargs["zeros_per_block"] = zeros
    masks = []
    for lib in (prunekit, ref):
        model = linear_with(odd_weight())
        sparsifier = lib.WeightNormSparsifier(**kwargs)
        sparsifier.prepare(model, None)
        sparsifier.step()
        masks.append(sparsifier.state["0.weight"]["mask"].bool())
    assert torch.equal(masks[0], masks[1])
    assert masks[0][~odd_weight().isfinite()].all()


def test_nan_keeps_its_rank_and_the_count_is_exact() -> None:
    w = odd_weight()
    keep = weight_norm_mask(w, 0.75, (1, 1))
    assert int((~keep).sum()) == 24  # round(0.75 * 32), NaN or not
    assert keep[~w.isfinite()].all()
    assert keep[w.isfinite()].sum() == 4  # the 4 kept finite weights are the largest
    finite = w[w.isfinite()].abs()
    assert finite[keep[w.isfinite()]].min() >= finite[~keep[w.isfinite()]].max()


def test_pruned_nan_and_inf_become_exact_zeros() -> None:
    """The reference multiplies, so a pruned NaN stays NaN (NaN * 0); here the masked
    entries are zeroed in place, so a fully pruned tensor is all zeros."""
    model = linear_with(odd_weight())
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 1))
    sparsifier.prepare(model, None)
    sparsifier.step()
    assert torch.equal(model[0].weight, torch.zeros(4, 8))
    sparsifier.squash_mask()
    assert torch.equal(model[0].weight, torch.zeros(4, 8))


def test_all_nan_weight_steps_without_error() -> None:
    model = linear_with(torch.full((4, 8), NAN))
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, None)
    sparsifier.step()
    assert int((~sparsifier.state["0.weight"]["mask"]).sum()) == 16
    assert int((model[0].weight == 0).sum()) == 16


# -- fp16 and bf16 -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", [None, 1, torch.square])
def test_half_precision_masks_are_scored_in_fp32(dtype: torch.dtype, norm) -> None:
    """Masks of a half-precision weight equal those of its exact fp32 copy, even where
    the squares overflow fp16 (|w| > 256) or lose bf16's few mantissa bits."""
    torch.manual_seed(0)
    w = (torch.randn(16, 32) * torch.logspace(-3, 3, 32)).to(dtype)
    assert (w.float().square() > torch.finfo(torch.float16).max).any()
    for block, zeros in [((1, 1), None), ((1, 4), None), ((1, 4), 2), ((2, 2), 3)]:
        kwargs = {"sparsity_level": 0.6, "sparse_block_shape": block, "norm": norm}
        if zeros is not None:
            kwargs["zeros_per_block"] = zeros
        masks = []
        for weight in (w, w.float()):
            model = linear_with(weight)
            sparsifier = prunekit.WeightNormSparsifier(**kwargs)
            sparsifier.prepare(model, None)
            sparsifier.step()
            assert model[0].weight.dtype == weight.dtype
            masks.append(sparsifier.state["0.weight"]["mask"])
        assert masks[0].dtype == torch.bool
        assert torch.equal(masks[0], masks[1]), (block, zeros)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_life_cycle(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, None)
    scheduler = prunekit.CubicSL(sparsifier, delta_t=1, total_t=2)
    for _ in range(3):
        model(torch.randn(2, 8, dtype=dtype)).float().sum().backward()
        sparsifier.step()
        scheduler.step()
    sparsifier.squash_mask()
    assert model[0].weight.dtype == dtype
    assert int((model[0].weight == 0).sum()) == 32


# -- zero-size weights ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0, 0)])
@pytest.mark.parametrize(("block", "zeros"), [((1, 1), None), ((1, 4), None), ((1, 4), 2)])
def test_zero_size_weights(shape: tuple[int, int], block, zeros) -> None:
    model = nn.Sequential(nn.Linear(shape[1], shape[0]), nn.Linear(shape[0], 3))
    kwargs = {"sparsity_level": 0.5, "sparse_block_shape": block}
    if zeros is not None:
        kwargs["zeros_per_block"] = zeros
    sparsifier = prunekit.WeightNormSparsifier(**kwargs)
    sparsifier.prepare(model, None)
    scheduler = prunekit.CubicSL(sparsifier, delta_t=1, total_t=2)
    for _ in range(2):
        sparsifier.step()
        scheduler.step()
    assert sparsifier.state["0.weight"]["mask"].shape == shape
    assert model(torch.randn(2, shape[1])).shape == (2, 3)
    sparsifier.squash_mask()
    assert model[0].weight.shape == shape


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_size_weight_refused_by_nearly_diagonal() -> None:
    model = nn.Sequential(nn.Linear(0, 4))
    before = model_snapshot(model)
    with pytest.raises(prunekit.ConfigError, match=r"'0.weight'.*shape \(4, 0\)"):
        prunekit.NearlyDiagonalSparsifier(nearliness=1).prepare(model, None)
    assert_same_model(before, model)


# -- meta device ---------------------------------------------------------------------------
def meta_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))


def test_meta_model_plans_without_memory() -> None:
    """prepare, state_dict and squash_mask work on a meta model: groups, mask shapes
    and fqns can be checked before any weight exists."""
    model = meta_model()
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, None)
    prunekit.CubicSL(sparsifier, delta_t=1, total_t=4)
    state = sparsifier.state_dict()
    assert {fqn: tuple(s["mask"].shape) for fqn, s in state["state"].items()} == {
        "0.weight": (4096, 4096),
        "2.weight": (1024, 4096),
    }
    assert all(s["mask"].device.type == "meta" for s in state["state"].values())
    sparsifier.squash_mask()
    assert not parametrize.is_parametrized(model[0])


def test_meta_model_step_is_refused_and_changes_nothing() -> None:
    model = meta_model()
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, None)
    before = model_snapshot(model)
    with pytest.raises(prunekit.UnsupportedError, match=r"'0.weight' is on the meta device"):
        sparsifier.step()
    assert model[0].weight.device.type == "meta"
    assert model_snapshot(model)["plists"] == before["plists"]


def test_meta_plan_then_materialize() -> None:
    """The documented route: plan on meta, then prepare the real model with that config."""
    planned = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    planned.prepare(meta_model(), None)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": g["tensor_fqn"]} for g in planned.groups])
    sparsifier.step()
    assert float((model[0].weight == 0).float().mean()) == 0.5


# -- tied weights --------------------------------------------------------------------------
class Tied(nn.Module):
    """An embedding tied to the output head, plus two Linear layers sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(self.emb(tokens))))


def test_tied_weights_get_one_mask() -> None:
    model = Tied()
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.prepare(model, None)  # a, b and head are Linear; b holds a's weight
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["a.weight", "head.weight"]
    assert sorted(sparsifier.state) == ["a.weight", "head.weight"]
    assert model.a.parametrizations.weight[0] is model.b.parametrizations.weight[0]
    assert model.emb.parametrizations.weight[0] is model.head.parametrizations.weight[0]
    sparsifier.step()
    for one, other in [(model.a, model.b), (model.emb, model.head)]:
        assert torch.equal(one.weight, other.weight)
        assert float((one.weight == 0).float().mean()) == 0.5
    model(torch.tensor([1, 2, 3])).sum().backward()
    original = model.a.parametrizations.weight.original
    assert original is model.b.parametrizations.weight.original
    assert not original.grad[~sparsifier.state["a.weight"]["mask"]].any()
    with pytest.raises(prunekit.ConfigError, match=r"'emb\.weight' is already prepared"):
        sparsifier.prepare(model, [{"tensor_fqn": "emb.weight"}])  # masked through head


def test_tied_weights_listed_twice_are_refused() -> None:
    model = Tied()
    before = model_snapshot(model)
    with pytest.raises(
        prunekit.ConfigError, match=r"config\[1\]: 'b.weight' is the same Parameter as 'a.weight'"
    ):
        prunekit.WeightNormSparsifier().prepare(
            model, [{"tensor_fqn": "a.weight"}, {"tensor_fqn": "b.weight"}]
        )
    assert_same_model(before, model)


def test_tied_weights_squash_and_reload_keep_the_tie() -> None:
    model = Tied()
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1))
    sparsifier.prepare(model, [{"tensor_fqn": "emb.weight"}, {"tensor_fqn": "a.weight"}])
    sparsifier.step()
    saved = sparsifier.state_dict()
    fresh = Tied()
    loader = prunekit.WeightNormSparsifier(sparse_block_shape=(1, 1))
    loader.load_state_dict(saved, model=fresh)
    assert fresh.emb.parametrizations.weight[0] is fresh.head.parametrizations.weight[0]
    assert torch.equal(
        fresh.head.parametrizations.weight[0].mask, saved["state"]["emb.weight"]["mask"]
    )
    for sparsifier_, model_ in [(sparsifier, model), (loader, fresh)]:
        sparsifier_.squash_mask()
        assert not any(parametrize.is_parametrized(m) for m in model_.modules())
        assert model_.head.weight is model_.emb.weight and model_.b.weight is model_.a.weight
        assert math.isclose(float((model_.head.weight == 0).float().mean()), 0.5)
