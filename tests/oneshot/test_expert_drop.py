"""drop_experts: whole experts removed from transformers' expert banks and routers; the
model then computes what it computed with the dropped experts' router logits at -inf."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import prunekit
from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError
from prunekit.oneshot.expert_drop import drop_experts
from tests.helpers import assert_unchanged, snapshot
from tests.oneshot.test_experts import COMMON, CONFIGS, assert_loads_back, banks, batches, moe

transformers = pytest.importorskip("transformers")

ROUTED = ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"]


class MaskedRouting(TorchFunctionMode):
    """The router logits of the dropped experts at -inf: the routing a dropped model
    must reproduce (softmax and top-k then see only the kept experts)."""

    def __init__(self, dropped: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.dropped = dropped  # id(router weight) -> bool mask over experts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and id(args[1]) in self.dropped:
            out = out.masked_fill(self.dropped[id(args[1])], float("-inf"))
        return out


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith(("mlp.gate", "mlp.router"))]


@pytest.mark.parametrize("arch", ROUTED)
def test_the_dropped_model_routes_as_the_original_with_dropped_logits_at_minus_inf(arch):
    model, data = moe(arch), batches()
    original = copy.deepcopy(model)
    kept = drop_experts(model, data, keep=3)
    assert len(kept) == 2 and all(len(k) == 3 for k in kept.values())
    dropped = {}
    for router, indices in zip(routers(original), kept.values(), strict=True):
        mask = torch.ones(4, dtype=torch.bool)
        mask[indices] = False
        dropped[id(router.weight)] = mask
    with torch.no_grad():
        got = model(**data[0]).logits
        with MaskedRouting(dropped):
            want = original(**data[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for bank in banks(model).values():
        assert bank.down_proj.shape[0] == 3
    assert len(routers(model)) == 2 and all(r.weight.shape[0] == 3 for r in routers(model))


def test_the_most_used_experts_are_kept_and_their_weights_move_unchanged():
    model, data = moe("mixtral"), batches()
    first = model.model.layers[0].mlp
    use = torch.zeros(4, dtype=torch.float64)

    def count(_m: torch.nn.Module, _a: tuple, out: tuple) -> None:
        use.index_add_(0, out[2].flatten(), out[1].flatten().double())

    hook = first.gate.register_forward_hook(count)
    with torch.no_grad():
        for batch in data:
            model(**batch)
    hook.remove()
    weights = first.experts.gate_up_proj.detach().clone()
    kept = drop_experts(model, data, keep=0.5)["model.layers.0.mlp.experts"]
    assert kept == sorted(use.topk(2).indices.tolist())
    assert torch.equal(first.experts.gate_up_proj, weights[kept])


def test_the_config_describes_the_result_and_a_saved_model_loads_back(tmp_path):
    model, data = moe("mixtral"), batches()
    before = sum(p.numel() for p in model.parameters())
    bank = model.model.layers[0].mlp.experts
    per_expert = (bank.gate_up_proj[0].numel() + bank.down_proj[0].numel() +
                  model.model.layers[0].mlp.gate.weight[0].numel())
    drop_experts(model, data, keep=2)
    assert model.config.num_local_experts == 2 and bank.num_experts == 2
    assert sum(p.numel() for p in model.parameters()) == before - 2 * 2 * per_expert
    assert_loads_back(model, tmp_path, data[0])


def test_dropping_then_pruning_the_rest_of_the_experts():
    model, data = moe("qwen2_moe"), batches()
    drop_experts(model, data, keep=2)
    achieved = prunekit.oneshot(model, data, "sparsegpt", progress=False)
    assert "model.layers.1.mlp.experts.down_proj.1" in achieved
    assert "model.layers.1.mlp.experts.down_proj.2" not in achieved
    assert set(achieved.values()) == {0.5}


@pytest.mark.parametrize(("keep", "error", "message"), [
    (1, ConfigError, r"keeps 1 of 4 experts; need between 2 and 4"),
    (5, ConfigError, r"keeps 5 of 4"),
    (0.1, ConfigError, r"keeps 0 of 4"),
    ("3", ConfigTypeError, r"keep must be an int \(experts\) or a fraction, got '3'"),
    (True, ConfigTypeError, r"keep must be"),
])
def test_bad_keep_is_refused_before_any_change(keep, error, message):
    model = moe("mixtral")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        drop_experts(model, batches(), keep=keep)
    assert_unchanged(before, model)


def test_a_router_with_state_of_another_kind_is_refused_by_name():
    config = transformers.DeepseekV3Config(
        **COMMON, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match=r"expert bank 'model\.layers\.1\.mlp\.experts' "
                       r".*router DeepseekV3TopkRouter holds \['e_score_correction_bias'\]"):
        drop_experts(model, batches(), keep=3)
    assert_unchanged(before, model)


@pytest.mark.parametrize(("arch", "message"), [
    ("llama4", r"needs a bank declared through transformers' use_experts_implementation"),
    (None, r"LlamaForCausalLM has no expert bank"),
])
def test_models_without_a_droppable_bank_are_refused(arch, message):
    if arch is None:
        config = transformers.LlamaConfig(**COMMON)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    else:
        model = moe(arch)
    with pytest.raises(UnsupportedError, match=message):
        drop_experts(model, batches(), keep=2)


def test_no_batches_are_refused():
    with pytest.raises(ConfigError, match="no calibration batches"):
        drop_experts(moe("mixtral"), [], keep=2)
    with pytest.raises(ConfigTypeError, match="must be a list of batches"):
        drop_experts(moe("mixtral"), batches()[0], keep=2)


def test_configs_cover_the_routed_banks():
    assert set(ROUTED) <= set(CONFIGS)
