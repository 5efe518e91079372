"""Hugging Face ``transformers`` models (torch.fx cannot trace them: captured through
torch.export) and nn.MultiheadAttention as cross-attention.

Same bar as the zoo: ratio 0 changes nothing; at ratio > 0 the shrunk model equals the
masked one within 1e-5 relative, heads go whole, it still trains and exports."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.structured.engine import CaptureError, prune
from prunekit.structured.engine import capture as capture_module
from prunekit.structured.engine.exported import export_graph
from tests.helpers import assert_unchanged, snapshot
from tests.structured.zoo import check_equivalent, masked_copy, small_zoo

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 50


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.BertModel(config)


def _llama() -> nn.Module:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        use_cache=False,
    )  # fmt: skip
    return transformers.LlamaModel(config)


def _t5_encoder() -> nn.Module:
    """Relative position bias: an Embedding with one column per head, shared by the
    layers and fed to attention as its mask."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    )  # fmt: skip
    return transformers.T5EncoderModel(config)


def _gpt2() -> nn.Module:
    """transformers' Conv1D layers, q/k/v fused in one and split by ``split_size``."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=16, use_cache=False,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2Model(config)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "llama-gqa": _llama,
    "t5-encoder": _t5_encoder,
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MODELS[name]().eval(), torch.randint(0, VOCAB, (2, 6))


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    return [t for t in out.values() if isinstance(t, torch.Tensor)]


def _assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], rtol: float) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert ((g - e).abs().max() / e.abs().max().clamp_min(1e-6)).item() <= rtol


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith(("attention.self", "self_attn"))]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_capture_leaves_the_model_unchanged(name: str) -> None:
    model, x = _build(name)
    model.train()
    before = snapshot(model)
    graph, shapes = export_graph(model, (x,), frozenset())
    assert_unchanged(before, model)
    assert all(m.training for m in model.modules())
    linears = {n.target for n in graph.nodes if n.op == "call_module"}
    assert linears >= {f for f, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert all(shapes[n] is not None for n in graph.nodes if n.op == "call_module")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ratio_zero_changes_nothing(name: str) -> None:
    model, x = _build(name)
    with torch.no_grad():
        expected = _outputs(model, x)
    plan = prune(model, x, ratio=0.0)
    assert plan.slices == [] and plan.attrs == []
    plan.apply()
    with torch.no_grad():
        _assert_close(_outputs(model, x), expected, rtol=0.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shrunk_equals_masked_and_trains_and_exports(name: str) -> None:
    model, x = _build(name)
    plan = prune(model, x, ratio=0.5)
    masked = masked_copy(model, plan)
    fresh = torch.randint(0, VOCAB, x.shape)
    with torch.no_grad():
        expected = _outputs(masked, fresh)
        plan.apply()
        _assert_close(_outputs(model, fresh), expected, rtol=1e-5)
    assert plan.totals["params_after"] < 0.75 * plan.totals["params_before"]
    assert sum(p.numel() for p in model.parameters()) == plan.totals["params_after"]
    model.train()
    sum(t.pow(2).mean() for t in _outputs(model, x)).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    model.eval()
    exported = torch.export.export(model, (x,), strict=False)
    _assert_close(_outputs_of(exported.module()(x)), _outputs(model, x), rtol=1e-6)


def _outputs_of(out: Any) -> list[torch.Tensor]:
    values = out.values() if hasattr(out, "values") else out
    return [t for t in values if isinstance(t, torch.Tensor)]


def test_bert_heads_go_whole_and_attention_attributes_follow() -> None:
    model, x = _build("bert")
    prune(model, x, ratio=0.5).apply()
    for attn in _attentions(model):
        assert (attn.num_attention_heads, attn.attention_head_size) == (2, 16)
        assert attn.all_head_size == attn.query.out_features == attn.value.out_features == 32
    assert model.encoder.layer[0].intermediate.dense.out_features == 64
    assert model.config.hidden_size == model.encoder.layer[1].output.dense.out_features == 64


def test_llama_prunes_whole_key_value_groups() -> None:
    """Removing a key/value head removes the query heads that read it."""
    model, x = _build("llama-gqa")
    prune(model, x, ratio=0.5).apply()
    for attn in _attentions(model):
        assert attn.q_proj.out_features == 2 * attn.head_dim
        assert attn.k_proj.out_features == attn.v_proj.out_features == attn.head_dim
        assert attn.o_proj.in_features == attn.q_proj.out_features
    assert model.layers[0].mlp.gate_proj.out_features == model.layers[0].mlp.up_proj.out_features


def test_gpt2_loses_whole_heads_of_its_fused_qkv_and_mlp_channels() -> None:
    model, x = _build("gpt2")
    prune(model, x, ratio=0.5).apply()
    for block in model.h:
        attn, mlp = block.attn, block.mlp
        assert (attn.num_heads, attn.head_dim, attn.split_size) == (2, 16, 32)
        assert attn.c_attn.weight.shape == (64, 96) and (attn.c_attn.nx, attn.c_attn.nf) == (64, 96)
        assert attn.c_proj.weight.shape == (32, 64) and attn.c_proj.nx == 32
        assert mlp.c_fc.nf == mlp.c_proj.nx == mlp.c_proj.weight.shape[0] == 128
    assert model.config.n_embd == model.h[1].mlp.c_proj.nf == 64


def _apply_and_match_the_masked_logits(model: nn.Module, plan: Any, x: torch.Tensor) -> None:
    masked = masked_copy(model, plan)
    with torch.no_grad():
        expected = masked(x).logits
        plan.apply()
        _assert_close([model(x).logits], [expected], rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt2_with_its_lm_head_loses_hidden_width_and_reports_its_layernorms(
    attention: str,
) -> None:
    """The logits are the output, so the hidden width is free; it is tied to wte."""
    torch.manual_seed(0)
    config = _gpt2().config
    config._attn_implementation = attention
    model, x = transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, VOCAB, (2, 6))
    plan = prune(model, x, ratio=0.5)
    assert "transformer.ln_f" in plan.inexact
    _apply_and_match_the_masked_logits(model, plan, x)
    hidden = model.transformer.wte.embedding_dim
    assert hidden == model.lm_head.in_features == model.transformer.h[0].attn.c_attn.nx < 64
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, cut once
    assert sum(p.numel() for p in model.parameters()) == plan.totals["params_after"]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_causal_lms_lose_hidden_width_through_their_own_rmsnorms(arch: str, tied: bool) -> None:
    """transformers' RMSNorm classes (one per model; Gemma's scales by 1 + weight) are
    known layers, so with the logits as output the residual stream's width is free: the
    embedding, every norm, every projection reading or writing it and the LM head."""
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        use_cache=False, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    x = torch.randint(0, VOCAB, (2, 6))
    plan = prune(model, x, ratio=0.5)
    norms = [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")
             and m.weight.numel() == 64]  # fmt: skip
    assert len(norms) == 5 and set(norms) <= set(plan.inexact)
    _apply_and_match_the_masked_logits(model, plan, x)
    hidden = model.model.embed_tokens.embedding_dim
    assert hidden == model.lm_head.in_features == model.model.norm.weight.numel() < 64
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.in_features == layer.mlp.down_proj.out_features == hidden
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert sum(p.numel() for p in model.parameters()) == plan.totals["params_after"]


def test_wrong_inputs_to_an_exported_model_name_both_captures() -> None:
    model, _ = _build("bert")
    before = snapshot(model)
    with pytest.raises(
        CaptureError,
        match=r"torch.fx could not trace BertModel: \w+: .*; torch.export \(non-strict\) "
        r"could not capture it either: \w+: .*pass inputs of the shape the model expects",
    ):
        prune(model, torch.randn(2, 6, 3), ratio=0.5)
    assert_unchanged(before, model)


def test_ignored_layer_in_an_exported_model_keeps_its_heads() -> None:
    model, x = _build("bert")
    prune(model, x, ratio=0.5, ignored_layers=["encoder.layer.0.attention.self.key"]).apply()
    first, second = _attentions(model)
    assert first.key.out_features == first.query.out_features == 64
    assert first.num_attention_heads == 4
    assert second.query.out_features == 32


def test_an_ignored_block_of_an_exported_model_stays_whole_and_exact() -> None:
    """A whole ignored BertLayer becomes one opaque call; the other layer still shrinks."""
    model, x = _build("bert")
    plan = prune(model, x, ratio=0.5, ignored_layers=["encoder.layer.0"])
    masked = masked_copy(model, plan)
    with torch.no_grad():
        expected = _outputs(masked, x)
        plan.apply()
        _assert_close(_outputs(model, x), expected, rtol=1e-5)
    first, second = _attentions(model)
    assert (first.query.out_features, second.query.out_features) == (64, 32)
    assert model.encoder.layer[0].intermediate.dense.out_features == 128


@pytest.mark.parametrize("name", sorted(set(small_zoo()) - {"resnet18"}))  # resnet50: same parts
def test_export_capture_plans_the_zoo_as_fx_does(name: str, monkeypatch: Any) -> None:
    """The torch.export path, forced on models fx can trace, yields the same plan."""
    make_model, make_input = small_zoo()[name]
    torch.manual_seed(0)
    model, x = make_model().eval(), make_input()
    by_fx = prune(model, x, ratio=0.5)

    def refuse(*args: Any) -> None:
        raise RuntimeError("fx disabled for this test")

    monkeypatch.setattr(capture_module._LeafTracer, "trace", refuse)
    by_export = prune(model, x, ratio=0.5)
    assert by_export.slices == by_fx.slices
    assert by_export.attrs == by_fx.attrs
    assert by_export.totals == by_fx.totals


class BiasedAttention(nn.Module):
    """Self-attention with a learned per-head bias passed as ``attn_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(1, 4, 5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


def test_attention_mask_with_a_head_dim_is_pruned_with_the_heads() -> None:
    torch.manual_seed(0)
    model = BiasedAttention()
    check_equivalent(model, torch.randn(2, 5, 16), ratio=0.5)
    assert model.bias.shape == (1, 2, 5, 5) and model.q.out_features == 8


class CrossAttention(nn.Module):
    """Decoder-style block: queries from ``x``, keys/values from an encoded memory with
    its own width (kdim = vdim = 12 != embed_dim = 16)."""

    def __init__(self, kdim: int = 12) -> None:
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.memory = nn.Sequential(nn.Linear(6, kdim), nn.ReLU())
        self.attn = nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, kv = self.q(x), self.memory(memory)
        a, _ = self.attn(q, kv, kv)
        return self.out(a + q)


@pytest.mark.parametrize("kdim", [12, 16])
def test_multihead_cross_attention_shrinks_exactly(kdim: int) -> None:
    """kdim 12: separate k/v projections, the memory's channels prune on their own;
    kdim 16: the packed projection ties the memory's channels to the query's."""
    torch.manual_seed(0)
    model = CrossAttention(kdim).eval()
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    plan = prune(model, (x, memory), ratio=0.5)
    masked = masked_copy(model, plan)
    fresh = (torch.randn_like(x), torch.randn_like(memory))
    with torch.no_grad():
        expected = masked(*fresh)
        plan.apply()
        _assert_close([model(*fresh)], [expected], rtol=1e-5)
    attn = model.attn
    assert (attn.embed_dim, attn.head_dim, model.q.out_features) == (8, 2, 8)
    assert attn.kdim == attn.vdim == model.memory[0].out_features == (6 if kdim == 12 else 8)
    exported = torch.export.export(copy.deepcopy(model), fresh)
    torch.testing.assert_close(exported.module()(*fresh), model(*fresh))
