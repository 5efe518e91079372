"""One small model per construct: each must shrink exactly like its masked twin, and
couplings (residual, cat, split, grouped convs, ...) must show up in the groups."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from prunekit.structured.engine import LayerPruner, importance_names, prune, register_layer
from prunekit.structured.engine.channels.state import Tracked
from tests.structured.zoo import ResNet, TinyLlama, ViT, check_equivalent, masked_copy


class SplitChunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.a(x).chunk(2, dim=1)
        r1, r2 = right.chunk(2, dim=1)
        return self.out(torch.cat([self.b(left), self.c(r1), r2], 1))


class Depthwise(nn.Module):
    """Depth multiplier 2, a grouped conv, Conv1d and Conv3d, SE-style gating."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.gc = nn.Conv2d(16, 16, 1, groups=4)
        self.se = nn.Conv2d(16, 16, 1)
        self.c1 = nn.Conv1d(16, 12, 3, padding=1)
        self.c3 = nn.Conv3d(12, 6, 1)
        self.bn = nn.BatchNorm1d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gc(F.relu(self.dw(self.pw(x))))
        y = y * torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1)))
        z = self.bn(self.c1(y.flatten(2)))
        return self.c3(z.unsqueeze(-1).unsqueeze(-1))


class Tokens(nn.Module):
    """Embedding, LayerNorm, a learned per-channel scale, GroupNorm over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.fc1 = nn.Linear(16, 24)
        self.scale = nn.Parameter(torch.rand(24) + 0.5)
        self.ln = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 8)
        self.gn = nn.GroupNorm(2, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.fc1(self.embed(t))) * self.scale)
        h = self.gn(self.fc2(h).transpose(1, 2)).transpose(1, 2)
        return self.out(h.mean(1))


CASES = {
    "split_chunk": (SplitChunk, lambda: torch.randn(2, 3, 6, 6)),
    "depthwise_grouped_conv1d_conv3d": (Depthwise, lambda: torch.randn(2, 3, 5, 5)),
    "embedding_layernorm_groupnorm": (Tokens, lambda: torch.randint(0, 30, (2, 5))),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_construct_shrinks_like_masked(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    make, inp = CASES[name]
    model, x = make(), inp()
    out_shape = model(x).shape
    plan = check_equivalent(model, x, ratio=ratio)
    assert plan.totals["params_after"] < plan.totals["params_before"]
    assert model(x).shape == out_shape


def test_chunks_stay_equal_and_cat_concatenates() -> None:
    torch.manual_seed(0)
    model, x = SplitChunk(), torch.randn(2, 3, 6, 6)
    plan = prune(model, x, ratio=0.5)
    a = next(g for g in plan.groups if "a.weight[0]" in g.members)
    assert a.width == 4 and len(a.kept) == 2  # channel j of each quarter is one unit
    assert {"b.weight[1]", "c.weight[1]", "out.weight[1]"} <= set(a.members)
    plan.apply()
    assert (model.a.out_channels, model.b.in_channels, model.c.in_channels) == (8, 4, 2)
    assert model.out.in_channels == model.b.out_channels + model.c.out_channels + 2


def test_constant_split_sizes_and_slices_freeze_channels() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            left, right = self.a(x).split([3, 5], dim=-1)
            h = self.b(torch.cat([left, right], -1))
            return self.c(h[:, :6].repeat(1, 2)[:, :8])

    torch.manual_seed(0)
    model = Constant()
    check_equivalent(model, torch.randn(3, 4), ratio=0.5)
    assert (model.a.out_features, model.b.out_features) == (8, 8)


class EqualSplit(nn.Module):
    """Two equal halves, multiplied: coupled only if an attribute holds their size."""

    def __init__(self, held: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(8, 2)
        if held:
            self.split_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.a(x).split(getattr(self, "split_size", 8), dim=-1)
        return self.b(left * torch.pow(right, 2))


@pytest.mark.parametrize("held", [False, True])
def test_equal_splits_whose_size_an_attribute_holds_shrink_together(held: bool) -> None:
    """GPT-2's ``c_attn(x).split(self.split_size)``: the halves lose the same channels
    and ``split_size`` follows; a size only the code knows keeps them whole."""
    torch.manual_seed(0)
    model = nn.Sequential(EqualSplit(held))  # attributes are read from the calling submodule
    check_equivalent(model, torch.randn(3, 4), ratio=0.5)
    assert model[0].a.out_features == (8 if held else 16)
    assert getattr(model[0], "split_size", None) == (4 if held else None)


def test_grouped_convs_lose_whole_groups() -> None:
    torch.manual_seed(0)
    model, x = Depthwise(), torch.randn(2, 3, 5, 5)
    prune(model, x, ratio=0.5).apply()
    assert model.dw.groups == model.pw.out_channels == model.dw.in_channels
    assert model.dw.out_channels == 2 * model.dw.groups
    assert (
        model.gc.in_channels % model.gc.groups == 0 and model.gc.in_channels // model.gc.groups == 4
    )


def test_layernorm_is_reported_inexact() -> None:
    torch.manual_seed(0)
    plan = prune(Tokens(), torch.randint(0, 30, (2, 5)), ratio=0.5)
    assert plan.inexact == ["ln"]
    assert "normalisation statistics change in ln" in str(plan)


def test_unknown_op_freezes_its_channels_but_stays_correct() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.cumsum(self.a(x), dim=-1)  # mixes channels: a's outputs are frozen
            return self.c(F.relu(self.b(h)))

    torch.manual_seed(0)
    model = Odd()
    check_equivalent(model, torch.randn(3, 4), ratio=0.5)
    assert (model.a.out_features, model.b.in_features, model.b.out_features) == (8, 8, 4)


def test_ignored_layers_round_to_and_min_channels() -> None:
    torch.manual_seed(0)
    model, x = ResNet("basic", (1, 1), width=16, classes=5), torch.randn(1, 3, 32, 32)
    check_equivalent(model, x, ratio=0.6, ignored_layers=["stages.1.conv1"], round_to=4)
    assert model.stages[1].conv1.out_channels == 32
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths)
    model = ResNet("basic", (1, 1), width=16, classes=5)
    prune(model, x, ratio=0.9, min_channels=5).apply()
    assert model.stem[0].out_channels == 5


def test_global_pruning_ranks_across_groups() -> None:
    torch.manual_seed(0)
    model, x = ResNet("basic", (1, 1), width=16, classes=5), torch.randn(1, 3, 32, 32)
    block = model.stages[1]
    with torch.no_grad():  # channels 0-7 of this group are worthless next to the rest
        block.conv1.weight[:8].mul_(1e-4)
        block.bn1.weight[:8].mul_(1e-4)
        block.bn1.bias[:8].mul_(1e-4)
        block.conv2.weight[:, :8].mul_(1e-4)
    plan = prune(model, x, ratio=0.25, global_pruning=True)
    widths = sum(g.width for g in plan.groups)
    assert sum(len(g.kept) for g in plan.groups) == widths - widths // 4
    group = next(g for g in plan.groups if "stages.1.conv1.weight[0]" in g.members)
    assert not set(range(8)) & set(group.kept)
    assert len({len(g.kept) / g.width for g in plan.groups}) > 1  # uneven across groups
    check_equivalent(model, x, ratio=0.25, global_pruning=True)


@pytest.mark.parametrize("criterion", sorted(set(importance_names()) - {"taylor"}))
def test_every_criterion_gives_an_equivalent_model(criterion: str) -> None:
    torch.manual_seed(0)
    model = ResNet("basic", (1, 1), width=8, classes=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    check_equivalent(model, torch.randn(1, 3, 16, 16), ratio=0.5, importance=criterion)
    assert model.stem[0].out_channels == 4


def test_taylor_uses_user_gradients() -> None:
    torch.manual_seed(0)
    model, x = ResNet("basic", (1, 1), width=8, classes=5), torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    check_equivalent(model, x, ratio=0.5, importance="taylor")
    assert model.stem[0].out_channels == 4


def test_whole_heads_and_gqa_groups_are_pruned_and_attributes_follow() -> None:
    torch.manual_seed(0)
    model, tokens = TinyLlama(), torch.randint(0, 64, (2, 6))
    plan = check_equivalent(model, tokens, ratio=0.5)
    block = model.blocks[0]
    assert (block.num_heads, block.num_key_value_heads, block.head_dim) == (2, 1, 8)
    assert (block.q_proj.out_features, block.k_proj.out_features) == (16, 8)
    assert block.o_proj.in_features == 16 and block.down.in_features == 24
    changes = {(a.owner, a.name): (a.old, a.new) for a in plan.attrs}
    assert changes[("blocks.0", "num_key_value_heads")] == (2, 1)
    assert "attribute blocks.0.num_heads: 4 -> 2" in str(plan)


def test_head_split_ties_a_heads_channels() -> None:
    torch.manual_seed(0)
    model = ViT()
    plan = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
    heads = next(g for g in plan.groups if "blocks.0.attn.q_proj.weight[0]" in g.members)
    assert heads.width == 4 and len(heads.kept) == 2
    assert {"blocks.0.attn.k_proj.weight[0]", "blocks.0.attn.o_proj.weight[1]"} <= set(
        heads.members
    )
    plan.apply()
    assert model.blocks[0].attn.heads == 2 and model.blocks[0].attn.head_dim == 8


def test_literal_sizes_without_a_known_attribute_freeze_heads() -> None:
    class Literal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x).view(x.shape[0], 2, 4)  # 2 heads, written as a literal
            return self.o((q * q.softmax(-1)).flatten(1))

    torch.manual_seed(0)
    model = Literal()
    check_equivalent(model, torch.randn(3, 8), ratio=0.5)
    assert model.q.out_features == 8


class ChannelScale(nn.Module):
    """A user's layer: one learned scale per channel (traced through, it looks unknown)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


def _scaled() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), ChannelScale(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_a_registered_layer_pruner_makes_a_custom_layer_prunable() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    before = _scaled()
    check_equivalent(before, x, ratio=0.5)
    assert before[0].out_channels == 8  # the literal-free view of a parameter is unknown

    @register_layer
    class ChannelScalePruner(LayerPruner):
        types = (ChannelScale,)

        def trace(self, module: nn.Module, fqn: str, node: fx.Node, ctx: Any) -> Any:
            ids = ctx.input_ids(node.args[0], 1, module.weight.numel())
            ctx.add_member(fqn, "weight", 0, ids)
            return Tracked(1, ids)

        def resize(self, module: nn.Module) -> None:
            """Nothing to update: the width lives in the weight alone."""

    after = _scaled()
    check_equivalent(after, x, ratio=0.5)
    assert (after[0].out_channels, after[1].weight.numel(), after[3].in_channels) == (4, 4, 4)


class MHABlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_loses_one_dim_of_every_head_exactly(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), MHABlock(batch_first=batch_first), nn.Linear(32, 3))
    x = torch.randn(2, 5, 8)
    plan = check_equivalent(model, x, ratio=0.5)
    attn = model[1].attn
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (16, 4, 4)
    assert attn.in_proj_weight.shape == (48, 16) and attn.out_proj.weight.shape == (16, 16)
    stream = next(g for g in plan.groups if "1.attn.in_proj_weight[1]" in g.members)
    assert stream.width == 8  # head_dim units, each spanning the 4 heads
    torch.export.export(model, (x,))


def test_output_layers_shrink_only_when_asked() -> None:
    torch.manual_seed(0)
    model, x = ResNet("basic", (1, 1), width=8, classes=6), torch.randn(2, 3, 16, 16)
    plan = prune(model, x, ratio=0.5, prune_outputs=True)
    kept = torch.tensor(next(s.keep for s in plan.slices if s.owner == "fc" and s.dim == 0))
    masked = masked_copy(model.eval(), plan)
    plan.apply()
    assert model.fc.out_features == 3
    torch.testing.assert_close(model(x), masked(x)[:, kept], rtol=1e-5, atol=1e-6)


def test_token_mixing_linear_passes_channels_through() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.mix, self.o = nn.Linear(6, 10), nn.Linear(4, 4), nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.gelu(self.a(x))
            h = self.mix(h.transpose(1, 2)).transpose(1, 2)  # a Linear over the tokens
            return self.o(h).sum(1)

    torch.manual_seed(0)
    model = Mixer()
    check_equivalent(model, torch.randn(2, 4, 6), ratio=0.5)
    assert (model.a.out_features, model.mix.in_features, model.o.in_features) == (5, 4, 5)


def test_shared_layer_buffers_and_view_into_linear() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, 5)
            self.register_buffer("scale", torch.rand(1, 8, 1, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b(F.relu(self.b(F.relu(self.a(x))) * self.scale))  # b called twice
            y = F.avg_pool2d(y, 2)
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(0)
    model = Shared()
    check_equivalent(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert model.b.weight.shape == (4, 4, 3, 3) and model.scale.shape == (1, 4, 1, 1)
    assert model.fc.in_features == 4 * 4 * 4
