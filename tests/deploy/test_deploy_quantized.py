"""sparse_quantize and BaseSparsifier.convert with the sparse-quantized mappings."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.ao.nn.sparse.quantized as sparse_q
from torch import nn
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    get_default_qconfig,
    prepare,
    quantize_dynamic,
)

import prunekit
from prunekit.deploy import (
    FbgemmSparseQuantizedLinear,
    QnnpackSparseDynamicLinear,
    SparseQuantizedIsland,
    quantized_modules,
    sparse_quantize,
)
from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError
from tests.deploy._models import sparse_mlp
from tests.helpers import assert_unchanged, snapshot

pytestmark = [  # torch 2.13 deprecates its int8 tensors and eager quantization
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
X = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))


def _int8_bound(model: nn.Sequential, x: torch.Tensor) -> float:
    """A loose bound on the error of int8 rounding through the two layers: relative to
    the output's range, a few quantization steps of activations and weights."""
    return 0.05 * model(x).abs().max().item()


def _dense_int8(model: nn.Sequential, dynamic: bool, batches: list[torch.Tensor]) -> nn.Module:
    """torch's own dense int8 model with the same observers: the error to match."""
    if dynamic:
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    dense = copy.deepcopy(model)
    for i in (0, 2):
        dense[i] = SparseQuantizedIsland(dense[i])
        dense[i].qconfig = get_default_qconfig("fbgemm")
    prepare(dense, inplace=True)
    for batch in batches:
        dense(batch)
    return convert(dense)


@pytest.mark.parametrize("dynamic", [True, False])
def test_outputs_match_the_dense_model_within_int8_error(dynamic):
    model = sparse_mlp((1, 4))
    batches = [X[:8], X[8:]]
    q = sparse_quantize(model, None if dynamic else batches, dynamic=dynamic)
    error = (q(X) - model(X)).abs().max().item()
    dense_int8_error = (_dense_int8(model, dynamic, batches)(X) - model(X)).abs().max().item()
    assert 0 < error <= 1.1 * dense_int8_error + 1e-3
    assert error <= _int8_bound(model, X)
    kind = QnnpackSparseDynamicLinear if dynamic else FbgemmSparseQuantizedLinear
    layers = [m for m in q.modules() if isinstance(m, kind)]
    assert len(layers) == 2
    assert all(isinstance(m, (sparse_q.Linear, sparse_q.dynamic.Linear)) for m in layers)
    assert torch.backends.quantized.engine == "x86"  # the global engine is left alone


def test_dynamic_equals_torch_sparse_dynamic_linear_bit_for_bit():
    model = sparse_mlp((1, 4))
    q = sparse_quantize(model)
    plain = nn.Linear(64, 128)
    plain.load_state_dict(model[0].state_dict())
    plain.qconfig = torch.ao.quantization.default_dynamic_qconfig
    torch.backends.quantized.engine = "qnnpack"
    try:
        reference = sparse_q.dynamic.Linear.from_float(plain)
        expected = reference(X)
    finally:
        torch.backends.quantized.engine = "x86"
    torch.testing.assert_close(q[0](X), expected, atol=0, rtol=0)


def test_static_without_stubs_builds_one_island_per_linear():
    q = sparse_quantize(sparse_mlp(), [X], dynamic=False)
    assert isinstance(q[0], SparseQuantizedIsland) and isinstance(q[2], SparseQuantizedIsland)
    assert type(q[1]) is nn.GELU


def test_static_with_the_models_own_stubs_quantizes_between_them():
    layers = [nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)]
    model = nn.Sequential(QuantStub(), *layers, DeQuantStub())
    with torch.no_grad():
        model[1].weight.mul_(torch.rand(32, 64) > 0.8)
    q = sparse_quantize(model, [X], dynamic=False)
    assert [type(m).__name__ for m in q] == [
        "Quantize", "FbgemmSparseQuantizedLinear", "ReLU", "FbgemmSparseQuantizedLinear",
        "DeQuantize",
    ]  # fmt: skip
    assert (q(X) - model(X)).abs().max().item() <= _int8_bound(model, X)


def test_masks_still_attached_are_squashed_first():
    model = sparse_mlp(sparsity=0.0)
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.8)
    sparsifier.prepare(model, None)
    sparsifier.step()
    before, output = snapshot(model), model(X)
    q = sparse_quantize(model)
    zeros = (q[0].weight().dequantize() == 0).float().mean().item()
    assert zeros >= 0.8
    assert_unchanged(before, model)  # the copy was squashed; the model keeps its masks
    assert torch.equal(model(X), output)
    sparsifier.squash_mask()


@pytest.mark.parametrize("dynamic", [True, False])
def test_state_dict_round_trips_which_torch_classes_cannot(dynamic):
    batches = None if dynamic else [X]
    source = sparse_quantize(sparse_mlp((1, 4)), batches, dynamic=dynamic)
    target = sparse_quantize(sparse_mlp((1, 4), sparsity=0.5), batches, dynamic=dynamic)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(target(X), source(X), atol=0, rtol=0)


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("engine", ["x86", "qnnpack", "fbgemm"])
@pytest.mark.parametrize("copier", ["deepcopy", "torch.save"])
def test_copies_under_any_global_engine_run_and_save(dynamic, engine, copier, monkeypatch):
    """torch pickles the packed weights under the global engine and drops the module's
    state: a copy failed ('Unknown qengine') or could not save its state_dict."""
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {engine} engine in this torch build")
    model = sparse_quantize(sparse_mlp((1, 4)), None if dynamic else [X], dynamic=dynamic)
    monkeypatch.setattr(torch.backends.quantized, "engine", engine)
    if copier == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)  # the test's own file
    torch.testing.assert_close(twin(X), model(X), atol=0, rtol=0)
    assert list(twin.state_dict()) == list(model.state_dict())
    assert torch.backends.quantized.engine == engine


def test_static_without_calibration_is_refused():
    with pytest.raises(ConfigError, match=r"static int8 needs calibration_batches .*got none"):
        sparse_quantize(sparse_mlp(), dynamic=False)


@pytest.mark.parametrize(("dynamic", "engine"), [(True, "qnnpack"), (False, "fbgemm")])
def test_a_build_without_the_kernel_engine_gets_a_clear_error(monkeypatch, dynamic, engine):
    monkeypatch.setattr(quantized_modules, "supported_engines", lambda: ["x86", "onednn"])
    model = sparse_mlp()
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match=rf"needs the '{engine}' quantized engine.*\['x86'"):
        sparse_quantize(model, [X], dynamic=dynamic)
    assert_unchanged(before, model)


def test_non_float_and_missing_linears_are_refused():
    model = sparse_mlp()
    model[2].weight = nn.Parameter(torch.ones(32, 128, dtype=torch.int32), requires_grad=False)
    message = r"layer '2' \(Linear 128->32\): weight dtype is torch.int32"
    with pytest.raises(ConfigTypeError, match=message):
        sparse_quantize(model)
    with pytest.raises(ConfigTypeError, match=r"no nn\.Linear \(or transformers Conv1D\) layer"):
        sparse_quantize(nn.Sequential(nn.ReLU()))


def _sparsified() -> tuple[prunekit.WeightNormSparsifier, nn.Sequential]:
    model = sparse_mlp(sparsity=0.0)
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.7)
    sparsifier.prepare(model, None)
    sparsifier.step()
    return sparsifier, model


def test_sparsifier_convert_with_the_dynamic_mapping():
    sparsifier, model = _sparsified()
    mapping = prunekit.get_dynamic_sparse_quantized_mapping()
    q = sparsifier.convert(model, mapping=mapping)
    assert all(isinstance(q[i], QnnpackSparseDynamicLinear) for i in (0, 2))
    assert (q(X) - model(X)).abs().max().item() <= _int8_bound(model, X)


def test_sparsifier_convert_with_the_static_mapping_after_calibration():
    sparsifier, model = _sparsified()
    island = nn.Sequential(QuantStub(), model[0], DeQuantStub())
    island.qconfig = get_default_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(island, inplace=True)
    island(X)  # calibration
    mapping = prunekit.get_static_sparse_quantized_mapping()
    q = sparsifier.convert(island, mapping=mapping)
    assert isinstance(q[1], FbgemmSparseQuantizedLinear)
    scale, zero_point = island[0].activation_post_process.calculate_qparams()
    xq = torch.quantize_per_tensor(X, float(scale), int(zero_point), torch.quint8)
    error = (q[1](xq).dequantize() - model[0](X)).abs().max().item()
    assert error <= 0.05 * model[0](X).abs().max().item()


def test_sparsifier_convert_static_without_calibration_names_the_fix():
    sparsifier, model = _sparsified()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"Linear\(64->128\) has no calibrated .*sparse_quantize"):
        mapping = prunekit.get_static_sparse_quantized_mapping()
        sparsifier.convert(model, mapping=mapping, inplace=True)
    assert_unchanged(before, model)


def test_swap_still_refuses_targets_without_from_dense_or_handler():
    class Target(nn.Module):
        pass

    with pytest.raises(ConfigTypeError, match=r"Target .*has no from_dense"):
        prunekit.swap_module(nn.Linear(2, 2), {nn.Linear: Target})
