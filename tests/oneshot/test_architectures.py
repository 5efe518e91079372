"""prunekit.oneshot on decoder stacks whose blocks get inputs of their own: Gemma 2's
alternating sliding and global layers, Gemma 3's global layers with their own rotary
embeddings, Qwen2's sliding-window layers. Each block must be calibrated and advanced
with the masks and embeddings the model itself gives that block."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import prunekit
from prunekit import WandaSparsifier
from prunekit.oneshot.blocks import resolve_blocks
from prunekit.oneshot.engine import capture_inputs, inference_context

transformers = pytest.importorskip("transformers")

COMMON = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
WINDOW = 4  # shorter than the batches' 16 tokens: sliding and global masks differ
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=8, sliding_window=WINDOW),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=8,
                                                    sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True,
                                              sliding_window=WINDOW, max_window_layers=2),
}


def decoder(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    """Three batches, one of them left-padded (its own attention mask)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for padded in (False, True, False):
        mask = torch.ones(2, 16, dtype=torch.long)
        if padded:
            mask[0, :5] = 0
        out.append({"input_ids": torch.randint(0, 96, (2, 16), generator=g),
                    "attention_mask": mask})
    return out


def reference_wanda(model: nn.Module, data: list[dict[str, torch.Tensor]],
                    order: list[str] | None = None) -> None:
    """Layer by layer in forward order (``order``: Linear fqns; default: as the blocks
    register them), each calibrated on whole-model forwards of the model as pruned so
    far: slow, and right whatever the blocks are given."""
    if order is None:
        order = [f"{fqn}.{name}" for fqn, block in resolve_blocks(model, "auto")
                 for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    for layer in order:
        sparsifier = WandaSparsifier()
        sparsifier.prepare(model, [{"tensor_fqn": f"{layer}.weight"}])
        with sparsifier.calibrate(), torch.no_grad():
            for batch in data:
                model(**batch)
        sparsifier.step()
        sparsifier.squash_mask()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_block_is_calibrated_on_its_own_masks_and_embeddings(arch):
    model, data = decoder(arch), batches()
    ours = copy.deepcopy(model)
    prunekit.oneshot(ours, data, "wanda", progress=False)
    reference_wanda(model, data)
    for (name, got), want in zip(ours.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(got == 0, want == 0), name
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize(("arch", "own_inputs"),
                         [("llama", False), ("gemma2", True), ("gemma3", True), ("qwen2", True)])
def test_later_blocks_inputs_are_kept_only_when_they_differ_and_then_once(arch, own_inputs):
    model, data = decoder(arch), batches()
    with inference_context(model):
        records = capture_inputs(model, resolve_blocks(model, "auto"), data)
    assert [len(r.later) for r in records] == [5 * own_inputs] * 3
    tensors = {id(t) for r in records for later in r.later for t in later.kwargs.values()
               if isinstance(t, torch.Tensor)}
    masks = {id(later.kwargs["attention_mask"]) for r in records for later in r.later}
    assert all(later.args[:1] in ((), (None,)) for r in records for later in r.later)
    if own_inputs:  # per batch at most a sliding and a global mask, the unpadded shared
        assert 2 <= len(masks) <= 4 and len(tensors) <= 8


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * scale


class _TypedStack(nn.Module):
    """Four blocks of types a, b, a, b; each gets a ``scale`` of its own type, or, with
    ``by_index``, of its own index (what ``layer_types`` does not announce)."""

    def __init__(self, by_index: bool) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(layer_types=["a", "b", "a", "b"])
        self.layers = nn.ModuleList(_Scaled() for _ in range(4))
        self.by_index, self.calls = by_index, [0] * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            self.calls[i] += 1
            x = layer(x, scale=torch.tensor(float(i if self.by_index else i % 2 + 1)))
        return x


@pytest.mark.parametrize(("by_index", "calls"), [(False, [3, 3, 1, 1]), (True, [3, 3, 3, 3])])
def test_later_batches_stop_at_the_first_block_of_each_type_when_types_decide(by_index, calls):
    """Blocks of one type got the same inputs on the first batch: the other batches run
    only up to block 1 and blocks 2, 3 get the inputs of blocks 0, 1; otherwise they run
    through, and every block keeps its own."""
    model = _TypedStack(by_index)
    with torch.no_grad():
        records = capture_inputs(model, list(model.layers.named_children()),
                                 [torch.randn(2, 4) for _ in range(3)])
    assert model.calls == calls
    want = [1.0, 2.0, 3.0] if by_index else [2.0, 1.0, 2.0]
    for record in records:
        assert record.kwargs["scale"].item() == (0.0 if by_index else 1.0)
        assert [later.kwargs["scale"].item() for later in record.later] == want
        assert all(later.args[:1] == (None,) for later in record.later)


def test_a_copied_record_advances_through_the_same_later_inputs_on_its_own():
    from prunekit.oneshot.engine import BlockInput

    sliding, full = torch.zeros(1), torch.ones(1)
    later = [BlockInput((None,), {"mask": full}), BlockInput((None,), {"mask": sliding})]
    record = BlockInput((torch.randn(2),), {"mask": sliding}, later)
    twin = record.copy()
    hidden = torch.randn(2)
    record.advance(hidden)
    assert record.args[0] is hidden and record.kwargs["mask"] is full
    assert twin.kwargs["mask"] is sliding and len(twin.later) == 2
    twin.advance(hidden)
    twin.advance(hidden)
    assert twin.kwargs["mask"] is sliding and not twin.later


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_dense_targets_follow_the_blocks_own_inputs_too(arch):
    model = decoder(arch)
    achieved = prunekit.oneshot(model, batches(), "sparsegpt", dense_targets=True,
                                progress=False)
    assert len(achieved) == 6 * 7 and all(v == 0.5 for v in achieved.values())
    with torch.no_grad():
        assert torch.isfinite(model(**batches()[1]).logits).all()

