"""SparseLinear / SparseConv1x1: outputs, state_dict round trips, torch.export."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from prunekit.deploy import (
    BsrLayout,
    CsrLayout,
    DenseLayout,
    RowBlockLayout,
    SparseConv1x1,
    SparseLinear,
    native,
)
from prunekit.errors import ConfigError
from tests.deploy._models import block_sparse

LAYOUTS = [CsrLayout(), BsrLayout((4, 4))]
if native.row_block_kernel_error() is None:  # prunekit's kernel builds where a compiler is
    LAYOUTS += [RowBlockLayout((1, 4)), RowBlockLayout((1, 1)), RowBlockLayout((4, 4))]


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    lin = nn.Linear(32, 16, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(block_sparse(16, 32, (4, 4), 0.7, seed=seed))
    return lin


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense_on_3d_input(layout, bias):
    lin = _linear(bias)
    sparse = SparseLinear.from_dense(lin, layout)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(sparse(x), lin(x), atol=1e-5, rtol=1e-5)
    expected = torch.sparse_csr if layout.name == "csr" else torch.sparse_bsr
    assert sparse.weight.layout == expected
    torch.testing.assert_close(sparse.dense_weight(), lin.weight.detach())
    density = (lin.weight != 0).float().mean().item()
    assert f"layout={layout.describe()}, density={density:.3f}" in repr(sparse)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_outputs_are_transposed_views_unless_asked_contiguous(layout):
    """The kernels compute (out, tokens); the output is its transpose unless
    contiguous_output pays the copy (the values are the same either way)."""
    lin, x = _linear(), torch.randn(2, 5, 32)
    view = SparseLinear.from_dense(lin, layout)(x)
    contiguous = SparseLinear.from_dense(lin, layout, contiguous_output=True)
    assert not view.is_contiguous() and contiguous(x).is_contiguous()
    assert torch.equal(contiguous(x), view)
    assert "contiguous_output=True" in repr(contiguous)
    conv = nn.Conv2d(32, 16, 1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.7)
    pixels = SparseConv1x1.from_dense(conv, layout, contiguous_output=True)(
        torch.randn(2, 32, 3, 3))
    assert pixels.is_contiguous()


def test_sparse_conv1x1_matches_the_conv():
    conv = nn.Conv2d(32, 16, 1)
    with torch.no_grad():
        conv.weight.copy_(block_sparse(16, 32, (4, 4), 0.7).reshape(16, 32, 1, 1))
    sparse = SparseConv1x1.from_dense(conv, CsrLayout())
    x = torch.randn(3, 32, 5, 7)
    torch.testing.assert_close(sparse(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_state_dict_round_trip_with_a_different_number_of_nonzeros(layout):
    source = SparseLinear.from_dense(_linear(seed=1), layout)
    target = SparseLinear.from_dense(_linear(seed=2), layout)
    state = source.state_dict()
    keys = list(state)
    target.load_state_dict(state)
    assert list(state) == keys  # the caller's dict is not modified
    x = torch.randn(4, 32)
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_deepcopy_gives_a_module_of_its_own(layout):
    """torch cannot deepcopy compressed tensors (no storage); the module clones its own."""
    sparse = SparseLinear.from_dense(_linear(), layout)
    twin = copy.deepcopy(nn.Sequential(sparse, nn.ReLU()))[0]
    x = torch.randn(4, 32)
    torch.testing.assert_close(twin(x), sparse(x), atol=0, rtol=0)
    assert twin.weight is not sparse.weight and twin.layout is not sparse.layout
    with torch.no_grad():
        twin.weight.values().zero_()
    assert sparse.dense_weight().count_nonzero() > 0


def test_a_dense_checkpoint_loads_into_a_sparse_module():
    lin = _linear(seed=3)
    sparse = SparseLinear.from_dense(_linear(seed=4), CsrLayout())
    sparse.load_state_dict(lin.state_dict())
    assert sparse.weight.layout == torch.sparse_csr
    x = torch.randn(4, 32)
    torch.testing.assert_close(sparse(x), lin(x), atol=1e-5, rtol=1e-5)


def test_a_dense_state_has_the_conv_weights_shape():
    """A layout torch cannot save packed (semi-structured on CUDA; dense here) saves the
    weight in the deployed layer's own shape, so that layer loads it back."""
    conv = nn.Conv2d(32, 16, 1)
    sparse = SparseConv1x1.from_dense(conv, DenseLayout())
    assert sparse.state_dict()["weight"].shape == (16, 32, 1, 1)
    fresh = nn.Conv2d(32, 16, 1)
    fresh.load_state_dict(sparse.state_dict())
    torch.testing.assert_close(fresh.weight, conv.weight)
    with pytest.raises(ConfigError, match=r"expected \(16, 32, 1, 1\)"):
        sparse.load_state_dict({"weight": torch.zeros(16, 32), "bias": torch.zeros(16)})


def test_torch_save_and_load_of_a_sparse_state_dict():
    sparse = SparseLinear.from_dense(_linear(), BsrLayout((4, 4)))
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    fresh = SparseLinear.from_dense(_linear(seed=5), BsrLayout((4, 4)))
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh.dense_weight(), sparse.dense_weight())


def test_loading_a_wrong_shape_names_the_key_and_shapes():
    sparse = SparseLinear.from_dense(_linear(), CsrLayout())
    with pytest.raises(ConfigError, match=r"'weight' has shape \(8, 8\); expected \(16, 32\)"):
        sparse.load_state_dict({"weight": torch.zeros(8, 8), "bias": torch.zeros(16)})
    wrong = torch.zeros(16, 32).to_sparse_bsr((4, 4))
    message = r"'weight' is a torch.sparse_bsr tensor .*expected torch.sparse_csr"
    with pytest.raises(ConfigError, match=message):
        sparse.load_state_dict({"weight": wrong, "bias": torch.zeros(16)})


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.describe())
def test_torch_export_runs_but_export_save_is_refused_by_torch(layout):
    """torch.export traces sparse weights; serialising them is not supported by torch
    (documented limitation: ship the state_dict and call to_sparse at load time)."""
    sparse = SparseLinear.from_dense(_linear(), layout)
    x = torch.randn(4, 32)
    program = torch.export.export(sparse, (x,))
    torch.testing.assert_close(program.module()(x), sparse(x))
    with pytest.raises(RuntimeError, match="do not have is_contiguous"):
        torch.export.save(program, io.BytesIO())
