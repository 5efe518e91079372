"""A shrunk ``transformers`` model's config follows its widths, so ``save_pretrained`` /
``from_pretrained`` rebuild it exactly; where no config can describe it, apply warns
and leaves the config alone, and replaying the plan is the way back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.structured.engine import CaptureError, ConfigNotUpdatedWarning, PrunePlan, prune
from prunekit.tool import record_plan
from tests.structured.test_engine_hf import VOCAB, _bert, _gpt2, _llama, _t5_encoder
from tests.structured.zoo import masked_copy, small_zoo

transformers = pytest.importorskip("transformers")

X = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def _causal_lm(arch: str, tied: bool = True) -> nn.Module:
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        use_cache=False, tie_word_embeddings=tied)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _gpt2_lm() -> nn.Module:
    return transformers.GPT2LMHeadModel(_gpt2().config).eval()


def _main_output(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _apply_quietly(plan: PrunePlan) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config that fits raises no warning
        plan.apply()


def _reloaded(model: nn.Module, folder: Path) -> nn.Module:
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


LM_WIDTHS = {"hidden_size": (64, 32), "intermediate_size": (96, 48),
             "num_attention_heads": (4, 2), "num_key_value_heads": (2, 1)}  # fmt: skip
FITS = {
    "llama-tied": (lambda: _causal_lm("llama"), LM_WIDTHS),
    "qwen3-untied": (lambda: _causal_lm("qwen3", tied=False), LM_WIDTHS),
    "mistral-tied": (lambda: _causal_lm("mistral"), LM_WIDTHS),
    "qwen2-untied": (lambda: _causal_lm("qwen2", tied=False), LM_WIDTHS),
    # the hidden width is its output, so it stays
    "llama-model": (lambda: _llama().eval(), {"intermediate_size": (96, 48),
                    "num_attention_heads": (4, 2), "num_key_value_heads": (2, 1)}),
    # num_heads x d_kv: both follow the q width; heads are solved first, d_kv stays
    "t5-encoder": (lambda: _t5_encoder().eval(), {"num_attention_heads": (4, 2),
                   "d_ff": (128, 64)}),
    # head width is n_embd / n_head: no shape tells n_head, the attention's num_heads does
    "gpt2-lm": (_gpt2_lm, {"hidden_size": (64, 32), "num_attention_heads": (4, 2)}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FITS))
def test_the_config_follows_the_widths_and_from_pretrained_rebuilds_the_model(
    name: str, tmp_path: Path
) -> None:
    build, expected = FITS[name]
    torch.manual_seed(0)
    model = build()
    plan = prune(model, X, ratio=0.5)
    _apply_quietly(plan)
    assert plan.config_changes == expected
    assert all(getattr(model.config, k) == new for k, (_, new) in expected.items())
    reloaded = _reloaded(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_main_output(reloaded(X)), _main_output(model(X)),
                                   rtol=0, atol=0)  # fmt: skip


def test_a_parent_sharing_the_config_sees_the_new_widths() -> None:
    model = _causal_lm("llama")
    prune(model.model, X, ratio=0.5).apply()  # the decoder alone; its output width stays
    assert model.config.intermediate_size == 48 and model.config.num_attention_heads == 2
    assert model.config.hidden_size == 64


def test_ratio_zero_and_models_without_a_config_change_nothing() -> None:
    model = _causal_lm("llama")
    before = model.config.to_dict()
    plan = prune(model, X, ratio=0.0)
    _apply_quietly(plan)
    assert plan.config_changes == {} and model.config.to_dict() == before
    build_zoo, example = small_zoo()["resnet18"]
    zoo_model, x = build_zoo(), example()
    plan = prune(zoo_model, x, ratio=0.5)
    _apply_quietly(plan)
    assert plan.config_changes == {}


UNFIT = {
    # heads narrower than hidden_size / num_attention_heads: BERT derives them
    "bert": (lambda: _bert().eval(), {}, "attention.output.dense.weight"),
    # GPT-2 without its LM head keeps n_embd, so its heads cannot lose width either
    "gpt2": (lambda: _gpt2().eval(), {}, "c_attn"),
    # layers of different widths
    "llama-global": (lambda: _causal_lm("llama"), {"global_pruning": True}, "mlp"),
    # shapes fit, but Gemma scales embeddings by sqrt(hidden_size), set when built
    "gemma": (lambda: _causal_lm("gemma"), {}, "embed_scale from 8.0 to 5.65"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UNFIT))
def test_a_model_no_config_describes_warns_and_keeps_its_config(name: str) -> None:
    build, options, reason = UNFIT[name]
    torch.manual_seed(0)
    model = build()
    before = model.config.to_dict()
    plan = prune(model, X, ratio=0.5, **options)
    with pytest.warns(ConfigNotUpdatedWarning, match="config cannot describe the") as caught:
        plan.apply()
    assert reason in str(caught[0].message) and "PrunePlan.from_dict" in str(caught[0].message)
    assert plan.config_changes == {} and model.config.to_dict() == before


def test_the_plan_replayed_on_the_original_model_is_the_way_back(tmp_path: Path) -> None:
    """What the warning advises: from_pretrained the original, replay, load the weights."""
    torch.manual_seed(0)
    model = _bert().eval()
    model.save_pretrained(tmp_path / "dense")
    plan = prune(model, X, ratio=0.5)
    with pytest.warns(ConfigNotUpdatedWarning, match="config cannot describe"):
        plan.apply()
    data = json.loads(json.dumps(plan.to_dict()))
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    fresh = type(model).from_pretrained(tmp_path / "dense").eval()
    with pytest.warns(ConfigNotUpdatedWarning, match="config cannot describe"):
        PrunePlan.from_dict(fresh, data).apply()
    fresh.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(X).last_hidden_state, model(X).last_hidden_state,
                                   rtol=0, atol=0)  # fmt: skip


def test_prunekit_load_replays_such_a_plan_silently(tmp_path: Path) -> None:
    """prunekit's own checkpoints replay the plan already: the warning's advice is moot."""
    torch.manual_seed(0)
    model = _bert().eval()
    plan = prune(model, X, ratio=0.5)
    with pytest.warns(ConfigNotUpdatedWarning):
        plan.apply()
    record_plan(model, plan.to_dict())
    prunekit.save(model, tmp_path / "c")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigNotUpdatedWarning)
        loaded = prunekit.load(_bert, tmp_path / "c").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).last_hidden_state, model(X).last_hidden_state,
                                   rtol=0, atol=0)  # fmt: skip


def test_a_model_with_its_cache_on_is_captured_without_it_and_keeps_the_setting() -> None:
    """Pretrained causal LMs ship with use_cache=True, whose cache object torch.export
    cannot return; the capture turns it off for itself only, and generation with the
    cache runs on the shrunk model as without it."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config.use_cache is True
    with pytest.raises(CaptureError):
        prune(model, torch.randn(2, 6, 3), ratio=0.5)
    assert model.config.use_cache is True
    plan = prune(model, X, ratio=0.5)
    assert model.config.use_cache is True
    masked = masked_copy(model, plan)
    _apply_quietly(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, masked(X).logits, rtol=1e-5, atol=1e-5)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(X[:1], use_cache=True, **settings)
    assert torch.equal(cached, model.generate(X[:1], use_cache=False, **settings))
    assert torch.equal(cached, masked.generate(X[:1], use_cache=True, **settings))
