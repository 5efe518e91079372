"""The magnitude criteria and how the engine aggregates them over a group of coupled
layers: producer rows, BatchNorm scale and consumer columns count; biases do not."""

import pytest
import torch
from torch import nn

from prunekit.structured.engine import get_importance, prune


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_magnitude_scores_each_entry_of_a_1d_tensor(name):
    gamma = nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    scores = get_importance(name).score(nn.BatchNorm2d(4), "bn.weight", gamma, 0)
    torch.testing.assert_close(scores, gamma.detach().abs())


@pytest.mark.parametrize(("name", "p"), [("l1", 1), ("l2", 2)])
def test_magnitude_scores_the_slice_along_dim(name, p):
    w = nn.Parameter(torch.randn(5, 3, 2, 2))
    for dim in (0, 1):
        want = torch.linalg.vector_norm(w.detach().movedim(dim, 0).flatten(1), ord=p, dim=1)
        torch.testing.assert_close(get_importance(name).score(None, "c.weight", w, dim), want)


@pytest.mark.parametrize("fqn", ["conv.bias", "bn.bias", "bias"])
def test_biases_have_no_opinion(fqn):
    bias = nn.Parameter(torch.randn(4))
    assert get_importance("l2").score(None, fqn, bias, 0) is None
    assert get_importance("l1").score(None, fqn, bias, 0) is None


def _conv_bn_conv() -> nn.Sequential:
    """Every channel of the first conv has the same weight norm in both convs, so only
    the BatchNorm scale (and the bias, which must not count) tells the channels apart."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[3].weight.fill_(0.1)
        model[1].weight.copy_(torch.tensor([1.0, 0.01, 1.0, 0.02]))
        model[1].bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))
        model[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 30.0]))
    return model.eval()


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_group_score_counts_batchnorm_scale_not_biases(criterion):
    plan = prune(_conv_bn_conv(), torch.randn(1, 2, 6, 6), ratio=0.5, importance=criterion)
    (group,) = [g for g in plan.groups if g.members[0] == "0.weight[0]"]
    assert group.kept == (0, 2)  # the two channels with the small gamma go, big biases or not


def test_group_score_counts_the_consumer_columns():
    model = _conv_bn_conv()
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[3].weight[:, 2].zero_()  # channel 2 feeds nothing: least important
    plan = prune(model, torch.randn(1, 2, 6, 6), ratio=0.25)
    (group,) = [g for g in plan.groups if g.members[0] == "0.weight[0]"]
    assert group.kept == (0, 1, 3)
