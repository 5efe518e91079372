"""The magnitude criteria and how the engine aggregates them over a group of coupled
layers: producer rows, BatchNorm scale and consumer columns count; biases do not.

The magnitude scores are ``sum |w|^p`` per entry (the p-th power of the p-norm, not the
norm as before): members then add up to the channel's group norm, which is what the
engine averages over members without normalising each member by its mean."""

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.structured.engine import get_importance, prune
from prunekit.structured.engine.importance import Importance
from prunekit.structured.engine.select import class_scores


@pytest.mark.parametrize(("name", "p"), [("l1", 1), ("l2", 2)])
def test_magnitude_scores_each_entry_of_a_1d_tensor(name, p):
    gamma = nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    scores = get_importance(name).score(nn.BatchNorm2d(4), "bn.weight", gamma, 0)
    torch.testing.assert_close(scores, gamma.detach().abs() ** p)


@pytest.mark.parametrize(("name", "p"), [("l1", 1), ("l2", 2)])
def test_magnitude_scores_the_slice_along_dim(name, p):
    w = nn.Parameter(torch.randn(5, 3, 2, 2))
    for dim in (0, 1):
        want = w.detach().movedim(dim, 0).flatten(1).abs().pow(p).sum(1)
        torch.testing.assert_close(get_importance(name).score(None, "c.weight", w, dim), want)


def test_only_magnitude_criteria_skip_member_normalisation():
    assert not get_importance("l1").normalise_members
    assert not get_importance("l2").normalise_members
    for name in ("fpgm", "bn_scale", "taylor", "random", "lamp"):
        assert get_importance(name).normalise_members, name


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


def _graph(model: nn.Module, x: torch.Tensor):
    """The engine's channel graph of ``model`` (what ``prune`` scores)."""
    from prunekit.structured.engine.capture import capture
    from prunekit.structured.engine.channels.groups import build_groups
    from prunekit.structured.engine.channels.propagate import propagate

    graph, shapes = capture(model, (x,), frozenset())
    return build_groups(propagate(model, graph, shapes, set(), prune_outputs=False))


def _classes(graph, owner: str, name: str, dim: int) -> np.ndarray:
    (key,) = [k for k, m in graph.members.items() if (m.owner, m.name, m.dim) == (owner, name, dim)]
    return graph.member_classes[key]


def test_group_score_is_the_mean_of_raw_squared_norms_over_members():
    """Producer rows, gamma and consumer columns: their raw squared norms averaged (no
    member divided by its own mean), then the group divided by its mean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([3.0, 0.1, 1.0, 2.0]))
    graph = _graph(model, torch.randn(1, 2, 6, 6))
    scores = class_scores(model, graph, get_importance("l2"))
    raw = (model[0].weight.detach().flatten(1).pow(2).sum(1) + model[1].weight.detach() ** 2
           + model[3].weight.detach().transpose(0, 1).flatten(1).pow(2).sum(1)) / 3
    want = (raw / raw.mean()).double().numpy()
    np.testing.assert_allclose(scores[_classes(graph, "0", "weight", 0)], want, rtol=1e-5)


def test_flattened_consumer_columns_add_up_to_one_member():
    """conv -> flatten -> linear: a channel's 4 linear columns are one member's slice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Flatten(), nn.Linear(12, 2))
    graph = _graph(model, torch.randn(1, 1, 2, 2))
    scores = class_scores(model, graph, get_importance("l2"))
    cols = model[2].weight.detach().pow(2).sum(0).reshape(3, 4).sum(1)
    raw = (model[0].weight.detach().flatten(1).pow(2).sum(1) + cols) / 2
    want = (raw / raw.mean()).double().numpy()
    np.testing.assert_allclose(scores[_classes(graph, "0", "weight", 0)], want, rtol=1e-5)


def _two_scales() -> nn.Sequential:
    """Two hidden groups of width 8, the second's weights 10^4 times larger; in each the
    last four channels are ten times weaker than the first four."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 2))
    with torch.no_grad():
        for layer, scale in ((model[0], 0.01), (model[2], 0.01), (model[4], 100.0)):
            layer.weight.copy_(torch.ones_like(layer.weight) * scale)
        model[0].weight[4:] *= 0.1
        model[2].weight[:, 4:] *= 0.1
        model[2].weight[4:] *= 0.1
        model[4].weight[:, 4:] *= 0.1
    return model


def test_group_scores_are_normalised_by_the_group_mean():
    model = _two_scales()
    graph = _graph(model, torch.randn(2, 4))
    scores = class_scores(model, graph, get_importance("l2"))
    for group in graph.groups:
        finite = scores[group.classes][np.isfinite(scores[group.classes])]
        if finite.size:
            assert finite.mean() == pytest.approx(1.0)


def test_global_pruning_ranks_groups_of_different_scale_alike():
    """Raw group norms would take every removable channel from the small-scale group;
    normalised, each group loses its four weak channels."""
    plan = prune(_two_scales(), torch.randn(2, 4), ratio=0.5, importance="l2",
                 global_pruning=True)
    kept = {g.members[0]: g.kept for g in plan.groups}
    assert kept["0.weight[0]"] == (0, 1, 2, 3)
    assert kept["2.weight[0]"] == (0, 1, 2, 3)


class _Fixed(Importance):
    """Member scores given by hand, to see how the engine combines them."""

    name = "fixed"

    def __init__(self, normalise_members: bool) -> None:
        self.normalise_members = normalise_members

    def score(self, module, fqn, tensor, dim):
        return {("0.weight", 0): _PRODUCER, ("2.weight", 1): _CONSUMER}.get((fqn, dim))


_PRODUCER = torch.tensor([1.0, 2.0, 3.0, 4.0]) * 100.0
_CONSUMER = torch.tensor([4.0, 3.0, 2.0, 1.0])


@pytest.mark.parametrize("normalise_members", [True, False])
def test_member_normalisation_switch(normalise_members):
    """Member-normalised, the 100x larger producer weighs like the consumer and their
    opposite rankings cancel; raw, the producer dominates, then the group is normalised."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    graph = _graph(model, torch.randn(1, 2))
    got = class_scores(model, graph, _Fixed(normalise_members))[_classes(graph, "0", "weight", 0)]
    if normalise_members:
        want = (_PRODUCER / _PRODUCER.mean() + _CONSUMER / _CONSUMER.mean()) / 2
    else:
        raw = (_PRODUCER + _CONSUMER) / 2
        want = raw / raw.mean()
    np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
