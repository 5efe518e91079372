"""Small model zoo for the engine's equivalence tests and benchmark, plus the
*masked* oracle: the original model with the planned channels zeroed."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.structured.engine import PrunePlan


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int = 1) -> None:
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.down = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.down(x))


class ResNet(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) or ResNet-50-style (Bottleneck, [3, 4, 6, 3])."""

    def __init__(
        self,
        block: str = "basic",
        layers: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        classes: int = 1000,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], width
        for i, n in enumerate(layers):
            w = width * 2**i
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if block == "basic":
                    stages.append(BasicBlock(cin, w, stride))
                    cin = w
                else:
                    stages.append(Bottleneck(cin, w, stride))
                    cin = w * 4
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2-style: inverted residuals with depthwise 3x3 convs."""

    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, width_mult: float = 1.0, classes: int = 1000, last: int = 1280) -> None:
        super().__init__()
        cin = int(32 * width_mult)
        layers: list[nn.Module] = [
            nn.Conv2d(3, cin, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(),
        ]
        for t, c, n, s in self.SETTINGS:
            cout = int(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self.classifier(x)


class DenseBlockNet(nn.Module):
    """DenseNet-style: each layer's output is concatenated to its input; a transition
    conv, grouped conv, GroupNorm and a flatten into Linear at the end."""

    def __init__(self, growth: int = 8, layers: int = 3, cin: int = 16, size: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, padding=1)
        self.layers = nn.ModuleList()
        for i in range(layers):
            c = cin + i * growth
            self.layers.append(
                nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1))
            )
        total = cin + layers * growth
        self.transition = nn.Conv2d(total, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16 * (size // 2) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        x = F.avg_pool2d(self.transition(x), 2)
        x = F.relu(self.norm(self.grouped(x)))
        return self.head(x.flatten(1))


class Attention(nn.Module):
    """Hugging Face-style self-attention with separate q/k/v/o projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        att = (q @ k.transpose(-2, -1) / self.head_dim**0.5).softmax(-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-style encoder: patch conv, cls token, position embedding, pre-norm blocks."""

    def __init__(
        self,
        image: int = 32,
        patch: int = 8,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp: int = 64,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class LSTMNet(nn.Module):
    """Embedding -> LSTM -> Linear on the last step."""

    def __init__(self, vocab: int = 50, emb: int = 16, hidden: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.fc(out[:, -1])


class GQABlock(nn.Module):
    """LLaMA-style block: RMSNorm, grouped-query attention (Hugging Face attribute names,
    ``repeat_interleave`` + ``scaled_dot_product_attention``), SwiGLU MLP via ``chunk``."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, dim // heads
        self.input_norm, self.post_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*(GQABlock(dim, 4, 2, 48) for _ in range(depth)))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(tokens))))


def small_zoo() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]]:
    """name -> (model factory, example input factory), sized for fast tests."""
    return {
        "resnet18": (
            lambda: ResNet("basic", (2, 2, 2, 2), width=8, classes=10),
            lambda: torch.randn(2, 3, 32, 32),
        ),
        "resnet50": (
            lambda: ResNet("bottleneck", (1, 1, 1, 1), width=4, classes=10),
            lambda: torch.randn(2, 3, 32, 32),
        ),
        "mobilenetv2": (
            lambda: MobileNetV2(0.25, classes=10, last=64),
            lambda: torch.randn(2, 3, 32, 32),
        ),
        "densenet": (DenseBlockNet, lambda: torch.randn(2, 3, 8, 8)),
        "vit": (ViT, lambda: torch.randn(2, 3, 32, 32)),
        "lstm": (LSTMNet, lambda: torch.randint(0, 50, (2, 7))),
        "llama-gqa": (TinyLlama, lambda: torch.randint(0, 64, (2, 6))),
    }


class _MaskedLayerNorm(nn.Module):
    """LayerNorm/RMSNorm over the kept channels only, zeros elsewhere: what the shrunk
    norm computes."""

    def __init__(self, ln: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.ln, self.keep = ln, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x.index_select(-1, self.keep)
        if not isinstance(self.ln, (nn.LayerNorm, nn.RMSNorm)):  # transformers' RMSNorm
            small = copy.deepcopy(self.ln)
            small.weight = nn.Parameter(self.ln.weight[self.keep])
            return torch.zeros_like(x).index_copy(-1, self.keep, small(kept).to(x.dtype))
        if isinstance(self.ln, nn.RMSNorm):
            y = F.rms_norm(kept, (self.keep.numel(),), self.ln.weight[self.keep], self.ln.eps)
            return torch.zeros_like(x).index_copy(-1, self.keep, y)
        y = F.layer_norm(
            kept,
            (self.keep.numel(),),
            self.ln.weight[self.keep],
            self.ln.bias[self.keep],
            self.ln.eps,
        )
        return torch.zeros_like(x).index_copy(-1, self.keep, y)


def masked_copy(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A copy of ``model`` with every planned-away entry zeroed (and LayerNorms that
    lose channels normalising over the kept ones): the oracle the shrunk model must match."""
    masked = copy.deepcopy(model)
    for s in plan.slices:
        tensor = getattr(masked.get_submodule(s.owner), s.name)
        drop = sorted(set(range(s.size)) - set(s.keep))
        with torch.no_grad():
            tensor.index_fill_(s.dim, torch.tensor(drop, dtype=torch.long), 0.0)
    for fqn in plan.inexact:
        keep = next(torch.tensor(s.keep) for s in plan.slices if s.owner == fqn)
        parent, _, name = fqn.rpartition(".")
        setattr(
            masked.get_submodule(parent), name, _MaskedLayerNorm(masked.get_submodule(fqn), keep)
        )
    return masked


def check_equivalent(
    model: nn.Module, example: torch.Tensor, rtol: float = 1e-5, **kwargs: object
) -> PrunePlan:
    """Plan with ``kwargs``, apply, and assert the shrunk model matches the masked oracle
    on a fresh input of the example's shape; returns the applied plan."""
    from prunekit.structured.engine import prune

    model.eval()
    plan = prune(model, example, **kwargs)
    masked = masked_copy(model, plan)
    fresh = example.clone() if not example.is_floating_point() else torch.randn_like(example)
    with torch.no_grad():
        expected = masked(fresh)
        plan.apply()
        got = model(fresh)
    scale = expected.abs().max().clamp_min(1e-6)
    assert got.shape == expected.shape
    assert ((got - expected).abs().max() / scale).item() <= rtol
    return plan
