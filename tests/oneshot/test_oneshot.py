"""prunekit.oneshot on a tiny random Llama and on plain modules: sequential blocks,
patterns, overrides, and bad input that leaves the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import prunekit
from prunekit import SparseGPTSparsifier, WandaSparsifier
from prunekit.errors import ConfigError, ConfigTypeError, FqnError
from prunekit.oneshot.blocks import find_decoder_stack, resolve_blocks
from prunekit.sparsifier.calibrated import CalibratedSparsifier
from tests.helpers import assert_unchanged, prune_manually, snapshot, stack_of_blocks

transformers = pytest.importorskip("transformers")

METHODS = ["sparsegpt", "admm", "wanda", "magnitude"]


def linears(model: nn.Module, stack: str = "model.layers") -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and stack in n}


@pytest.mark.parametrize("method", METHODS)
def test_half_of_every_block_layer_and_nothing_else(llama, batches, method):
    model = copy.deepcopy(llama)
    report = prunekit.oneshot(model, batches, method, progress=False)
    assert report == dict.fromkeys(linears(model), 0.5) and len(report) == 21
    assert torch.equal(model.lm_head.weight, llama.lm_head.weight)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).logits).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_in_every_group_of_m(llama, batches, method, pattern):
    model = copy.deepcopy(llama)
    prunekit.oneshot(model, batches, method, pattern=pattern, progress=False)
    n, m = map(int, pattern.split(":"))
    for layer in linears(model).values():
        assert (layer.weight != 0).view(layer.out_features, -1, m).sum(-1).eq(n).all()


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_leaves_the_model_unchanged(llama, batches, method):
    model = copy.deepcopy(llama)
    before = snapshot(model)
    report = prunekit.oneshot(model, batches, method, sparsity=0.0, progress=False)
    assert set(report.values()) == {0}
    assert_unchanged(before, model)


def test_overrides_and_named_layers(llama, batches):
    model = copy.deepcopy(llama)
    layers = ["model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj"]
    report = prunekit.oneshot(model, batches, "wanda", layers=layers, progress=False,
                              overrides={layers[0]: 0.25, layers[1]: "1:4"})
    assert report == {layers[0]: 0.25, layers[1]: 0.75}
    untouched = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(untouched, llama.model.layers[1].mlp.up_proj.weight)


def test_sparsegpt_beats_wanda_beats_magnitude_on_the_model_output(llama, batches):
    with torch.no_grad():
        dense = llama(batches[0]).logits
    errors = {}
    for method in METHODS:
        model = copy.deepcopy(llama)
        prunekit.oneshot(model, batches, method, progress=False)
        with torch.no_grad():
            errors[method] = float((model(batches[0]).logits - dense).norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["admm"] < errors["wanda"], errors


def statistics_held_at(cls: type, method: str, llama, batches, monkeypatch) -> list[list[str]]:
    """The statistics a SparseGPT one-shot holds each time ``cls.method`` is called."""
    held = []
    original = getattr(cls, method)

    def spy(self, *args, **kwargs):
        held.append(sorted(self._stats))
        original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)
    prunekit.oneshot(copy.deepcopy(llama), batches, "sparsegpt", progress=False)
    return held


def test_one_blocks_statistics_at_a_time_stage_by_stage(llama, batches, monkeypatch):
    held = statistics_held_at(CalibratedSparsifier, "step", llama, batches, monkeypatch)
    stages = [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
              ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert held == [[f"model.layers.{i}.{name}.weight" for name in stage]
                    for i in range(3) for stage in stages]


def test_a_stage_solves_with_its_raw_hessians_already_freed(llama, batches, monkeypatch):
    """Only the factors reach the solve: the raw Hessians (as large) are gone by then."""
    held = statistics_held_at(SparseGPTSparsifier, "update_mask", llama, batches, monkeypatch)
    assert held == [[]] * 21


def test_the_heap_is_trimmed_before_every_block(llama, batches, monkeypatch):
    from prunekit.oneshot import engine

    engine.release_free_heap()  # the real one is harmless wherever it runs
    calls = []
    monkeypatch.setattr(engine, "release_free_heap", lambda: calls.append(1))
    prunekit.oneshot(copy.deepcopy(llama), batches, "wanda", progress=False)
    assert len(calls) == 3


def test_masks_exist_for_one_block_at_a_time(llama, batches):
    model = copy.deepcopy(llama)
    seen = []

    def count(_block, _args):
        seen.append(sorted(n for n, m in model.named_modules()
                           if parametrize.is_parametrized(m, "weight")))

    handles = [block.register_forward_pre_hook(count) for block in model.model.layers]
    prunekit.oneshot(model, batches, "sparsegpt", progress=False)
    for handle in handles:
        handle.remove()
    blocks_masked = {tuple(sorted({name.split(".")[2] for name in names})) for names in seen}
    assert blocks_masked == {(), ("0",), ("1",), ("2",)}  # never two blocks at once
    assert not any(parametrize.is_parametrized(m, "weight") for m in model.modules())


def test_inputs_repeated_across_batches_are_kept_once(llama, batches):
    from prunekit.oneshot.engine import capture_inputs, inference_context

    with inference_context(llama):
        records = capture_inputs(llama, resolve_blocks(llama, "auto"), batches)
    first = records[0].kwargs["position_embeddings"]
    assert all(r.kwargs["position_embeddings"] is first for r in records[1:])
    hidden = [r.args[0] if r.args else r.kwargs["hidden_states"] for r in records]
    assert len({id(h) for h in hidden}) == len(records)
    assert not torch.equal(hidden[0], hidden[1])


def test_inputs_that_differ_across_batches_are_kept_apart():
    from prunekit.oneshot.engine import capture_inputs

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x, scale, offset):
            return self.inner(x) * scale + offset

    block = Scaled()
    same, other = torch.ones(4), torch.full((4,), 2.0)
    batches = [(torch.randn(3, 4), scale, same.clone()) for scale in (same, other, same.clone())]
    records = capture_inputs(block, [("", block)], batches)
    assert [r.args[1] is records[0].args[1] for r in records] == [True, False, True]
    assert all(r.args[2] is records[0].args[2] for r in records)


class Fork(nn.Module):
    """Two layers read the same input, a third reads what both made."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.a(x)) * torch.tanh(self.b(x)))


@pytest.mark.parametrize("cls", [WandaSparsifier, SparseGPTSparsifier])
def test_later_layers_of_a_block_calibrate_on_the_pruned_earlier_ones(cls):
    torch.manual_seed(0)
    model, batches = Fork(), [torch.randn(32, 16) for _ in range(2)]
    manual = copy.deepcopy(model)
    prunekit.oneshot(model, batches, "wanda" if cls is WandaSparsifier else "sparsegpt",
                     blocks=None, progress=False)
    prune_manually(cls, manual.a, batches)
    prune_manually(cls, manual.b, batches)
    with torch.no_grad():
        hidden = [torch.tanh(manual.a(x)) * torch.tanh(manual.b(x)) for x in batches]
    prune_manually(cls, manual.out, hidden)
    for name in ("a", "b", "out"):
        torch.testing.assert_close(getattr(model, name).weight, getattr(manual, name).weight)


@pytest.mark.parametrize("cls", [WandaSparsifier, SparseGPTSparsifier])
def test_each_block_calibrates_on_the_pruned_outputs_of_the_one_before(cls):
    batches = [torch.randn(32, 16) for _ in range(2)]
    model = stack_of_blocks()
    prunekit.oneshot(model, batches, "wanda" if cls is WandaSparsifier else "sparsegpt",
                     blocks="", progress=False)
    manual, xs = stack_of_blocks(), list(batches)
    for block in manual:
        prune_manually(cls, block[0], xs)  # the block's inputs are its Linear's inputs
        with torch.no_grad():
            xs = [block(x) for x in xs]
    for ours, theirs in zip(model, manual, strict=True):
        torch.testing.assert_close(ours[0].weight, theirs[0].weight)


def test_plain_module_as_one_block_takes_tuples_and_dicts():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    model = TwoInputs()
    x, y = torch.randn(2, 4, 8)
    batches = [(x, y), {"x": y, "y": x}]
    assert prunekit.oneshot(model, batches, "sparsegpt", sparsity=0.25, progress=False) == {
        "a": 0.25, "b": 0.25}


def test_decoder_stack_discovery(llama):
    assert find_decoder_stack(llama) == "model.layers"
    assert [f for f, _ in resolve_blocks(llama, "auto")] == [f"model.layers.{i}" for i in range(3)]
    plain = stack_of_blocks()
    assert resolve_blocks(plain, "auto") == [("", plain)]
    with pytest.raises(ConfigError, match="no stack of transformer blocks found"):
        find_decoder_stack(nn.Sequential(nn.Linear(2, 2)))


def test_modes_and_cache_setting_are_restored(llama, batches):
    model = copy.deepcopy(llama).train()
    model.model.layers[0].train(False)
    prunekit.oneshot(model, batches, "wanda", progress=False)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert model.config.use_cache is llama.config.use_cache


BAD = [
    ({"calibration_batches": []}, ConfigError, "no calibration batches"),
    ({"calibration_batches": None}, ConfigTypeError, "must be a list of batches"),
    ({"calibration_batches": torch.zeros(2, 8, dtype=torch.long)}, ConfigTypeError,
     "wrap one batch in a list"),
    ({"calibration_batches": [torch.zeros(2, 8)]}, ConfigTypeError,
     "batch 0: token ids must be an integer tensor, got dtype torch.float32"),
    ({"calibration_batches": [torch.zeros(8, dtype=torch.long)]}, ConfigError,
     r"shape \(batch, seq_len\), got \(8,\)"),
    ({"calibration_batches": [torch.full((1, 4), 96)]}, ConfigError,
     r"ids must lie in \[0, 96\), got \[96, 96\]"),
    ({"calibration_batches": ["text"]}, ConfigTypeError, "expected a tensor, dict or tuple"),
    ({"method": "obc"}, ConfigError, "method must be one of"),
    ({"pattern": "4:4"}, ConfigError, "1 <= N < M, got 4:4"),
    ({"pattern": "1:3", "method": "wanda"}, ConfigError, "in_features to be a multiple of 3"),
    ({"pattern": "2:4", "sparsity": 0.7}, ConfigError, "2:4 means sparsity 0.5, got sparsity=0.7"),
    ({"sparsity": -0.1}, ConfigError, r"sparsity must be in \[0, 1\]"),
    ({"layers": ["model.layers.0.mlp.down"]}, FqnError, "down_proj"),
    ({"layers": ["lm_head"]}, ConfigError, "'lm_head' lies outside the blocks"),
    ({"layers": ["model.norm"]}, ConfigError, "'model.norm' is a LlamaRMSNorm; expected nn.Linear"),
    ({"overrides": {"model.layers.9.mlp.up_proj": 0.1}}, FqnError, "are not pruned layers"),
    ({"overrides": {"model.layers.0.mlp.up_proj": "3:2"}}, ConfigError, "got 3:2"),
    ({"blocks": "model.embed_tokens"}, ConfigError, "is a Embedding; expected a non-empty"),
    ({"blocks": "model.stack"}, FqnError, "blocks='model.stack': no such module"),
    ({"percdamp": -1.0}, ConfigError, "percdamp > 0"),
    ({"exact_update": True, "method": "wanda"}, ConfigError, "exact_update refines SparseGPT"),
    ({"exact_update": True, "method": "admm"}, ConfigError, "exact_update refines SparseGPT"),
    ({"method": "admm", "percdamp": 0}, ConfigError, "need percdamp > 0, got 0"),
    ({"exact_update": "yes"}, ConfigTypeError, "exact_update must be a bool, got 'yes'"),
    ({"pattern": "1:3", "method": "magnitude"}, ConfigError, "multiple of 3, got 32"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_bad_input_is_refused_and_the_model_unchanged(llama, batches, kwargs, error, message):
    model = copy.deepcopy(llama)
    before = snapshot(model)
    args = {"calibration_batches": batches, "method": "sparsegpt", "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        prunekit.oneshot(model, **args)
    assert_unchanged(before, model)


def test_a_batch_the_plain_model_rejects_fails_before_any_change():
    model = stack_of_blocks()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"batch 1: the model's forward failed: RuntimeError"):
        prunekit.oneshot(model, [torch.randn(4, 16), torch.randn(4, 15)], "wanda", progress=False)
    with pytest.raises(ConfigError, match="batch 0: the model's forward failed"):
        prunekit.oneshot(model, [torch.randn(4, 16, dtype=torch.float64)], "wanda", progress=False)
    assert_unchanged(before, model)


def test_a_stack_the_forward_never_calls_is_refused_before_any_change():
    class Detour(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(16, 16)
            self.unused = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

        def forward(self, x):
            return self.used(x)

    model = Detour()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"batch 0: the forward never reached block 'unused\.0'"):
        prunekit.oneshot(model, [torch.randn(4, 16)], "wanda", blocks="unused", progress=False)
    assert_unchanged(before, model)


def test_magnitude_needs_no_batches():
    model = stack_of_blocks()
    assert prunekit.oneshot(model, method="magnitude", pattern="2:4", progress=False) == {
        "0.0": 0.5, "1.0": 0.5, "2.0": 0.5}


def test_blocks_that_are_linear_layers_themselves_are_pruned():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    report = prunekit.oneshot(model, [torch.randn(16, 8)], "sparsegpt", blocks="", progress=False)
    assert report == {"0": 0.5, "1": 0.5}


def test_a_whole_model_block_takes_keyword_batches(llama, batches):
    """With ``blocks=None`` the model is the one block: a batch of keywords only
    (``input_ids=``) has no hidden states to swap, and needs none."""
    model = copy.deepcopy(llama)
    achieved = prunekit.oneshot(model, [{"input_ids": b} for b in batches], "wanda",
                                blocks=None, progress=False)
    assert len(achieved) == 3 * 7 + 1 and set(achieved.values()) == {0.5}  # + lm_head
