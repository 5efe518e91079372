"""to_sparse and sparse_quantize on mixture-of-experts models: every expert of
transformers' expert banks (3-D weights, no nn.Linear) gets a layout of its own, and a
bank with sparse experts is replaced for good by its experts as layers, computing what
the bank computed."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit.deploy.convert as convert
import prunekit.deploy.experts as deploy_experts
from prunekit.deploy import (
    QnnpackSparseDynamicLinear,
    SparseLinear,
    SparseQuantizedIsland,
    sparse_quantize,
    to_sparse,
)
from prunekit.errors import ConfigError, UnsupportedError
from prunekit.experts import ExpertLayers, put_module, unfused, unfused_experts
from tests.deploy._models import block_sparse
from tests.oneshot.test_experts import CONFIGS, banks, batches, moe, never_routed_to_expert_3

transformers = pytest.importorskip("transformers")

BATCH = batches(1)[0]


def sparse_experts(model: torch.nn.Module, block: tuple[int, int] = (1, 1),
                   sparsity: float = 0.9) -> torch.nn.Module:  # fmt: skip
    """``model`` with every expert's weight (``out x in``) zero in ``sparsity`` of its
    ``block``s; attention and routers stay dense, so only experts have zeros."""
    with unfused_experts(model) as unfused, torch.no_grad():
        layers = [m for bank in unfused.values() for m in bank.modules()
                  if isinstance(m, torch.nn.Linear)]
        for seed, layer in enumerate(layers):
            zeros = block_sparse(*layer.weight.shape, block, sparsity, seed=seed) == 0
            layer.weight[zeros] = 0
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits


def expert_choices(model: torch.nn.Module) -> dict[str, str]:
    """What the deploy report says of the experts (the other layers have no zeros)."""
    return {k: v for k, v in model.deploy_report.chosen().items() if ".experts." in k}


def expert_layers(model: torch.nn.Module) -> list[ExpertLayers]:
    return [m for m in model.modules() if isinstance(m, ExpertLayers)]


@pytest.mark.parametrize("layout", ["csr", "row_blocks"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_expert_gets_the_layout_and_the_model_computes_what_it_computed(arch, layout):
    model = sparse_experts(moe(arch))
    state = copy.deepcopy(model.state_dict())
    deployed = to_sparse(model, layout=layout)
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)
    assert not banks(deployed) and len(expert_layers(deployed)) == 2
    for layers in expert_layers(deployed):
        assert all(isinstance(m, SparseLinear) and m.layout.name == layout
                   for m in [*layers.ups, *layers.down_proj])
    assert not any(p.dim() == 3 for p in deployed.parameters())  # the banks' tensors are gone
    assert len(expert_choices(deployed)) == 2 * 2 * 4  # blocks x projections x experts
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # a copy


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # gpt_oss: transposed weights
def test_block_sparse_experts_get_bsr_blocks_of_their_out_x_in_weight(arch):
    model = sparse_experts(moe(arch), block=(4, 4))
    deployed = to_sparse(model, layout="bsr")
    assert set(expert_choices(deployed).values()) == {"bsr4x4"}
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)


def test_modules_may_name_a_projection_or_a_whole_bank():
    model = sparse_experts(moe("mixtral"))
    down, bank = "model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts"
    deployed = to_sparse(model, layout="csr", modules=[down, bank])
    assert list(deployed.deploy_report.chosen()) == (
        [f"{down}.{e}" for e in range(4)] + [f"{bank}.gate_up_proj.{e}" for e in range(4)]
        + [f"{bank}.down_proj.{e}" for e in range(4)])
    first = deployed.model.layers[0].mlp.experts
    assert all(type(m) is torch.nn.Linear for m in first.gate_up_proj)  # dense, own copies
    assert all(m.weight.is_contiguous() for m in first.gate_up_proj)
    original = model.model.layers[0].mlp.experts.gate_up_proj
    assert all(m.weight.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
               for m in first.gate_up_proj)
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)


def test_a_dense_bank_checkpoint_loads_expert_by_expert():
    """A state_dict of the model before deployment (3-D bank tensors) loads into the
    deployed model; new weights are packed again."""
    model = sparse_experts(moe("gpt_oss"))
    deployed = to_sparse(model, layout="csr")
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        for bank in banks(retrained).values():
            bank.down_proj.mul_(2)
            bank.gate_up_proj_bias.add_(1)
    deployed.load_state_dict(retrained.state_dict())
    torch.testing.assert_close(logits(deployed), logits(retrained), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"down_proj\.4\.weight"):  # one expert too many
        wrong = dict(retrained.state_dict())
        key = "model.layers.0.mlp.experts.down_proj"
        wrong[key] = torch.cat([wrong[key], wrong[key][:1]])
        deployed.load_state_dict(wrong)


def test_state_dict_of_deployed_experts_round_trips():
    deployed = to_sparse(sparse_experts(moe("mixtral")), layout="csr")
    other = to_sparse(sparse_experts(moe("mixtral"), sparsity=0.5), layout="csr")
    other.load_state_dict(deployed.state_dict())
    torch.testing.assert_close(logits(other), logits(deployed))


@pytest.mark.parametrize(("bank_speedup", "kept"), [(0.8, "dense"), (3.0, "row_blocks1x1")])
def test_auto_decides_per_bank_on_the_banks_own_inputs(monkeypatch, bank_speedup, kept):
    """Each expert alone is 10x faster in CSR; the bank's plans are timed as whole banks
    (every expert in row blocks is fastest here) and paired timing of the fastest against
    the bank's forward decides."""
    monkeypatch.setattr(convert, "time_candidates", lambda c, x, **timing: {"dense": 1.0,
                                                                            "csr": 0.1})
    plans = []

    def bank_times(candidates, args):
        plans.append((list(candidates), type(candidates["bank"]).__name__, len(args)))
        return {name: 0.1 if name == "every expert row_blocks" else 1.0 for name in candidates}

    monkeypatch.setattr(deploy_experts, "time_candidates", bank_times)
    monkeypatch.setattr(deploy_experts, "confirmed_speedup", lambda bank, other, args:
                        bank_speedup)
    model = sparse_experts(moe("mixtral"))
    deployed = to_sparse(model, BATCH, margin=0.1)
    assert plans == [(["bank", "each expert's pick", "every expert row_blocks"],  # picks: csr
                      "MixtralExperts", 3)] * 2
    assert set(expert_choices(deployed).values()) == {kept}
    reason = deployed.deploy_report["model.layers.0.mlp.experts.down_proj.2"].reason
    assert reason.startswith("fastest: csr 0.100 ms vs dense 1.000 ms (10.00x); bank: every "
                             "expert row_blocks fastest (bank 1.000 ms, each expert's pick "
                             "1.000 ms, every expert row_blocks 0.100 ms), "
                             f"{bank_speedup:.2f}x its own forward (MixtralExperts)")
    assert (kept == "dense") == ("the bank stays" in reason) == bool(banks(deployed))
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)


def test_experts_no_example_token_reaches_are_timed_on_a_routed_experts_input(monkeypatch):
    rows = {}

    def record(candidates, x, **timing):
        assert timing == convert.EXPERT_TIMING  # briefly: the bank's round decides
        rows[len(rows)] = x.shape[0]
        return {"dense": 1.0, "csr": 2.0}

    monkeypatch.setattr(convert, "time_candidates", record)
    deployed = to_sparse(sparse_experts(never_routed_to_expert_3()), BATCH)
    assert min(rows.values()) > 0 and len(rows) == 16
    reason = deployed.deploy_report["model.layers.1.mlp.experts.down_proj.3"].reason
    assert reason.startswith("example_inputs routed no token to it; timed on the input of "
                             "model.layers.1.mlp.experts.down_proj.")
    assert banks(deployed)  # nothing won: the banks stay


def test_a_refused_layout_leaves_the_banks_in_place_and_unchanged():
    model = sparse_experts(moe("mixtral"))
    state, before = copy.deepcopy(model.state_dict()), dict(banks(model))
    with pytest.raises(ConfigError, match=r"layer 'model\.layers\.0\.mlp\.experts\.gate_up_pr"
                                          r"oj\.0' .*BSR block \(3, 3\) does not divide"):
        to_sparse(model, layout="bsr", blocksize=(3, 3), inplace=True)
    assert banks(model) == before and not expert_layers(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_bank_with_tensors_of_its_own_is_refused_by_name():
    model = sparse_experts(moe("mixtral"))
    model.model.layers[1].mlp.experts.register_buffer("scale", torch.ones(4))
    for call in (lambda: to_sparse(model, layout="csr", inplace=True),
                 lambda: sparse_quantize(model)):
        with pytest.raises(UnsupportedError, match=r"expert bank 'model\.layers\.1\.mlp\.ex"
                                                   r"perts' \(MixtralExperts\) holds \['scale'\]"):
            call()
    assert len(banks(model)) == 2
    deployed = to_sparse(model, layout="csr", modules=["model.layers.0.mlp.experts"])
    assert len(banks(deployed)) == 1


def test_deployed_experts_run_only_for_the_tokens_routed_to_them():
    model = sparse_experts(never_routed_to_expert_3())
    deployed = to_sparse(model, layout="csr")
    called = []
    for name, module in deployed.named_modules():
        if isinstance(module, SparseLinear):
            module.register_forward_pre_hook(lambda m, args, n=name: called.append(
                (n, len(args[0]))))
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)
    assert called and all(rows > 0 for _, rows in called)
    assert not [n for n, _ in called if n.endswith(".3")]


@pytest.mark.parametrize("arch", ["mixtral", "llama4"])
def test_export_of_deployed_experts_runs_every_expert_and_computes_the_same(arch):
    """Traced, a deployed bank runs every expert (export cannot branch on routing); the
    row-block kernel's fake takes the unknown token counts."""
    deployed = to_sparse(sparse_experts(moe(arch)), layout="row_blocks")
    kwargs = {**BATCH, "use_cache": False}
    program = torch.export.export(deployed, (), kwargs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**kwargs).logits, logits(deployed),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4"])
def test_sparse_quantize_quantizes_every_expert_as_the_linear_it_is(arch, dynamic):
    """The experts are int8 one by one (static: each calibrated on its own tokens) and
    the model computes, bit for bit, what the same model with its banks unfused into
    nn.Linear layers computes once quantized."""
    model = sparse_experts(moe(arch))
    calibration = None if dynamic else batches(2)
    quantized = sparse_quantize(model, calibration, dynamic=dynamic)
    reference = copy.deepcopy(model)
    for fqn, bank in banks(reference).items():
        put_module(reference, fqn, unfused(bank))
    expected = sparse_quantize(reference, calibration, dynamic=dynamic)
    assert torch.equal(logits(quantized), logits(expected))
    assert not banks(quantized) and not any(p.dim() == 3 for p in quantized.parameters())
    kind = QnnpackSparseDynamicLinear if dynamic else SparseQuantizedIsland
    for layers in expert_layers(quantized):
        assert all(isinstance(m, kind) for m in [*layers.ups, *layers.down_proj])
    assert banks(model)  # the model keeps its banks


def test_contiguous_outputs_deploy_llama4_whose_rotary_embedding_needs_them():
    """Llama 4's rotary embedding views its query and key projections' outputs as complex
    numbers, which needs a contiguous last dimension: a sparse layer's output is a
    transposed view unless contiguous_outputs."""
    model = moe("llama4")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn" in name:
                p.mul_(torch.rand_like(p) > 0.5)
    deployed = to_sparse(sparse_experts(model), layout="csr", contiguous_outputs=True)
    q_proj = deployed.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, SparseLinear) and q_proj.contiguous_output
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_a_deployed_moe_generates_what_the_model_generates(arch):
    """Prefill, then one token at a time through the KV cache: any token count reaches
    the deployed banks."""
    model = sparse_experts(moe(arch))
    deployed = to_sparse(model, layout="row_blocks")
    prompt = BATCH["input_ids"][:1, :8]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(deployed.generate(prompt, max_new_tokens=6, do_sample=False), expected)
