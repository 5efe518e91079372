"""Equivalence for every chain prune() handles beyond the reference: the pruned model's
outputs equal the masked model's (eval mode) and the layers really shrink."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit.structured as ps


class Chain(nn.Module):
    """``head(x)`` → ``middle`` (a callable) → ``tail``; only ``head`` is pruned."""

    def __init__(self, head: nn.Module, middle, tail: nn.Module) -> None:
        super().__init__()
        self.head, self.tail = head, tail
        self.middle = middle if isinstance(middle, nn.Module) else nn.Identity()
        self.fn = None if isinstance(middle, nn.Module) else middle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.head(x))
        return self.tail(h if self.fn is None else self.fn(h))


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -1, 1)


def _prune(model: nn.Module, x: torch.Tensor, fqns, prune_bias=True, level=0.5, pruner=None):
    torch.manual_seed(0)
    _randomise_bn(model)
    model.eval()
    pruner = pruner or ps.SaliencyPruner({"sparsity_level": level})
    pruner.prepare(model, [{"tensor_fqn": f"{f}.weight", "prune_bias": prune_bias} for f in fqns])
    pruner.step()
    with torch.no_grad():
        masked = model(x)
        assert pruner.prune() is model
        pruned = model(x)
    return masked, pruned


def _linear(i, o, bias=True):
    torch.manual_seed(i * 31 + o)
    return nn.Linear(i, o, bias=bias)


CHAINS = {
    "linear-dropout-relu": (lambda: nn.Sequential(
        _linear(6, 8), nn.Dropout(0.3), nn.ReLU(), _linear(8, 3)), (4, 6)),
    "linear-bn1d-tanh": (lambda: nn.Sequential(
        _linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), _linear(8, 3)), (4, 6)),
    "linear-prelu-per-channel": (lambda: nn.Sequential(
        _linear(6, 8), nn.PReLU(8), _linear(8, 3)), (4, 6)),
    "torch.relu": (lambda: Chain(_linear(6, 8), torch.relu, _linear(8, 3)), (4, 6)),
    "x.relu()": (lambda: Chain(_linear(6, 8), lambda h: h.relu(), _linear(8, 3)), (4, 6)),
    "torch.sigmoid (non-zero constant)": (
        lambda: Chain(_linear(6, 8, bias=False), torch.sigmoid, _linear(8, 3)), (4, 6)),
    "leaky_relu with args": (
        lambda: Chain(_linear(6, 8), lambda h: F.leaky_relu(h, 0.2), _linear(8, 3)), (4, 6)),
    "conv-bn-relu-conv": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3)),
        (2, 3, 9, 9)),
    "conv1d-relu-maxpool-conv1d": (lambda: nn.Sequential(
        nn.Conv1d(3, 8, 3), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(8, 4, 3)), (2, 3, 20)),
    "conv-maxpool-conv": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 5, 3)), (2, 3, 12, 12)),
    "conv3d-gelu-conv3d": (lambda: nn.Sequential(
        nn.Conv3d(2, 6, 3), nn.GELU(), nn.Conv3d(6, 4, 1)), (1, 2, 6, 6, 6)),
    "conv-relu-adaptivepool-flatten-linear": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), _linear(32, 5)),
        (2, 3, 9, 9)),
    "conv1d-bn-relu-adaptivepool-flatten-linear": (lambda: nn.Sequential(
        nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        _linear(8, 5)), (2, 3, 12)),
}


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "fold_bias"])
@pytest.mark.parametrize("name", list(CHAINS))
def test_chain_shrinks_and_matches_masked_model(name, prune_bias):
    make, shape = CHAINS[name]
    model = make()
    head = "head" if isinstance(model, Chain) else "0"
    rows = model.get_submodule(head).weight.shape[0]
    torch.manual_seed(1)
    x = torch.randn(shape)
    masked, pruned = _prune(model, x, [head], prune_bias)
    assert torch.allclose(pruned, masked, rtol=1e-5, atol=1e-5)
    assert model.get_submodule(head).weight.shape[0] == rows - rows // 2, name


class FanOut(nn.Module):
    """One pruned layer read by two Linears and by the model output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _linear(5, 8), _linear(8, 3), _linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor):
        h = F.relu(self.a(x))
        return self.b(h) + self.c(h), h


@pytest.mark.parametrize("prune_bias", [True, False])
def test_fan_out_to_several_consumers_and_the_output(prune_bias):
    model = FanOut()
    x = torch.randn(4, 5)
    pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
    (masked, masked_h), (pruned, pruned_h) = _prune(model, x, ["a"], prune_bias, pruner=pruner)
    keep = pruner.state["a.weight"]["mask"]
    assert model.b.in_features == model.c.in_features == pruned_h.shape[1] == 4
    assert torch.allclose(pruned, masked, atol=1e-5)
    assert torch.allclose(pruned_h, masked_h[:, keep], atol=1e-5)


def test_every_layer_of_a_deep_chain_at_once():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.1),
        nn.Conv2d(8, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )
    x = torch.randn(2, 3, 12, 12)
    masked, pruned = _prune(model, x, ["0", "4", "7"], prune_bias=False)
    assert [model[i].out_channels for i in (0, 4, 7)] == [4, 4, 3]
    assert model[1].num_features == 4 and model[11].in_features == 3
    assert torch.allclose(pruned, masked, rtol=1e-5, atol=1e-5)
    model.train()
    model(x).square().sum().backward()  # the shrunk model is plain modules and still trains
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("padding", [1, "same"])
def test_padded_consumer(padding):
    def make(bias):
        torch.manual_seed(0)
        head = nn.Conv2d(3, 8, 3, bias=bias)
        if bias:
            nn.init.uniform_(head.bias, 0.5, 1.0)  # pruned channels output relu(b) > 0
        return nn.Sequential(head, nn.ReLU(), nn.Conv2d(8, 4, 3, padding=padding))

    x = torch.randn(1, 3, 10, 10)
    # a zero constant is safe to remove even with zero padding
    model = make(bias=False)
    masked, pruned = _prune(model, x, ["0"], prune_bias=False)
    assert model[0].out_channels == 4 and torch.allclose(pruned, masked, atol=1e-5)
    # a non-zero constant cannot become a bias (borders): one pruned channel stays as the
    # anchor and carries the others' weights
    model = make(bias=True)
    masked, pruned = _prune(model, x, ["0"], prune_bias=False)
    assert model[0].out_channels == 5 and model[2].in_channels == 5
    assert int((model[0].weight.flatten(1).abs().sum(1) == 0).sum()) == 1
    assert torch.allclose(pruned, masked, rtol=1e-5, atol=1e-5)


class PaddedAndOutput(nn.Module):
    """A non-zero constant read by a zero-padded conv and by the model output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3, padding=1)
        nn.init.uniform_(self.a.bias, 0.5, 1.0)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h), h


def test_no_anchor_possible_keeps_width_with_the_mask_baked_in():
    model = PaddedAndOutput()
    x = torch.randn(1, 3, 10, 10)
    (masked, masked_h), (pruned, pruned_h) = _prune(model, x, ["a"], prune_bias=False)
    assert model.a.out_channels == 8 and model.b.in_channels == 8
    assert int((model.a.weight.flatten(1).abs().sum(1) == 0).sum()) == 4
    assert torch.allclose(pruned, masked, atol=1e-5) and torch.allclose(pruned_h, masked_h)


def test_anchor_for_resnet_style_conv_bn_relu_conv():
    """§12.10 of the spec: Conv-BN-ReLU-Conv(padding=1) used to save nothing."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(2, 3, 8, 8)
    masked, pruned = _prune(model, x, ["0", "3"], level=0.5)
    assert model[0].out_channels <= 9 and model[3].out_channels <= 5
    assert torch.allclose(pruned, masked, rtol=1e-4, atol=1e-5)


def test_reflect_padding_keeps_constants_so_it_shrinks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1,
                                                                   padding_mode="reflect"))
    x = torch.randn(1, 3, 10, 10)
    masked, pruned = _prune(model, x, ["0"], prune_bias=False)
    assert model[0].out_channels == 4 and torch.allclose(pruned, masked, atol=1e-5)


def test_fpgm_prunes_every_layer_of_a_conv_net():
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 10, 3), nn.ReLU(),
                          nn.Conv2d(10, 2, 1))
    x = torch.randn(2, 3, 9, 9)
    masked, pruned = _prune(model, x, ["0", "2", "4"], pruner=ps.FPGMPruner(0.3))
    assert [model[i].out_channels for i in (0, 2, 4)] == [7, 7, 1]
    keep = masked.abs().sum((0, 2, 3)) != 0  # the output layer's pruned channel is all zero
    assert pruned.shape[1] == 1 and torch.allclose(pruned, masked[:, keep], atol=1e-5)


@pytest.mark.parametrize("prune_bias", [True, False])
def test_prune_functions_called_directly(prune_bias):
    model = nn.Sequential(_linear(6, 8), nn.ReLU(), _linear(8, 3))
    pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, [{"tensor_fqn": "0.weight", "prune_bias": prune_bias}])
    pruner.step()
    x = torch.randn(4, 6)
    with torch.no_grad():
        masked = model(x)
        ps.prune_linear_activation_linear(model[0], F.relu, model[2])
        assert torch.allclose(model(x), masked, atol=1e-5)
    assert model[0].out_features == 4 and not hasattr(model[0], "parametrizations")


def test_prune_conv2d_padded_keeps_width_and_outputs():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 3, padding=1))
    pruner = ps.SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, [{"tensor_fqn": "0.weight", "prune_bias": False}])
    pruner.step()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        masked = model(x)
        ps.prune_conv2d_padded(model[0])
        assert torch.allclose(model(x), masked, atol=1e-6)
    assert model[0].out_channels == 6 and model[0].bias is not None


_ACTS = [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.Identity()]


@settings(max_examples=10, deadline=None)
@given(
    widths=st.lists(st.integers(2, 9), min_size=2, max_size=4),
    acts=st.lists(st.integers(0, len(_ACTS) - 1), min_size=3, max_size=3),
    level=st.floats(0.0, 0.9), prune_bias=st.booleans(), bn=st.booleans(), seed=st.integers(0, 99),
)
def test_property_random_conv_chains_are_exact(widths, acts, level, prune_bias, bn, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = [3, *widths]
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        layers.append(nn.Conv2d(cin, cout, 3 if i % 2 == 0 else 1))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(copy.deepcopy(_ACTS[acts[i % len(acts)]]))
    model = nn.Sequential(*layers, nn.Conv2d(channels[-1], 2, 1))
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:-1]
    x = torch.randn(2, 3, 8, 8)
    masked, pruned = _prune(model, x, heads, prune_bias, level=level)
    assert torch.allclose(pruned, masked, rtol=1e-4, atol=1e-5)
    assert [model.get_submodule(h).out_channels for h in heads] == [
        w - int(w * level) for w in widths
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prune_on_cuda():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).cuda()
    x = torch.randn(2, 3, 9, 9, device="cuda")
    masked, pruned = _prune(model, x, ["0", "3"], prune_bias=False)
    assert model[0].weight.is_cuda and model[0].out_channels == 4
    assert torch.allclose(pruned, masked, rtol=1e-4, atol=1e-4)
