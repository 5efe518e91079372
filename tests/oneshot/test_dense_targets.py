"""oneshot(dense_targets=True): every layer is refit towards the dense model's outputs
before it is pruned (a residual branch's last layer towards the dense residual sum);
checked against manual computations with the ridge least-squares closed forms, exact
sparsity and N:M, and a no-op at sparsity 0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit import SparseGPTSparsifier, WandaSparsifier
from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError
from tests.helpers import assert_unchanged, prune_manually, snapshot, stack_of_blocks

CALIBRATED = {"sparsegpt": SparseGPTSparsifier, "wanda": WandaSparsifier}


def ridge_refit(weight: torch.Tensor, sparse: list, dense: list, percdamp: float = 0.01):
    """argmin_V ||W X_d - V X_s||² + λ||V - W||², λ = percdamp * mean diag(X_sᵀX_s)."""
    xs, xd = torch.cat(sparse).double(), torch.cat(dense).double()
    h = xs.T @ xs
    lam = percdamp * float(h.diagonal().mean())
    w = weight.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    v = torch.linalg.solve(h + lam * eye, (xs.T @ xd) @ w.T + lam * w.T)
    return v.T.float()


@pytest.mark.parametrize("method", sorted(CALIBRATED))
def test_each_block_is_refit_to_dense_targets_then_pruned(method):
    """Block i+1's layer is refit on (pruned inputs, dense inputs) by the ridge closed
    form, then pruned as usual; the dense stream runs through the dense blocks."""
    torch.manual_seed(3)
    batches = [torch.randn(48, 16) for _ in range(2)]
    model = stack_of_blocks()
    prunekit.oneshot(model, batches, method, blocks="", dense_targets=True, progress=False)
    manual, dense = stack_of_blocks(), stack_of_blocks()
    xs, xd = list(batches), list(batches)
    for block, twin in zip(manual, dense, strict=True):
        with torch.no_grad():
            block[0].weight.copy_(ridge_refit(block[0].weight, xs, xd))
        prune_manually(CALIBRATED[method], block[0], xs)
        with torch.no_grad():
            xs, xd = [block(x) for x in xs], [twin(x) for x in xd]
    for ours, theirs in zip(model, manual, strict=True):
        torch.testing.assert_close(ours[0].weight, theirs[0].weight, rtol=1e-4, atol=1e-5)


class TwoResiduals(nn.Module):
    """``h = x + mid(relu(first(x)))``, then ``h + down(relu(up(tanh(h))))``: ``mid``
    joins the residual sum ``norm`` reads, ``down`` the block's output (a Llama block's
    ``o_proj`` and ``down_proj``); ``first`` and ``up`` join none."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.mid = nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm, self.up, self.down = nn.Tanh(), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.mid(torch.relu(self.first(x)))
        return h + self.down(torch.relu(self.up(self.norm(h))))

    def middle(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mid(torch.relu(self.first(x)))


def sum_refit(weight: torch.Tensor, inputs: list, errors: list, percdamp: float = 0.01):
    """argmin_V ||W X_s + (sum_d - sum_s) - V X_s||² + λ||V - W||²."""
    xs, err = torch.cat(inputs).double(), torch.cat(errors).double()
    h = xs.T @ xs
    lam = percdamp * float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return (weight.double() + torch.linalg.solve(h + lam * eye, xs.T @ err).T).float()


@pytest.mark.parametrize("method", sorted(CALIBRATED))
def test_residual_branches_are_fitted_to_the_dense_residual_sums(method):
    """``first`` and ``up`` are refit layer-wise; ``mid`` towards the dense value of the
    mid-block sum, ``down`` towards the dense block output: both also absorb the error
    the residual stream carried in."""
    torch.manual_seed(4)
    batches = [torch.randn(64, 16) for _ in range(2)]
    torch.manual_seed(5)
    model = nn.Sequential(TwoResiduals(), TwoResiduals())
    reference = copy.deepcopy(model)
    prunekit.oneshot(model, batches, method, blocks="", dense_targets=True, progress=False)
    manual, dense = copy.deepcopy(reference), reference
    xs, xd = list(batches), list(batches)
    cls = CALIBRATED[method]
    for block, twin in zip(manual, dense, strict=True):
        with torch.no_grad():
            block.first.weight.copy_(ridge_refit(block.first.weight, xs, xd))
            prune_manually(cls, block.first, xs)
            hidden = [torch.relu(block.first(x)) for x in xs]
            errors = [twin.middle(d) - block.middle(x) for x, d in zip(xs, xd, strict=True)]
            block.mid.weight.copy_(sum_refit(block.mid.weight, hidden, errors))
            prune_manually(cls, block.mid, hidden)
            normed = [torch.tanh(block.middle(x)) for x in xs]
            block.up.weight.copy_(ridge_refit(
                block.up.weight, normed, [torch.tanh(twin.middle(d)) for d in xd]))
            prune_manually(cls, block.up, normed)
            hidden = [torch.relu(block.up(n)) for n in normed]
            errors = [twin(d) - block(x) for x, d in zip(xs, xd, strict=True)]
            block.down.weight.copy_(sum_refit(block.down.weight, hidden, errors))
            prune_manually(cls, block.down, hidden)
            xs, xd = [block(x) for x in xs], [twin(x) for x in xd]
    for ours, theirs in zip(model, manual, strict=True):
        for name in ("first", "mid", "up", "down"):
            torch.testing.assert_close(getattr(ours, name).weight, getattr(theirs, name).weight,
                                       rtol=1e-4, atol=1e-5)


def test_residual_sinks_are_found_on_the_block():
    from prunekit.oneshot.dense_targets import residual_sink
    from prunekit.oneshot.engine import BlockInput, _hidden_until

    record = BlockInput((torch.randn(4, 16),), {})
    block = TwoResiduals()
    sinks = {name: residual_sink(block, getattr(block, name), record, _hidden_until)
             for name in ("first", "mid", "up", "down")}
    assert sinks == {"first": None, "mid": "norm", "up": None, "down": ""}
    alone = nn.Sequential(nn.Linear(16, 16), nn.Dropout(), nn.Tanh())  # dropout reads no sum
    assert residual_sink(alone.eval(), alone[0], record, _hidden_until) is None
    twice = nn.Sequential(block.up, nn.ReLU(), block.down, nn.Linear(16, 32), nn.ReLU(),
                          block.down)
    assert residual_sink(twice, block.down, record, _hidden_until) is None


@pytest.mark.parametrize("method", sorted(CALIBRATED))
def test_dense_targets_bring_the_output_closer_to_the_dense_model(llama, batches, method):
    with torch.no_grad():
        dense = [llama(b).logits for b in batches]
    errors = {}
    for flag in (False, True):
        model = copy.deepcopy(llama)
        prunekit.oneshot(model, batches, method, dense_targets=flag, progress=False)
        with torch.no_grad():
            errors[flag] = sum(
                float((model(b).logits - d).norm()) for b, d in zip(batches, dense, strict=True))
    assert errors[True] < 0.8 * errors[False], errors


@pytest.mark.parametrize("method", sorted(CALIBRATED))
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_exact_sparsity_and_nm_still_hold(llama, batches, method, pattern):
    model = copy.deepcopy(llama)
    report = prunekit.oneshot(model, batches, method, pattern=pattern, sparsity=None if pattern
                              else 0.75, dense_targets=True, progress=False)
    assert set(report.values()) == {0.5 if pattern else 0.75}
    if pattern:
        for name in report:
            w = model.get_submodule(name).weight
            assert (w != 0).view(w.shape[0], -1, 4).sum(-1).eq(2).all()


@pytest.mark.parametrize("method", sorted(CALIBRATED))
def test_sparsity_zero_leaves_the_model_bit_for_bit_unchanged(llama, batches, method):
    model = copy.deepcopy(llama)
    before = snapshot(model)
    prunekit.oneshot(model, batches, method, sparsity=0.0, dense_targets=True, progress=False)
    assert_unchanged(before, model)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"dense_targets": 1}, ConfigTypeError, "dense_targets must be a bool, got 1"),
    ({"dense_targets": True, "method": "magnitude"}, ConfigError, "magnitude' uses none"),
])
def test_bad_dense_targets_are_refused_before_any_change(llama, batches, kwargs, error, message):
    model = copy.deepcopy(llama)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        prunekit.oneshot(model, batches, **{"method": "sparsegpt", "progress": False, **kwargs})
    assert_unchanged(before, model)


class Repeat(nn.Module):
    """Runs its layer twice on inputs whose absolute sum exceeds ``threshold``: control
    flow that depends on the data, so pruned and dense inputs may take other paths."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.a, self.threshold = nn.Linear(8, 8), threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(self.a(x)) if float(x.abs().sum()) > self.threshold else self.a(x)
        return torch.tanh(y)  # not a residual branch: the layer is fitted layer-wise


def test_a_layer_run_more_often_in_the_dense_copy_is_refused_by_name():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = nn.Sequential(nn.Linear(8, 8), Repeat(float("inf")))
    pruned = copy.deepcopy(model)
    prunekit.oneshot(pruned, [x], "wanda", blocks="", sparsity=0.9, progress=False)
    with torch.no_grad():
        dense_sum, pruned_sum = float(model[0](x).abs().sum()), float(pruned[0](x).abs().sum())
    assert dense_sum != pruned_sum
    model[1].threshold = (dense_sum + pruned_sum) / 2
    message = r"'1\.a' ran [12] times in the pruned block but [12]"
    with pytest.raises(UnsupportedError, match=message):
        prunekit.oneshot(model, [x], "wanda", blocks="", sparsity=0.9, dense_targets=True,
                         progress=False)
