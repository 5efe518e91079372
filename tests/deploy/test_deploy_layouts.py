"""Each registered layout packs, multiplies and refuses misfits (parametrised over LAYOUTS)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.deploy import LAYOUTS, BsrLayout, SemiStructuredLayout, infer_blocksize
from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError
from tests.deploy._models import block_sparse

CUDA = torch.cuda.is_available()


def _device_for(name: str) -> str:
    return "cuda" if name == "semi_structured" else "cpu"


def _two_four(rows: int, cols: int, device: str, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(rows, cols, device=device, dtype=dtype)
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=device)
    keep[..., :2] = True  # 2 of every 4
    return w * keep.reshape(rows, cols)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_matches_dense_linear(name):
    device = _device_for(name)
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    dtype = torch.float16 if device == "cuda" else torch.float32
    weight = _two_four(128, 128, device, dtype)  # fits every layout (2:4, 1x4-free blocks)
    bias = torch.randn(128, device=device, dtype=dtype)
    x = torch.randn(32, 128, device=device, dtype=dtype)
    layout = LAYOUTS[name].fit(weight, "layer 'w'", (2, 2) if name == "bsr" else None)
    y = layout.linear(x, layout.pack(weight), bias)
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), atol=tol, rtol=tol)
    torch.testing.assert_close(layout.unpack(layout.pack(weight)), weight)


@pytest.mark.parametrize(
    "block", [(16, 16), (4, 4), (1, 4), (4, 1), (8, 8)], ids=lambda b: f"{b[0]}x{b[1]}"
)
def test_infer_blocksize_finds_the_mask_block(block):
    weight = block_sparse(64, 128, block, 0.8)
    assert infer_blocksize(weight) == block


def test_infer_blocksize_is_none_for_unstructured_and_dense_weights():
    weight = torch.randn(64, 64)
    assert infer_blocksize(weight) is None
    assert infer_blocksize(weight * (torch.rand(64, 64) > 0.9)) is None


def test_bsr_block_not_dividing_the_shape_names_the_layer():
    weight = block_sparse(64, 128, (4, 4), 0.8)
    message = r"layer 'fc'.*BSR block \(3, 4\) does not divide .*\(64, 128\)"
    with pytest.raises(ConfigError, match=message):
        BsrLayout.fit(weight, "layer 'fc'", (3, 4))


def test_bsr_with_a_non_square_block_on_cpu_is_refused():
    weight = block_sparse(64, 128, (1, 4), 0.8)
    with pytest.raises(ConfigError, match=r"layer 'fc'.*BSR block \(1, 4\) is not square.*'csr'"):
        BsrLayout.fit(weight, "layer 'fc'", None)


def test_bsr_without_block_structure_says_how_to_fix():
    weight = torch.randn(64, 64) * (torch.rand(64, 64) > 0.9)
    with pytest.raises(ConfigError, match=r"layer 'fc'.*no block structure.*blocksize="):
        BsrLayout.fit(weight, "layer 'fc'", None)


@pytest.mark.parametrize("name", ["csr", "bsr", "semi_structured"])
def test_non_float_weights_are_refused(name):
    weight = torch.ones(8, 8, dtype=torch.int64)
    with pytest.raises(ConfigTypeError, match=r"layer 'fc'.*torch.int64; expected one of"):
        LAYOUTS[name].fit(weight, "layer 'fc'", (4, 4))


def test_semi_structured_on_cpu_is_refused_cleanly():
    with pytest.raises(ConfigError, match=r"layer 'fc'.*needs a CUDA weight; got device cpu"):
        SemiStructuredLayout.fit(_two_four(64, 64, "cpu"), "layer 'fc'", None)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_semi_structured_refuses_a_non_two_four_mask():
    weight = torch.randn(64, 64, device="cuda", dtype=torch.float16)  # dense: 4 of 4
    with pytest.raises(ConfigError, match=r"layer 'fc'.*needs a 2:4 weight"):
        SemiStructuredLayout.fit(weight, "layer 'fc'", None)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.sampled_from([4, 8, 12, 16]),
    cols=st.sampled_from([4, 8, 16, 20]),
    block=st.sampled_from([(1, 4), (4, 4), (2, 2), (4, 1)]),
    sparsity=st.floats(0.0, 1.0),
    tokens=st.integers(1, 9),
    bias=st.booleans(),
)
def test_compressed_layouts_equal_dense_on_random_shapes(rows, cols, block, sparsity, tokens, bias):
    weight = block_sparse(rows, cols, block, sparsity)
    b = torch.randn(rows) if bias else None
    x = torch.randn(tokens, cols)
    expected = torch.nn.functional.linear(x, weight, b)
    candidates = [("csr", None), ("row_blocks", None), ("row_blocks", block)]
    candidates += [("bsr", block)] if block[0] == block[1] else []
    for name, blocksize in candidates:
        layout = LAYOUTS[name].fit(weight, "w", blocksize)
        got = layout.linear(x, layout.pack(weight), b)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["csr", "bsr"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_compressed_layer_cast_to_16_bits_says_what_to_do(name, dtype):
    """torch's CPU CSR/BSR kernels take float32 and float64 only: a layer deployed in them
    and cast afterwards refuses clearly, where torch's own error names an MKL function."""
    weight = block_sparse(32, 64, (4, 4), 0.75)
    layout = LAYOUTS[name].fit(weight, "layer 'w'", (4, 4))
    packed = layout.pack(weight).to(dtype)
    with pytest.raises(UnsupportedError, match=rf"layout '{name}.*{dtype}.*float32 and "
                                               "float64 only.*'row_blocks' or 'auto'"):
        layout.linear(torch.randn(3, 64, dtype=dtype), packed, None)
