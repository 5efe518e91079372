"""prunekit.oneshot on GPT-2, whose layers are transformers' ``Conv1D`` (a Linear with its
weight stored ``in x out``): every method must prune it exactly as it prunes the same
model with those layers turned into ``nn.Linear``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError
from tests.helpers import assert_unchanged, linearized, snapshot

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 96


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # one left-padded row
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g), "attention_mask": m}
            for m in (torch.ones_like(mask), mask, torch.ones_like(mask))]


def test_the_twin_computes_what_gpt2_computes():
    model = gpt2()
    twin = linearized(model)
    assert not any(isinstance(m, Conv1D) for m in twin.modules())
    with torch.no_grad():
        torch.testing.assert_close(twin(**batches()[1]).logits, model(**batches()[1]).logits)


CASES = [
    ("wanda", None, False), ("wanda", "2:4", False), ("sparsegpt", None, False),
    ("sparsegpt", "2:4", False), ("admm", None, False), ("admm", "2:4", False),
    ("magnitude", None, False), ("magnitude", "2:4", False), ("sparsegpt", None, True),
    ("wanda", "2:4", True),
]


@pytest.mark.parametrize(("method", "pattern", "dense_targets"), CASES)
def test_gpt2_is_pruned_as_its_linear_twin(method, pattern, dense_targets):
    model = gpt2()
    twin = linearized(model)
    data = None if method == "magnitude" else batches()
    kwargs = {"pattern": pattern, "dense_targets": dense_targets, "progress": False}
    achieved = prunekit.oneshot(model, data, method, **kwargs)
    assert prunekit.oneshot(twin, data, method, **kwargs) == achieved
    assert len(achieved) == 2 * 4 and all(v == 0.5 for v in achieved.values())
    assert "transformer.h.0.attn.c_attn" in achieved
    for name, module in model.named_modules():
        if not isinstance(module, Conv1D):
            continue
        got, want = module.weight.T, twin.get_submodule(name).weight
        assert torch.equal(got == 0, want == 0), name
        torch.testing.assert_close(got, want, msg=name)
        assert torch.equal(module.bias, twin.get_submodule(name).bias), name
        if pattern == "2:4":  # groups of 4 along the inputs: the Conv1D weight's columns
            assert int((got != 0).reshape(got.shape[0], -1, 4).sum(-1).max()) == 2, name


def test_a_gpt2_layer_that_breaks_nm_is_refused_with_its_input_width_and_nothing_changes():
    model = gpt2()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'transformer.h.0.attn.c_proj': pattern 2:5 needs "
                                          r"in_features to be a multiple of 5, got 32"):
        prunekit.oneshot(model, batches(), "wanda",
                         overrides={"transformer.h.0.attn.c_proj": "2:5"}, progress=False)
    assert_unchanged(before, model)


def test_calibrating_a_conv1d_names_its_input_width():
    layer = Conv1D(nf=6, nx=4)
    sparsifier = prunekit.WandaSparsifier()
    sparsifier.prepare(nn.Sequential(layer), [{"tensor_fqn": "0.weight"}])
    expected = r"'0.weight' got input \(2, 6\); expected \(\.\.\., 4\)"
    with pytest.raises(ConfigError, match=expected), sparsifier.calibrate():
        layer(torch.randn(2, 6))


def test_a_calibrated_sparsifier_prepares_conv1d_layers_by_default():
    model = gpt2()
    sparsifier = prunekit.SparseGPTSparsifier()
    sparsifier.prepare(model, None)
    prepared = {g["tensor_fqn"] for g in sparsifier.groups}
    assert {"transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight",
            "lm_head.weight"} <= prepared
    assert len(prepared) == 2 * 4 + 1
