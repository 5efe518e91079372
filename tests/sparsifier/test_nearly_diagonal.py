import pytest
import torch
from torch import nn
from torch.ao import pruning as ref

from prunekit import ConfigError, ConfigTypeError, NearlyDiagonalSparsifier
from tests.helpers import assert_unchanged, snapshot


@pytest.mark.parametrize("shape", [(8, 8), (5, 9), (9, 5), (1, 4)])
@pytest.mark.parametrize("nearliness", [0, 1, 3, 5, -1])
def test_matches_reference(shape, nearliness):
    if nearliness // 2 >= min(shape):
        return
    models = [nn.Sequential(nn.Linear(shape[1], shape[0])) for _ in range(2)]
    ours, theirs = NearlyDiagonalSparsifier(nearliness), ref.NearlyDiagonalSparsifier(nearliness)
    for sparsifier, model in zip([ours, theirs], models, strict=True):
        sparsifier.prepare(model, None)
        sparsifier.step()
    a = models[0][0].parametrizations.weight[0].mask
    b = models[1][0].parametrizations.weight[0].mask
    assert a.dtype == torch.bool and torch.equal(a, b.bool())


@pytest.mark.parametrize(
    ("nearliness", "error", "message"),
    [
        (2, ConfigError, "odd number, got 2"),
        (9, ConfigError, r"nearliness // 2 < 4 for shape \(4, 6\)"),
        (1.0, ConfigTypeError, "must be an odd int"),
    ],
)
def test_bad_nearliness_leaves_model_unchanged(nearliness, error, message):
    model = nn.Sequential(nn.Linear(6, 4))
    sparsifier = NearlyDiagonalSparsifier()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        sparsifier.prepare(model, [{"tensor_fqn": "0.weight", "nearliness": nearliness}])
    assert_unchanged(before, model)


def test_non_2d_weight_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 2, 3))
    with pytest.raises(ConfigError, match=r"needs a 2-D weight, got shape \(2, 2, 3, 3\)"):
        NearlyDiagonalSparsifier(1).prepare(model, [{"tensor_fqn": "0.weight"}])


def test_even_default_is_refused_at_construction():
    with pytest.raises(ConfigError, match="odd"):
        NearlyDiagonalSparsifier(4)
