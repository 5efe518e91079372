"""prune_expert_channels: every expert narrowed to its most useful intermediate
channels; the result computes what the model computed with the dropped channels' down
projection columns zeroed."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import prunekit
from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError
from prunekit.experts import unfused_experts
from prunekit.oneshot.expert_channels import prune_expert_channels
from tests.helpers import assert_unchanged, snapshot
from tests.oneshot.test_expert_drop import ROUTED
from tests.oneshot.test_experts import COMMON, assert_loads_back, banks, batches, moe

transformers = pytest.importorskip("transformers")


def zero_dropped_columns(model: torch.nn.Module, kept: dict[str, list[list[int]]]) -> None:
    """The masked twin: each expert's dropped channels contribute nothing."""
    with torch.no_grad():
        for (_, bank), per_expert in zip(banks(model).items(), kept.values(), strict=True):
            for e, channels in enumerate(per_expert):
                down = bank.down_proj[e].T if bank.is_transposed else bank.down_proj[e]
                dropped = torch.ones(down.shape[1], dtype=torch.bool)
                dropped[channels] = False
                down[:, dropped] = 0


@pytest.mark.parametrize("arch", ROUTED)
def test_the_narrowed_model_computes_what_the_masked_one_computes(arch):
    model, data = moe(arch), batches()
    masked = copy.deepcopy(model)
    width = banks(model)["model.layers.0.mlp.experts"].down_proj.shape[-1 if arch != "gpt_oss"
                                                                      else 1]
    kept = prune_expert_channels(model, data, keep=0.25)
    assert all(len(c) == width // 4 for per_expert in kept.values() for c in per_expert)
    zero_dropped_columns(masked, kept)
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, masked(**data[0]).logits,
                                   rtol=1e-5, atol=1e-5)
    bank = banks(model)["model.layers.0.mlp.experts"]
    assert bank.down_proj.shape[1 if bank.is_transposed else 2] == width // 4


@pytest.mark.parametrize("score", ["activation", "wanda"])
def test_each_expert_keeps_its_best_scored_channels(score):
    model, data = moe("mixtral"), batches()
    bank = model.model.layers[0].mlp.experts
    sums = torch.zeros(4, bank.down_proj.shape[2], dtype=torch.float64)

    def record(e: int, _m: torch.nn.Module, args: tuple) -> None:
        sums[e] += args[0].double().square().sum(0)

    with unfused_experts(model) as swapped, torch.no_grad():
        for e, layer in enumerate(swapped["model.layers.0.mlp.experts"].down_proj):
            layer.register_forward_pre_hook(functools.partial(record, e))
        for batch in data:
            model(**batch)
    scores = sums.sqrt()
    if score == "wanda":
        scores = scores * bank.down_proj.detach().double().norm(dim=1)
    kept = prune_expert_channels(model, data, keep=8, score=score)["model.layers.0.mlp.experts"]
    assert kept == [sorted(s.topk(8).indices.tolist()) for s in scores]
    assert len({tuple(k) for k in kept}) > 1  # each expert its own channels


def test_the_config_follows_and_a_saved_model_loads_back(tmp_path):
    model, data = moe("qwen2_moe"), batches()
    prune_expert_channels(model, data, keep=0.5)
    assert model.config.moe_intermediate_size == 8 and model.config.intermediate_size == 64
    assert_loads_back(model, tmp_path, data[0])


def test_narrowing_then_pruning_the_experts_left():
    model, data = moe("mixtral"), batches()
    prunekit.drop_experts(model, data, keep=3)
    prunekit.prune_expert_channels(model, data, keep=0.5)
    achieved = prunekit.oneshot(model, data, "wanda", pattern="2:4", progress=False)
    assert achieved["model.layers.0.mlp.experts.down_proj.2"] == 0.5
    assert model.model.layers[0].mlp.experts.down_proj.shape == (3, 32, 32)


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"keep": 0}, ConfigError, r"keeps 0 of 64 channels per expert"),
    ({"keep": 65}, ConfigError, r"keeps 65 of 64"),
    ({"keep": None}, ConfigTypeError,
     r"keep must be an int \(channels per expert\) or a fraction, got None"),
    ({"keep": 0.5, "score": "norm"}, ConfigError,
     r"score must be one of \('activation', 'wanda'\), got 'norm'"),
])
def test_bad_arguments_are_refused_before_any_change(arguments, error, message):
    model = moe("mixtral")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        prune_expert_channels(model, batches(), **arguments)
    assert_unchanged(before, model)


class SharedWidthMixtral(transformers.MixtralForCausalLM):
    """A Mixtral whose config.intermediate_size also sizes an extra dense layer."""

    def __init__(self, config: transformers.MixtralConfig) -> None:
        super().__init__(config)
        self.extra = torch.nn.Linear(config.hidden_size, config.intermediate_size)


def test_a_width_the_config_shares_with_other_layers_is_refused():
    model = SharedWidthMixtral(transformers.MixtralConfig(**COMMON, num_local_experts=4))
    before = snapshot(model.eval())
    with pytest.raises(UnsupportedError, match=r"config\.intermediate_size sizes more than the "
                       r"experts: with it at 32, 'extra\.weight' would be \(32, 32\) instead "
                       r"of \(64, 32\)"):
        prune_expert_channels(model, batches(), keep=0.5)
    assert_unchanged(before, model)


def test_a_model_as_wide_as_its_experts_is_narrowed():
    """GPT-OSS's hidden size equals its experts' width (2,880): the width's number alone
    says nothing about which layers the config entry sizes."""
    config = transformers.MixtralConfig(**{**COMMON, "intermediate_size": 32},
                                        num_local_experts=4)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    prune_expert_channels(model, batches(), keep=0.5)
    assert model.config.intermediate_size == 16
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)


def test_batches_that_are_not_a_list_of_batches_are_refused():
    with pytest.raises(ConfigTypeError, match=r"must be a list of batches, got Tensor"):
        prune_expert_channels(moe("mixtral"), torch.randint(0, 96, (2, 16)), keep=0.5)
    with pytest.raises(ConfigError, match=r"prune_expert_channels: no calibration batches"):
        prune_expert_channels(moe("mixtral"), [], keep=0.5)


def test_llama4_and_dense_models_are_refused():
    with pytest.raises(UnsupportedError, match=r"narrowing needs a bank declared through"):
        prune_expert_channels(moe("llama4"), batches(), keep=0.5)
    dense = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**COMMON))
    with pytest.raises(UnsupportedError, match=r"LlamaForCausalLM has no expert bank"):
        prune_expert_channels(dense, batches(), keep=0.5)
