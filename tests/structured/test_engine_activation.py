"""ActivationImportance: channels ranked by what the calibration data sends through them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, ConfigTypeError
from prunekit.structured.engine import ActivationImportance, prune
from tests.helpers import assert_unchanged, snapshot
from tests.structured.zoo import masked_copy

transformers = pytest.importorskip("transformers")


def _mlp_with_dead_units() -> nn.Sequential:
    """Hidden units 0-7 never fire on positive inputs (large negative bias) yet have the
    largest weights on both sides; units 8-15 fire and have small weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:8] *= 10
        model[0].bias[:8] = -100.0
        model[0].bias[8:] = 1.0
        model[2].weight[:, :8] *= 10
    return model


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(32, 8, generator=g) for _ in range(n)]


def test_the_units_the_data_never_reaches_go_first_where_weight_norms_keep_them():
    model, batches = _mlp_with_dead_units(), _batches()
    kept_by = {}
    for name, importance in [("l2", "l2"), ("activation", ActivationImportance(model, batches))]:
        plan = prune(model, batches[0], ratio=0.5, importance=importance)
        kept_by[name] = plan.groups[0].kept
    assert kept_by["activation"] == tuple(range(8, 16))
    assert kept_by["l2"] == tuple(range(8))  # what a weight norm keeps: the dead units
    plan = prune(model, batches[0], ratio=0.5, importance=ActivationImportance(model, batches))
    expected = model(batches[0])
    plan.apply()
    torch.testing.assert_close(model(batches[0]), expected)  # the dropped units were dead


def test_scores_are_the_input_norms_and_wanda_weighs_them_by_the_columns():
    torch.manual_seed(0)
    gpt2_layer = transformers.pytorch_utils.Conv1D(5, 6)  # weight in x out
    model = nn.ModuleDict({"lin": nn.Linear(6, 5), "conv": nn.Conv2d(3, 4, 3),
                           "gpt2": gpt2_layer})  # fmt: skip

    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
            return self.m["lin"](x).sum() + self.m["conv"](image).sum() + self.m["gpt2"](x).sum()

    x, image = torch.randn(4, 7, 6), torch.randn(2, 3, 8, 8)
    runner = Run()
    activation = ActivationImportance(runner, [(x, image)])
    wanda = ActivationImportance(runner, [(x, image)], score="wanda")
    x_norms = x.reshape(-1, 6).double().norm(dim=0)
    image_norms = image.transpose(0, 1).reshape(3, -1).double().norm(dim=1)
    lin, conv = model["lin"], model["conv"]
    torch.testing.assert_close(activation.score(lin, "m.lin.weight", lin.weight, 1), x_norms)
    torch.testing.assert_close(activation.score(conv, "m.conv.weight", conv.weight, 1),
                               image_norms)  # fmt: skip
    torch.testing.assert_close(activation.score(gpt2_layer, "m.gpt2.weight",
                                                gpt2_layer.weight, 0), x_norms)  # fmt: skip
    columns = lin.weight.detach().double().norm(dim=0)
    torch.testing.assert_close(wanda.score(lin, "m.lin.weight", lin.weight, 1), x_norms * columns)
    # outputs, biases and layers that do not read channels have no opinion
    assert activation.score(lin, "m.lin.weight", lin.weight, 0) is None
    assert activation.score(lin, "m.lin.bias", lin.bias, 0) is None
    assert activation.score(nn.LayerNorm(6), "norm.weight", nn.LayerNorm(6).weight, 0) is None


def test_a_causal_lm_is_ranked_by_its_activations_and_shrinks_exactly():
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (2, 8), generator=g) for _ in range(3)]
    training = {name: m.training for name, m in model.named_modules()}
    before = snapshot(model)
    importance = ActivationImportance(model, batches)
    assert_unchanged(before, model)  # scoring runs the model only
    assert {n: m.training for n, m in model.named_modules()} == training
    assert model.config.use_cache is True
    plan = prune(model, batches[0], ratio=0.5, importance=importance)
    assert plan.settings["importance"] == "activation"
    masked = masked_copy(model, plan)
    plan.apply()
    with torch.no_grad():
        torch.testing.assert_close(model(batches[1]).logits, masked(batches[1]).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert plan.config_changes["hidden_size"] == (64, 32)


def test_bad_input_is_refused_before_anything_changes():
    model, batches = _mlp_with_dead_units(), _batches()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="no calibration batches"):
        ActivationImportance(model, [])
    with pytest.raises(ConfigTypeError, match="must be a list of batches"):
        ActivationImportance(model, batches[0])
    with pytest.raises(ConfigError, match="score must be one of"):
        ActivationImportance(model, batches, score="l2")
    with pytest.raises(ConfigError, match="calibration batch 1: the model's forward failed"):
        ActivationImportance(model, [batches[0], torch.randn(4, 5)])
    assert not model[0]._forward_pre_hooks  # its hooks are gone after a failure too
    with pytest.raises(ConfigError, match=r"no nn\.Linear, Conv1D or ungrouped"):
        ActivationImportance(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), [torch.randn(1, 4, 5, 5)])
    other = ActivationImportance(_mlp_with_dead_units(), batches)  # another instance
    with pytest.raises(ConfigError, match=r"no activations for 0\.weight"):
        prune(model, batches[0], ratio=0.5, importance=other)
    assert_unchanged(before, model)
