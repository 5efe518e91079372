import copy

import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_fx
from torch.nn.utils import parametrize

import prunekit
from prunekit import ConfigError, FakeSparsity, module_contains_param


def _prepared(level=0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sparsifier = prunekit.WeightNormSparsifier(level, (1, 1))
    sparsifier.prepare(model, None)
    sparsifier.step()
    return model, sparsifier


def test_fake_sparsity_multiplies_and_keeps_mask_out_of_state_dict():
    mask = torch.tensor([[True, False], [False, True]])
    fs = FakeSparsity(mask)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(fs(x), torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    assert fs.state_dict() == {} and fs.mask is mask
    with pytest.raises(
        ConfigError, match=r"mask shape \(2, 2\) must match the tensor's shape \(3,\)"
    ):
        fs(torch.ones(3))


def test_float_masks_still_work_without_the_fast_path():
    layer = nn.Linear(2, 2, bias=False)
    fs = FakeSparsity(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    parametrize.register_parametrization(layer, "weight", fs)
    fs.apply_(layer.parametrizations.weight.original)
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        assert torch.equal(layer.weight, original * fs.mask)


def test_module_contains_param_and_type_seen_through():
    model, _ = _prepared()
    assert module_contains_param(model[0], FakeSparsity)
    assert not module_contains_param(model[1], FakeSparsity)
    assert not module_contains_param(nn.Linear(2, 2), FakeSparsity)
    assert parametrize.type_before_parametrizations(model[0]) is nn.Linear


def test_jit_trace_fx_and_quantization_prepare_see_the_mask():
    model, _ = _prepared()
    x = torch.randn(3, 8)
    expected = model(x)
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), expected)
    fx = torch.fx.symbolic_trace(model)
    assert torch.equal(fx(x), expected)
    qmodel = prepare_fx(
        copy.deepcopy(model),
        torch.ao.quantization.get_default_qconfig_mapping("x86"),
        example_inputs=(x,),
    )
    assert torch.allclose(qmodel(x), expected)


def test_export_sees_the_mask_even_after_the_fast_path_is_armed():
    model, _ = _prepared()
    x = torch.randn(3, 8)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(1.0)  # stored weight changes after export
        expected = model(x)
    assert torch.allclose(exported.module()(x), expected)


def test_deepcopy_drops_the_fast_path_key():
    model, _ = _prepared()
    clone = copy.deepcopy(model)
    assert clone[0].parametrizations.weight[0]._applied_key is None
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_deepcopy_model_lets_the_copy_lose_or_gain_masks_without_touching_the_original():
    """torch's deepcopy shares the ``Parametrized<Type>`` class, which
    ``remove_parametrizations`` and ``register_parametrization`` edit."""
    from prunekit.parametrization import deepcopy_model

    model = nn.Sequential(nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "weight", FakeSparsity(torch.rand(3, 4) > 0.5))
    x = torch.randn(2, 4)
    expected = model(x)
    copied = deepcopy_model(model)
    parametrize.register_parametrization(copied[0], "bias", FakeSparsity(torch.zeros(3) > 0))
    parametrize.remove_parametrizations(copied[0], "weight", leave_parametrized=True)
    parametrize.remove_parametrizations(copied[0], "bias", leave_parametrized=True)
    assert type(copied[0]) is nn.Linear and torch.allclose(copied(x), expected - model[0].bias)
    assert parametrize.type_before_parametrizations(model[0]) is nn.Linear
    assert not parametrize.is_parametrized(model[0], "bias")
    assert model[0].bias.shape == (3,)  # the copy's bias property is its own
    assert torch.equal(model(x), expected)
