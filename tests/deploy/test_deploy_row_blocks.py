"""prunekit's row-block CPU kernel: equal to dense on every tile edge, refusals, fallbacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.deploy import RowBlockLayout, SparseLinear, native, to_sparse
from prunekit.deploy.layouts import infer_row_blocksize
from prunekit.errors import ConfigError, ConfigTypeError
from tests.deploy._models import block_sparse, sparse_mlp
from tests.helpers import assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(
    native.row_block_kernel_error() is not None,
    reason=f"the row-block kernel does not build here: {native.row_block_kernel_error()}",
)


def _apply(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, block: tuple):
    layout = RowBlockLayout.fit(weight, "layer 'w'", block)
    return layout.linear(x, layout.pack(weight), bias)


# 1 token takes the vector path (partial sums in 16 lanes from width 8, over two runs of
# them at width 32); 64 is one full register tile of a group of up to 4 rows (32 of 8
# rows); 63/65/130 leave a rest. Heights 1, 2, 4, 16 take row groups of 1, 2, 4 and 8
# rows; a height of 3 is stored as blocks of one row. A layer's input reaches the kernel
# as a transposed view (copied to features x tokens); the next row-block layer's, as a
# contiguous tensor, which bfloat16 reads without a copy in blocks with rows from 32
# tokens on.
@pytest.mark.parametrize("tokens", [0, 1, 2, 63, 64, 65, 130])
@pytest.mark.parametrize(
    "block", [(1, 1), (1, 4), (1, 16), (2, 1), (3, 4), (4, 4), (2, 32), (16, 16)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tile_edge_matches_dense(tokens, block, dtype):
    weight = block_sparse(48, 64, block, 0.8).to(dtype)
    bias = torch.randn(48).to(dtype)
    x = torch.randn(tokens, 64).to(dtype)
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).to(dtype)
    torch.testing.assert_close(_apply(weight, x, bias, block), expected)
    layout = RowBlockLayout.fit(weight, "layer 'w'", block)
    from_contiguous = native.row_block_linear_t(x.T.contiguous(), layout.pack(weight), bias)
    torch.testing.assert_close(from_contiguous.T, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("view", ["rows of a wider tensor", "every other column"])
def test_inputs_of_any_strides_match_dense(view, dtype):
    """The kernel reads features x tokens: a transposed view is copied in blocks (rows of
    a wider tensor: a pitch beyond the width), other strides through torch's copy."""
    weight = block_sparse(48, 64, (4, 4), 0.7).to(dtype)
    wide = torch.randn(40, 128).to(dtype)
    x = wide[:, :64] if view == "rows of a wider tensor" else wide[:, ::2]
    got = _apply(weight, x, None, (4, 4))
    torch.testing.assert_close(got, torch.nn.functional.linear(x.float(), weight.float()).to(dtype))


@settings(max_examples=30, deadline=None)
@given(
    block_rows=st.integers(1, 12),
    blocks=st.integers(1, 12),
    height=st.sampled_from([1, 2, 3, 4, 8]),
    width=st.sampled_from([1, 2, 4, 8, 24]),
    sparsity=st.floats(0.0, 1.0),
    tokens=st.integers(1, 80),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_random_shapes_and_dtypes_match_dense(
    block_rows, blocks, height, width, sparsity, tokens, bias, dtype
):
    """16-bit weights and inputs are summed in float32 and rounded once, as dense
    bfloat16 matmuls do: the result is the float32 product of the stored values, rounded."""
    rows = block_rows * height
    weight = block_sparse(rows, blocks * width, (height, width), sparsity).to(dtype)
    b = torch.randn(rows, dtype=dtype) if bias else None
    x = torch.randn(tokens, blocks * width, dtype=dtype)
    got = _apply(weight, x, b, (height, width))
    assert got.dtype == dtype
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.nn.functional.linear(x.to(wide), weight.to(wide), None if b is None
                                          else b.to(wide)).to(dtype)  # fmt: skip
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("block", [(4, 4), (16, 16), (1, 4), (4, 1), (2, 8), (1, 1)])
def test_the_inferred_block_is_the_mask_s_own(block):
    weight = block_sparse(64, 128, block, 0.9)
    assert infer_row_blocksize(weight) == block
    assert RowBlockLayout.fit(weight, "w", None).describe() == f"row_blocks{block[0]}x{block[1]}"


@pytest.mark.parametrize(("block", "kept"), [((12, 4), "4x4"), ((3, 4), "1x4"), ((32, 1), "16x1")])
def test_other_heights_are_stored_in_the_tallest_kernel_height_that_divides_them(block, kept):
    weight = block_sparse(96, 32, block, 0.5)
    layout = RowBlockLayout.fit(weight, "w", block)
    assert layout.describe() == f"row_blocks{kept}"
    x = torch.randn(5, 32)
    torch.testing.assert_close(layout.linear(x, layout.pack(weight), None), x @ weight.T)


def test_zeros_inside_the_blocks_infer_single_weights():
    weight = block_sparse(64, 128, (4, 4), 0.9) * (torch.rand(64, 128) > 0.5)
    assert infer_row_blocksize(weight) == (1, 1)


def test_a_chain_passes_transposed_activations_between_layers():
    """fc1's output is a transposed view; GELU keeps its strides and fc2 reads it as is."""
    model = sparse_mlp((1, 4))
    deployed = to_sparse(model, layout="row_blocks")
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-5)
    x_t = torch.randn(64, 21).T  # a non-contiguous input
    torch.testing.assert_close(deployed(x_t), model(x_t), atol=1e-5, rtol=1e-5)


def test_auto_times_it_with_the_other_layouts():
    auto = to_sparse(sparse_mlp((1, 4)), torch.randn(64, 64))
    assert "row_blocks1x4" in auto.deploy_report["0"].times_ms
    auto = to_sparse(sparse_mlp((4, 4)), torch.randn(64, 64))
    assert "row_blocks4x4" in auto.deploy_report["0"].times_ms


@pytest.mark.parametrize(
    ("weight", "blocksize", "error", "message"),
    [
        (block_sparse(8, 12, (1, 4), 0.5), (1, 8), ConfigError, r"\(1, 8\) do not divide.*12\)"),
        (block_sparse(8, 12, (1, 4), 0.5), (3, 4), ConfigError, r"\(3, 4\) do not divide.*12\)"),
        (torch.zeros(8, 8, dtype=torch.int8), None, ConfigTypeError, r"dtype is torch.int8"),
        (torch.zeros(8, 8, device="meta"), None, ConfigError, r"CPU kernel; the weight is on meta"),
    ],
)
def test_misfits_name_the_layer(weight, blocksize, error, message):
    with pytest.raises(error, match=rf"layer 'fc'.*{message}"):
        RowBlockLayout.fit(weight, "layer 'fc'", blocksize)


def test_the_op_checks_its_operands():
    packed = block_sparse(8, 16, (1, 4), 0.5).to_sparse_bsr((1, 4))
    args = (packed.crow_indices(), packed.col_indices(), packed.values())
    with pytest.raises(RuntimeError, match="bias has 3 entries for 8 rows"):
        torch.ops.prunekit.row_block_linear_t(torch.randn(16, 2), *args, torch.randn(3))
    with pytest.raises(RuntimeError, match=r"values must be \(blocks, h, c\) of the input's dtype"):
        torch.ops.prunekit.row_block_linear_t(torch.randn(16, 2, dtype=torch.float64), *args, None)
    with pytest.raises(RuntimeError, match="both int32 or both int64, got Int and Long"):
        torch.ops.prunekit.row_block_linear_t(torch.randn(16, 2), args[0].int(), *args[1:], None)
    tall = block_sparse(9, 16, (3, 4), 0.5).to_sparse_bsr((3, 4))
    with pytest.raises(RuntimeError, match="blocks of 3 rows; the kernel takes 1, 2, 4, 8 or 16"):
        torch.ops.prunekit.row_block_linear_t(
            torch.randn(16, 2), tall.crow_indices(), tall.col_indices(), tall.values(), None
        )


def test_every_float16_value_is_widened_exactly():
    """Blocks 8 or more wide widen float16 from its bits at one token (c10's conversion is
    scalar): row r holds bit pattern r (all 65536: subnormals, infinities, NaNs) in
    column 0, and x picks column 0, so each output is its row's value, widened and
    rounded back."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    weight = torch.zeros(2**16, 16, dtype=torch.float16)
    weight[:, 0] = patterns.view(torch.float16)
    layout = RowBlockLayout((16, 16))
    x = torch.zeros(1, 16, dtype=torch.float16)
    x[0, 0] = 1
    got = layout.linear(x, layout.pack(weight), None)[0]
    torch.testing.assert_close(got, weight[:, 0], atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("block", [(1, 1), (2, 4), (4, 4), (16, 2)])
def test_gradients_flow_through_the_op(block):
    """Backward gives the true gradients of the input, the blocks' values and the bias
    (numerical check in float64), and the op's registrations agree (``opcheck``: fake
    kernel, autograd, torch.compile's tracing)."""
    weight = block_sparse(32, 16, block, 0.5).double()
    packed = RowBlockLayout(block).pack(weight)
    x_t = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    values = packed.values().clone().requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    args = (x_t, packed.crow_indices(), packed.col_indices(), values, bias)
    op = torch.ops.prunekit.row_block_linear_t
    assert torch.autograd.gradcheck(lambda x, v, b: op(x, *args[1:3], v, b), (x_t, values, bias))
    torch.library.opcheck(op.default, args)


def test_a_deployed_layer_passes_input_gradients_on():
    """A deployed model inside one being differentiated (attributions, adapters around
    it): the input's gradient equals the dense model's."""
    model = sparse_mlp((4, 4))
    deployed = to_sparse(model, layout="row_blocks")
    x = torch.randn(6, 64, requires_grad=True)
    (expected,) = torch.autograd.grad(model(x).square().sum(), x)
    (got,) = torch.autograd.grad(deployed(x).square().sum(), x)
    torch.testing.assert_close(got, expected)


def test_weights_pack_with_int32_indices_and_int64_ones_still_run():
    """int32 indices are fewer bytes per block to read; a weight packed by torch (int64,
    as in a state_dict saved packed) still loads and multiplies."""
    dense = SparseLinear(block_sparse(8, 16, (1, 4), 0.5), None, RowBlockLayout((1, 4)))
    assert dense.weight.col_indices().dtype == torch.int32
    assert dense.weight.crow_indices().dtype == torch.int32
    other = SparseLinear(torch.zeros(8, 16), None, RowBlockLayout((1, 4)))
    other.load_state_dict({"weight": dense.dense_weight().to_sparse_bsr((1, 4))})
    assert other.weight.col_indices().dtype == torch.int64
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), dense(x), atol=0, rtol=0)


def test_a_weight_packed_in_other_blocks_loads_in_the_module_s_own():
    """A checkpoint packed as 1 x 4 blocks (by torch, or a build that chose those) loads
    into a module deployed as 4 x 4 blocks, re-packed."""
    weight = block_sparse(8, 16, (4, 4), 0.5)
    module = SparseLinear(torch.zeros(8, 16), None, RowBlockLayout((4, 4)))
    module.load_state_dict({"weight": weight.to_sparse_bsr((1, 4))})
    assert module.weight.values().shape[1:] == (4, 4)
    x = torch.randn(3, 16)
    torch.testing.assert_close(module(x), x @ weight.T)


def test_without_a_compiler_the_layout_is_refused_and_auto_skips_it(monkeypatch):
    monkeypatch.setattr(native, "row_block_kernel_error", lambda: "OSError: no g++")
    model = sparse_mlp((1, 4))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"layer '0'.*needs prunekit's C\+\+ kernel.*no g\+\+"):
        to_sparse(model, layout="row_blocks", inplace=True)
    assert_unchanged(before, model)
    auto = to_sparse(model, torch.randn(8, 64))
    assert any("no g++" in s for s in auto.deploy_report["0"].skipped)
    with pytest.raises(RuntimeError, match="not available here: OSError: no g"):
        packed = torch.zeros(8, 64).to_sparse_bsr((1, 4))
        native.row_block_linear_t(torch.randn(64, 1), packed, None)


def test_a_conv1x1_runs_on_it():
    conv = nn.Conv2d(32, 16, 1)
    with torch.no_grad():
        conv.weight.copy_(block_sparse(16, 32, (1, 4), 0.7).reshape(16, 32, 1, 1))
    model = nn.Sequential(conv).eval()
    deployed = to_sparse(model, layout="row_blocks")
    x = torch.randn(2, 32, 5, 5)
    assert isinstance(deployed[0], SparseLinear)
    torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-5)
