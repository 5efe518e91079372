"""prunekit.oneshot on mixture-of-experts models: transformers' expert banks (3-D
weights, no nn.Linear) are unfused into one Linear per expert and projection for the
time of the pruning, each calibrated on the tokens routed to it, and written back."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit
from prunekit.errors import FqnError, UnsupportedError
from prunekit.experts import (
    ExpertLayers,
    is_expert_bank,
    routing_gates,
    unfused,
    unfused_experts,
)
from prunekit.oneshot.blocks import resolve_blocks
from prunekit.oneshot.engine import _stages, capture_inputs, inference_context
from tests.oneshot.test_architectures import reference_wanda

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, **MOE, num_experts=4,
                                                     shared_expert_intermediate_size=32),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
    # transposed weights, biases, gate and up interleaved, its own gate function
    "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, num_local_experts=4, head_dim=8,
                                                 num_experts_per_tok=2, sliding_window=4),
    # no interface: every token goes to every expert, pre-scaled, zero where not chosen
    "llama4": lambda: transformers.Llama4TextConfig(**COMMON, head_dim=8, num_local_experts=4,
                                                    intermediate_size_mlp=64),
}
ROUNDING = {"gpt_oss": "adds its bias after the product", "llama4": "one bmm for all experts"}


def moe(arch: str, experts_implementation: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch](), **extra).eval()
    with torch.no_grad():  # GPT-OSS starts its expert biases at zero: random ones are carried too
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.2)
    return model


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(n)]


def call_order(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
    """The Linear layers of the model's blocks but routing gates, in the order a forward
    first calls them (Llama 4 builds its experts before its router, and calls the router
    first)."""
    order: list[str] = []
    blocks = resolve_blocks(model, "auto")
    gates = set().union(*(routing_gates(block) for _, block in blocks))
    prefixes = tuple(f"{fqn}." for fqn, _ in blocks)
    handles = [m.register_forward_pre_hook(lambda *_, n=n: order.append(n) if n not in order
                                           else None)
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(prefixes) and id(m) not in gates]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return order


def assert_loads_back(model: torch.nn.Module, folder, batch: dict[str, torch.Tensor]) -> None:
    """``model`` saved and loaded back from its own config computes the same."""
    model.save_pretrained(folder)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def banks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if is_expert_bank(m)}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_unfused_experts_compute_what_the_bank_computes_and_leave_it_as_it_was(arch):
    model = moe(arch, "eager")
    state = copy.deepcopy(model.state_dict())
    ids = batches(1)[0]
    with torch.no_grad():
        want = model(**ids).logits
        with unfused_experts(model) as swapped:
            assert len(swapped) == 2 and not banks(model)
            got = model(**ids).logits
    # transformers' own loop, exactly; up to rounding where it computes otherwise
    tolerance = 1e-6 if arch in ROUNDING else 0.0
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    assert len(banks(model)) == 2
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_unfused_experts_match_the_grouped_kernels_up_to_rounding():
    model = moe("mixtral")  # transformers' default: grouped_mm
    ids = batches(1)[0]
    with torch.no_grad():
        want = model(**ids).logits
        with unfused_experts(model):
            got = model(**ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_weights_written_into_the_layers_reach_the_bank(arch):
    model = moe(arch)
    name, bank = next(iter(banks(model).items()))
    expected_up = bank.gate_up_proj.detach().clone()
    with unfused_experts(model) as swapped:
        layers = swapped[name]
        with torch.no_grad():
            layers.gate_up_proj[1].weight.mul_(2)  # a view: reaches the bank at once
        layers.down_proj[2].weight = torch.nn.Parameter(torch.zeros_like(
            layers.down_proj[2].weight))  # a new tensor: copied back on leaving
    expected_up[1] *= 2
    assert torch.equal(bank.gate_up_proj, expected_up)
    assert not bank.down_proj[2].any() and bank.down_proj[1].any()


def test_a_block_calibrates_all_experts_of_a_projection_in_one_stage():
    model = moe("mixtral")
    with unfused_experts(model), inference_context(model):
        stack = resolve_blocks(model, "auto")
        record = capture_inputs(model, stack, batches(1))[0]
        block = stack[0][1]
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        stages = _stages(block, linears, record)
    assert [s.names for s in stages] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        [f"mlp.experts.gate_up_proj.{e}" for e in range(4)],
        [f"mlp.experts.down_proj.{e}" for e in range(4)]]
    assert [s.shared for s in stages] == [True, True, False, False]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss", "llama4"])
def test_every_expert_is_pruned_as_the_layer_by_layer_reference_prunes_it(arch):
    model, data = moe(arch), batches()
    ours = copy.deepcopy(model)
    achieved = prunekit.oneshot(ours, data, "wanda", progress=False)
    mlp = "feed_forward" if arch == "llama4" else "mlp"
    assert achieved[f"model.layers.1.{mlp}.experts.down_proj.3"] == 0.5
    with unfused_experts(model):
        reference_wanda(model, data, call_order(model, data[0]))
    for (name, got), want in zip(ours.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(got == 0, want == 0), name
    with unfused_experts(ours) as swapped:
        for layers in swapped.values():
            for layer in [*layers.ups, *layers.down_proj]:  # half of every output row
                assert ((layer.weight == 0).sum(-1) == layer.in_features // 2).all()


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "magnitude"])
def test_every_method_prunes_the_experts_to_2_4(method):
    model = moe("mixtral")
    achieved = prunekit.oneshot(model, batches(), method, pattern="2:4", progress=False)
    assert len(achieved) == 2 * (4 + 2 * 4) and set(achieved.values()) == {0.5}
    for bank in banks(model).values():
        for weight in (bank.gate_up_proj, bank.down_proj):
            assert ((weight != 0).reshape(*weight.shape[:2], -1, 4).sum(-1) <= 2).all()
    with torch.no_grad():
        assert torch.isfinite(model(**batches(1)[0]).logits).all()


def test_sparsegpt_updates_the_kept_expert_weights_from_their_own_tokens():
    model = moe("mixtral")
    before = {n: b.down_proj.detach().clone() for n, b in banks(model).items()}
    prunekit.oneshot(model, batches(), "sparsegpt", progress=False)
    for name, bank in banks(model).items():
        kept = bank.down_proj != 0
        assert not torch.equal(bank.down_proj[kept], before[name][kept])


def test_dense_targets_refit_the_other_layers_and_still_prune_the_experts():
    model = moe("qwen2_moe")
    achieved = prunekit.oneshot(model, batches(), "sparsegpt", dense_targets=True,
                                progress=False)
    assert len(achieved) == 2 * (4 + 2 * 4 + 3) and set(achieved.values()) == {0.5}
    with torch.no_grad():
        assert torch.isfinite(model(**batches(1)[0]).logits).all()


def never_routed_to_expert_3() -> torch.nn.Module:
    """Top-1 routing where expert 3's logit is 0 and expert 0 or 1 always scores ≥ 0."""
    model = moe("mixtral")
    model.config.num_experts_per_tok = 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.top_k = 1
            router = layer.mlp.gate.weight
            router[1] = -router[0]
            router[3] = 0
    return model


def test_experts_no_token_reaches_are_pruned_by_magnitude_with_a_warning():
    model = never_routed_to_expert_3()
    original = {n: b.gate_up_proj[3].detach().clone() for n, b in banks(model).items()}
    with pytest.warns(UserWarning, match=r"reached 4 layer\(s\) \(model\.layers\.0\.mlp\."
                                         r"experts\.gate_up_proj\.3, .*pruned by weight magn"):
        achieved = prunekit.oneshot(model, batches(), "sparsegpt", progress=False)
    assert set(achieved.values()) == {0.5}
    for name, bank in banks(model).items():
        weight, kept = original[name], bank.gate_up_proj[3] != 0
        smallest_kept = weight.abs().where(kept, torch.inf).min(-1).values
        largest_dropped = weight.abs().where(~kept, -torch.inf).max(-1).values
        assert (largest_dropped <= smallest_kept).all()  # by magnitude, row by row
        assert torch.equal(bank.gate_up_proj[3][kept], weight[kept])  # and not updated


def test_layers_and_overrides_may_name_a_whole_projection_of_a_bank():
    model = moe("mixtral")
    down = "model.layers.0.mlp.experts.down_proj"
    achieved = prunekit.oneshot(model, batches(), "wanda", progress=False,
                                layers=[down, "model.layers.1.mlp.experts.gate_up_proj.2"],
                                overrides={down: 0.75, f"{down}.1": "2:4"})
    assert achieved == {f"{down}.0": 0.75, f"{down}.1": 0.5, f"{down}.2": 0.75,
                        f"{down}.3": 0.75, "model.layers.1.mlp.experts.gate_up_proj.2": 0.5}
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


def test_layers_may_name_a_whole_bank():
    model = moe("olmoe")
    bank = "model.layers.1.mlp.experts"
    achieved = prunekit.oneshot(model, batches(), "wanda", progress=False, layers=[bank])
    assert list(achieved) == ([f"{bank}.gate_up_proj.{e}" for e in range(4)]
                              + [f"{bank}.down_proj.{e}" for e in range(4)])
    assert not (model.model.layers[0].mlp.experts.down_proj == 0).any()


def test_a_refused_call_leaves_the_banks_in_place_and_unchanged():
    model = moe("mixtral")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(FqnError, match=r"experts\.down_proj\.9"):
        prunekit.oneshot(model, batches(), "wanda", progress=False,
                         overrides={"model.layers.0.mlp.experts.down_proj.9": 0.3})
    assert not any(isinstance(m, ExpertLayers) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class Mixer(torch.nn.Module):
    """A Linear and a weight matrix of its own, which oneshot cannot prune: it must
    say so rather than report a pruned model."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.mix = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) @ self.mix


def test_weights_no_pruned_layer_holds_are_named_in_a_warning():
    model = torch.nn.Sequential(Mixer(), Mixer())
    with pytest.warns(UserWarning, match=r"2 weight tensor\(s\) in the blocks belong to no "
                      r"layer it prunes .* stay dense: 0\.mix \(8, 8\), 1\.mix \(8, 8\)$"):
        prunekit.oneshot(model, [torch.randn(16, 8)], "wanda", progress=False)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4"])
def test_a_model_whose_weights_are_all_pruned_gets_no_warning(arch, recwarn):
    prunekit.oneshot(moe(arch), batches(), "wanda", progress=False)
    assert not [w for w in recwarn if "oneshot" in str(w.message)]


def test_an_offloaded_bank_is_refused_by_name_before_anything_changes():
    model = moe("mixtral")
    state = copy.deepcopy(model.state_dict())
    bank = model.model.layers[1].mlp.experts
    bank.down_proj = torch.nn.Parameter(torch.empty(bank.down_proj.shape, device="meta"))
    with pytest.raises(UnsupportedError, match=r"expert bank 'model\.layers\.1\.mlp\.experts' "
                       r"\(MixtralExperts\): its weights are on the meta device"):
        prunekit.oneshot(model, batches(), "wanda", progress=False)
    assert not any(isinstance(m, ExpertLayers) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items() if "layers.1.mlp" not in k)


def test_llama4_experts_run_on_the_rows_routed_to_them_only():
    """Llama 4 hands every expert every token, zero where the expert was not chosen: an
    expert's statistic must count its own tokens, so that one no token chose is seen
    as uncalibrated."""
    bank = moe("llama4").model.layers[0].feed_forward.experts
    layers = unfused(bank)
    rows = torch.randn(4, 5, 32)
    rows[2], rows[1, :3] = 0, 0
    seen: list[int] = []
    for layer in layers.ups:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        got, want = layers(rows.view(-1, 32)), bank(rows.view(-1, 32))
    assert seen == [5, 2, 0, 5]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not got.view(4, 5, 32)[2].any()


@pytest.mark.parametrize(("arch", "gate"), [("llama4", "feed_forward.router"),
                                            ("qwen2_moe", "mlp.shared_expert_gate")])
def test_routing_gates_stay_dense_unless_named(arch, gate):
    model = moe(arch)
    weight = model.get_submodule(f"model.layers.0.{gate}").weight
    dense = weight.detach().clone()
    achieved = prunekit.oneshot(model, batches(), "sparsegpt", progress=False)
    assert not [name for name in achieved if name.endswith(gate.split(".")[-1])]
    assert torch.equal(weight, dense)
    named = prunekit.oneshot(model, batches(), "wanda", progress=False,
                             layers=[f"model.layers.0.{gate}"])
    assert named == {f"model.layers.0.{gate}": 0.5}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm"])
def test_sparsity_zero_leaves_a_moe_model_bit_for_bit(method):
    model = moe("gpt_oss")
    state = copy.deepcopy(model.state_dict())
    achieved = prunekit.oneshot(model, batches(), method, sparsity=0.0, progress=False)
    assert set(achieved.values()) == {0.0}
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_a_moe_model_calibrated_as_one_block_prunes_every_expert():
    model = moe("mixtral")
    achieved = prunekit.oneshot(model, batches(), "sparsegpt", blocks=None, progress=False)
    assert len(achieved) == 2 * (4 + 2 * 4) + 1 and set(achieved.values()) == {0.5}  # + lm_head
