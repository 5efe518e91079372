"""The LAMP channel importance plugs into the structured engine's registry."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.accuracy import LAMPImportance, lamp_scores
from prunekit.structured.engine import get_importance, importance_names
from prunekit.structured.engine import prune as structured_prune


def test_registered_and_scores_channel_norms() -> None:
    assert "lamp" in importance_names()
    crit = get_importance("lamp")
    assert isinstance(crit, LAMPImportance)
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # row norms 5, 1, 2
    assert torch.allclose(crit.score(nn.Linear(2, 3), "fc.weight", w, 0),
                          lamp_scores(torch.tensor([5.0, 1.0, 2.0])))
    assert torch.allclose(crit.score(nn.Linear(2, 3), "fc.weight", w, 1),
                          lamp_scores(torch.tensor([10.0, 20.0]).sqrt()))
    assert crit.score(nn.Linear(2, 3), "fc.bias", torch.ones(3), 0) is None


def test_global_lamp_prunes_the_wide_layer_more() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(),
                          nn.Linear(64, 2))
    with torch.no_grad():
        model[2].weight[32:] *= 0.01  # half of the wide layer is nearly dead
    plan = structured_prune(model, torch.randn(2, 8), ratio=0.4, importance="lamp",
                            global_pruning=True)
    plan.apply()
    assert model[2].out_features <= 40
    assert model[0].out_features >= 6
