"""OWL's sparsity per block (``prunekit.owl_sparsity``): checked against the paper's
formula computed here from stored layer inputs, on a tiny Llama, a plain stack of
layers and a mixture of experts; the model is never changed, bad input refused first."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.oneshot.blocks import resolve_blocks, resolve_layers
from tests.oneshot.test_experts import batches as moe_batches
from tests.oneshot.test_experts import moe


def reference_owl(model: nn.Module, batches: list, sparsity: float, threshold: float,
                  spread: float) -> dict[str, float]:  # fmt: skip
    """The OWL authors' recipe for equal blocks: every layer's inputs stored, a block's
    Wanda scores concatenated, the outlier fraction (> threshold x mean) mapped onto
    [0, 2 spread], shifted to a mean density of 1 - sparsity."""
    per_block = resolve_layers(model, resolve_blocks(model, "auto"), None)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for names in per_block.values() for n in names}
    handles = [prunekit.fqn_to_module(model, n).register_forward_pre_hook(
        lambda _m, args, n=n: inputs[n].append(args[0].reshape(-1, args[0].shape[-1])))
        for n in inputs]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    ratios = []
    for names in per_block.values():
        scores = torch.cat([
            (prunekit.fqn_to_module(model, n).weight.abs().double()
             * torch.cat(inputs[n]).double().norm(dim=0)).flatten() for n in names])
        ratios.append(float((scores > threshold * scores.mean()).double().mean()))
    r = torch.tensor(ratios, dtype=torch.float64)
    density = (r - r.min()) * (2 * spread / (r.max() - r.min()))
    density = density - density.mean() + (1 - sparsity)
    return {n: 1 - float(d) for d, names in zip(density, per_block.values(), strict=True)
            for n in names}


def test_matches_the_papers_recipe(llama, batches):
    got = prunekit.owl_sparsity(llama, batches, 0.6, threshold=3.0, spread=0.1)
    want = reference_owl(llama, batches, 0.6, 3.0, 0.1)
    assert got.keys() == want.keys()
    assert got == pytest.approx(want, abs=1e-12)
    assert len(set(got.values())) == 3  # one level per block, and the blocks differ
    assert max(got.values()) - min(got.values()) == pytest.approx(0.2)


def test_the_block_with_outliers_keeps_the_most_weights(llama, batches):
    model = copy.deepcopy(llama)
    with torch.no_grad():  # a few huge weights in the middle block's MLP
        model.model.layers[1].mlp.down_proj.weight[:, :3] *= 40
    got = prunekit.owl_sparsity(model, batches, 0.5)
    block = {i: got[f"model.layers.{i}.mlp.down_proj"] for i in range(3)}
    assert block[1] == min(block.values())
    assert block[1] < 0.5 < max(block.values())


class Stack(nn.Module):
    """Layers of three sizes, each a block of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 64)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_the_size_weighted_mean_is_the_sparsity():
    torch.manual_seed(0)
    model = Stack()
    got = prunekit.owl_sparsity(model, [torch.randn(16, 8)], 0.7, threshold=2.0, spread=0.05,
                                blocks="layers")
    sizes = {n: prunekit.fqn_to_module(model, n).weight.numel() for n in got}
    mean = sum(got[n] * sizes[n] for n in got) / sum(sizes.values())
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert len(set(got.values())) == 3


def test_no_spread_is_uniform_and_oneshot_takes_the_result(llama, batches):
    assert set(prunekit.owl_sparsity(llama, batches, 0.5, spread=0).values()) == {0.5}
    model = copy.deepcopy(llama)
    levels = prunekit.owl_sparsity(model, batches, 0.5, spread=0.1)
    reached = prunekit.oneshot(model, batches, "wanda", 0.5, overrides=levels, progress=False)
    for name, level in levels.items():  # whole weights per row: within one of each row's
        assert abs(reached[name] - level) <= 1 / prunekit.fqn_to_module(model, name).in_features


def test_mixture_of_experts_layers_get_levels_oneshot_accepts():
    model = moe("mixtral")
    data = moe_batches()
    levels = prunekit.owl_sparsity(model, data, 0.5, spread=0.1)
    assert any(".experts." in name for name in levels)
    reached = prunekit.oneshot(model, data, "wanda", 0.5, overrides=levels, progress=False)
    assert reached.keys() == levels.keys()


def test_the_model_is_left_as_it_was(llama, batches):
    model = copy.deepcopy(llama).train()
    model.config.use_cache = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunekit.owl_sparsity(model, batches, 0.5)
    assert model.training and model.config.use_cache
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"sparsity": 1.5}, ConfigError, "sparsity"),
    ({"threshold": 0}, ConfigError, "threshold must be a finite number > 0"),
    ({"spread": -0.1}, ConfigError, "spread must be a finite number >= 0"),
    ({"spread": float("nan")}, ConfigError, "spread"),
    ({"sparsity": 0.05, "spread": 0.2}, ConfigError, "outside \\[0, 1\\).*smaller spread"),
    ({"layers": ["model.layers.0.nope"]}, FqnError, "nope"),
    ({"blocks": None}, ConfigError, "1 block\\(s\\) hold pruned layers"),
])
def test_bad_arguments_are_refused_before_anything_changes(llama, batches, kwargs, error, match):
    model = copy.deepcopy(llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        prunekit.owl_sparsity(model, batches, **{"sparsity": 0.5, **kwargs})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("data", "error", "match"), [
    ([], ConfigError, "no calibration batches"),
    (torch.zeros(2, 8, dtype=torch.long), ConfigTypeError, "wrap one batch in a list"),
    ([torch.rand(2, 8)], ConfigTypeError, "batch 0: token ids must be an integer tensor"),
    ([torch.full((2, 8), 500)], ConfigError, "batch 0: token ids must lie in \\[0, 96\\)"),
])
def test_bad_batches_are_named(llama, data, error, match):
    with pytest.raises(error, match=match):
        prunekit.owl_sparsity(llama, data, 0.5)


def test_non_finite_activations_are_named(llama, batches):
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(ConfigError, match=r"layer 'model\.layers\.1\.mlp\.gate_proj' received "
                                          r"NaN or inf activations"):
        prunekit.owl_sparsity(model, batches, 0.5)
