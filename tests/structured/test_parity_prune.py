"""prune() vs the reference's on the models of torch.testing._internal.common_pruning:
same masks, outputs equal to the reference's pruned model and to our masked model, and
shapes no larger than the reference's (equal wherever the reference shrinks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.testing._internal.common_pruning as cp
from torch import nn
from torch.ao.pruning._experimental import pruner as ref

import prunekit.structured as ps

IMAGE = (1, 1, 12, 12)
MODELS = [
    (cp.SimpleLinear, (3, 7)), (cp.LinearBias, (3, 7)), (cp.LinearActivation, (3, 7)),
    (cp.LinearActivationFunctional, (3, 7)), (cp.SimpleConv2d, IMAGE), (cp.Conv2dBias, IMAGE),
    (cp.Conv2dActivation, IMAGE), (cp.Conv2dPadBias, IMAGE), (cp.Conv2dPool, IMAGE),
    (cp.Conv2dPoolFlatten, IMAGE), (cp.Conv2dPoolFlattenFunctional, IMAGE),
]
# Models without a padded consumer: the reference shrinks every layer, so shapes must agree.
NO_PADDING = {"SimpleLinear", "LinearBias", "LinearActivation", "LinearActivationFunctional",
              "SimpleConv2d", "Conv2dBias", "Conv2dActivation"}


def _config(model: nn.Module, prune_bias: bool) -> list[dict]:
    """Every Linear/Conv2d but the last (the reference's tests keep the output width)."""
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    return [{"tensor_fqn": f"{n}.weight", "prune_bias": prune_bias} for n in names[:-1]]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _both(model_cls, prune_bias, make_ref, make_ours, shape):
    torch.manual_seed(0)
    base = model_cls().eval()
    x = torch.randn(shape)
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    theirs, ours = make_ref(), make_ours()
    theirs.prepare(ref_model, _config(base, prune_bias))
    ours.prepare(our_model, _config(base, prune_bias))
    theirs.step()
    ours.step()
    return theirs, ours, ref_model, our_model, x


SALIENCY = (lambda: ref.SaliencyPruner({"sparsity_level": 0.5}),
            lambda: ps.SaliencyPruner({"sparsity_level": 0.5}))
FPGM = (lambda: ref.FPGMPruner(0.3), lambda: ps.FPGMPruner(0.3))
# The scorer does not change what prune() does; FPGM runs the whole matrix with -m slow.
CASES = [
    pytest.param(*SALIENCY, True, id="saliency-prune_bias"),
    pytest.param(*SALIENCY, False, id="saliency-fold_bias"),
    pytest.param(*FPGM, False, id="fpgm-fold_bias", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("make_ref", "make_ours", "prune_bias"), CASES)
@pytest.mark.parametrize(("model_cls", "shape"), MODELS, ids=[m.__name__ for m, _ in MODELS])
def test_prune_matches_reference(model_cls, shape, prune_bias, make_ref, make_ours):
    theirs, ours, ref_model, our_model, x = _both(model_cls, prune_bias, make_ref, make_ours, shape)
    for key in theirs.state:
        assert torch.equal(theirs.state[key]["mask"], ours.state[key]["mask"])
    with torch.no_grad():
        masked = our_model(x)
        assert torch.allclose(masked, ref_model(x), atol=1e-6)
        pruned_ref = theirs.prune()
        pruned = ours.prune()
        y = pruned(x)
        assert torch.allclose(y, masked, rtol=1e-5, atol=1e-5)
        assert torch.allclose(y, pruned_ref(x), rtol=1e-5, atol=1e-5)
    assert pruned is our_model
    ours_shapes, ref_shapes = _shapes(pruned), _shapes(pruned_ref)
    # the reference adds a zero bias to a consumer even when the folded constant is zero
    assert ours_shapes.keys() <= ref_shapes.keys()
    for name, shape in ours_shapes.items():
        assert torch.Size(shape).numel() <= torch.Size(ref_shapes[name]).numel(), name
        if model_cls.__name__ in NO_PADDING:
            assert shape == ref_shapes[name], name
    assert not any(hasattr(m, "parametrizations") for m in pruned.modules())
    assert not any(hasattr(m, "_bias") or m._forward_hooks for m in pruned.modules())


def test_fpgm_prune_matches_reference_on_a_padded_pooled_model():
    test_prune_matches_reference(cp.Conv2dPool, IMAGE, False, *FPGM)


def test_padded_consumer_with_zero_constant_is_shrunk_where_the_reference_is_not():
    """prune_bias=True zeroes the pruned channels, so zero padding is no obstacle."""
    theirs, ours, _, our_model, x = _both(
        cp.Conv2dPadBias, True, lambda: ref.SaliencyPruner({"sparsity_level": 0.5}),
        lambda: ps.SaliencyPruner({"sparsity_level": 0.5}), IMAGE,
    )
    masked = our_model(x)
    pruned_ref, pruned = theirs.prune(), ours.prune()
    assert pruned.conv2d1.weight.shape[1] == 32 and pruned_ref.conv2d1.weight.shape[1] == 64
    assert torch.allclose(pruned(x), masked, atol=1e-5)


LSTM_MODELS = [cp.LSTMLinearModel, cp.LSTMLayerNormLinearModel]


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("model_cls", LSTM_MODELS, ids=[m.__name__ for m in LSTM_MODELS])
def test_lstm_with_gate_aligned_masks_matches_reference(model_cls, num_layers):
    torch.manual_seed(0)
    base = model_cls(8, 12, 5, num_layers).eval()
    units = torch.ones(12, dtype=torch.bool)
    units[[1, 4, 7, 10]] = False
    config = [
        {"tensor_fqn": f"lstm.weight_{k}_l{i}", "mask": units.repeat(4)}
        for i in range(num_layers) for k in ("ih", "hh")
    ]
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    theirs = ref.LSTMSaliencyPruner({"sparsity_level": 0.0})
    ours = ps.LSTMSaliencyPruner({"sparsity_level": 0.0})
    theirs.prepare(ref_model, copy.deepcopy(config))
    ours.prepare(our_model, copy.deepcopy(config))
    x = torch.randn(6, 3, 8)
    with torch.no_grad():
        masked = our_model(x)
        pruned_ref, pruned = theirs.prune(), ours.prune()
        expected, got = pruned_ref(x), pruned(x)
    assert _shapes(pruned) == _shapes(pruned_ref)
    assert pruned.lstm.hidden_size == 8
    assert torch.allclose(got[0], expected[0], atol=1e-6)
    if model_cls is cp.LSTMLinearModel:  # no LayerNorm: masked == pruned, kept units
        assert torch.allclose(got[0], masked[0], atol=1e-5)
        assert torch.allclose(got[1], masked[1][..., units], atol=1e-5)
        assert torch.equal(masked[1][..., ~units], torch.zeros_like(masked[1][..., ~units]))


def test_lstm_saliency_independent_gates_remove_only_fully_masked_units():
    torch.manual_seed(0)
    model = cp.LSTMLinearModel(8, 12, 5, 1).eval()
    config = [{"tensor_fqn": "lstm.weight_ih_l0"}, {"tensor_fqn": "lstm.weight_hh_l0"}]
    pruner = ps.LSTMSaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, config)
    pruner.step()
    masks = [pruner.state[c["tensor_fqn"]]["mask"].reshape(4, 12) for c in config]
    gone = int(torch.stack([~m for m in masks]).all(0).all(0).sum())
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        masked = model(x)
        pruner.prune()
        out = model(x)
    assert model.lstm.hidden_size == 12 - gone
    assert torch.allclose(out[0], masked[0], atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_saliency_tie_gates_removes_whole_units_exactly(num_layers):
    torch.manual_seed(0)
    model = cp.LSTMLinearModel(8, 12, 5, num_layers).eval()
    config = [{"tensor_fqn": f"lstm.weight_{k}_l{i}", "tie_gates": True}
              for i in range(num_layers) for k in ("ih", "hh")]
    pruner = ps.LSTMSaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, config)
    pruner.step()
    for i in range(num_layers):
        ih, hh = (pruner.state[f"lstm.weight_{k}_l{i}"]["mask"].reshape(4, 12)
                  for k in ("ih", "hh"))
        assert torch.equal(ih, hh) and bool((ih == ih[0]).all()) and int(ih[0].sum()) == 6
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        masked = model(x)
        pruner.prune()
        out = model(x)
    assert model.lstm.hidden_size == 6 and model.linear.in_features == 6
    assert torch.allclose(out[0], masked[0], atol=1e-5)
