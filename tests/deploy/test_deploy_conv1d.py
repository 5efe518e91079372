"""to_sparse on GPT-2, whose layers are transformers' ``Conv1D`` (a Linear with its weight
stored ``in x out``): deployed as the Linear they compute, with checkpoints still in
Conv1D's layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import prunekit
from prunekit.deploy import (
    CsrLayout,
    DenseLayout,
    FbgemmSparseQuantizedLinear,
    QnnpackSparseDynamicLinear,
    SparseConv1D,
    SparseLinear,
    native,
    sparse_quantize,
    to_sparse,
)
from prunekit.errors import ConfigError
from prunekit.parametrization import FakeSparsity
from tests.deploy._models import block_sparse
from tests.helpers import assert_unchanged, linearized, snapshot

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 64
KERNEL = native.row_block_kernel_error() is None  # prunekit's kernel builds where a compiler is
INPUTS = {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))}


def block_sparse_gpt2(stored_block: tuple[int, int] = (4, 4)) -> nn.Module:
    """A 2-block GPT-2 whose Conv1D weights are 70% zeros in ``stored_block`` blocks of
    the stored ``in x out`` weight (c_attn 32x96, attention c_proj 32x32, MLP 32x128
    and 128x32)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=32, bos_token_id=None, eos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for seed, layer in enumerate(m for m in model.modules() if isinstance(m, Conv1D)):
            layer.weight.copy_(block_sparse(*layer.weight.shape, stored_block, 0.7, seed=seed))
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def conv1d(nx: int = 32, nf: int = 16, seed: int = 0) -> Conv1D:
    layer = Conv1D(nf=nf, nx=nx)
    with torch.no_grad():
        layer.weight.copy_(block_sparse(nx, nf, (4, 4), 0.7, seed=seed))
        layer.bias.normal_()
    return layer


LAYOUTS = ["csr", "bsr", "dense"] + (["row_blocks"] if KERNEL else [])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_computes_what_gpt2_computes(layout):
    model = block_sparse_gpt2()
    deployed = to_sparse(model, layout=layout)
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)
    report = deployed.deploy_report["transformer.h.0.attn.c_attn"]
    assert (report.module_type, report.shape) == ("Conv1D", (96, 32))  # out x in, as a Linear
    conv1ds = [fqn for fqn, m in model.named_modules() if isinstance(m, Conv1D)]
    kind = Conv1D if layout == "dense" else SparseConv1D
    assert len(conv1ds) == 8
    assert all(isinstance(deployed.get_submodule(fqn), kind) for fqn in conv1ds)
    assert deployed.deploy_report["lm_head"].reason == "no zeros in the weight"


def test_auto_deploys_gpt2_from_its_keyword_inputs():
    model = block_sparse_gpt2()
    deployed = to_sparse(model, INPUTS)
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)
    timed = [c for c in deployed.deploy_report.layers if c.module_type == "Conv1D"]
    assert len(timed) == 8 and all({"dense", "csr"} <= set(c.times_ms) for c in timed)


def test_a_gpt2_pruned_by_oneshot_deploys():
    model = block_sparse_gpt2()
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 16))} for _ in range(2)]
    prunekit.oneshot(model, batches, method="wanda", sparsity=0.5, progress=False)
    deployed = to_sparse(model, layout="csr")
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)


def test_checkpoints_keep_conv1d_keys_and_layout():
    """A dense GPT-2 checkpoint (weights ``in x out``; the square attention c_proj too)
    loads into a deployed model, and a deployed one's into another."""
    model = block_sparse_gpt2()
    other = block_sparse_gpt2()
    with torch.no_grad():
        for layer in (m for m in other.modules() if isinstance(m, Conv1D)):
            layer.weight.mul_(-2.0)
    deployed = to_sparse(other, layout="csr")
    assert deployed.state_dict().keys() == model.state_dict().keys()
    deployed.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(deployed), logits(model), atol=1e-5, rtol=1e-5)
    again = to_sparse(other, layout="csr")
    again.load_state_dict(deployed.state_dict())
    torch.testing.assert_close(logits(again), logits(model), atol=1e-5, rtol=1e-5)


def test_the_module_packs_the_out_by_in_map_and_refuses_a_linear_checkpoint():
    layer = conv1d()
    sparse = SparseConv1D.from_dense(layer, CsrLayout())
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(sparse(x), layer(x), atol=1e-5, rtol=1e-5)
    assert (sparse.out_features, sparse.in_features) == (16, 32)
    torch.testing.assert_close(sparse.dense_weight(), layer.weight.detach().T)
    assert sparse.state_dict()["weight"].shape == (16, 32)  # packed, out x in
    linear_layout = {"weight": torch.zeros(16, 32), "bias": torch.zeros(16)}
    with pytest.raises(ConfigError, match=r"'weight' has shape \(16, 32\); expected \(32, 16\)"):
        sparse.load_state_dict(linear_layout)
    assert isinstance(sparse, SparseLinear)


def test_a_dense_state_keeps_the_stored_in_by_out_weight():
    layer = conv1d()
    fresh = Conv1D(nf=16, nx=32)
    fresh.load_state_dict(SparseConv1D.from_dense(layer, DenseLayout()).state_dict())
    torch.testing.assert_close(fresh.weight, layer.weight)


@pytest.mark.skipif(not KERNEL, reason="prunekit's row-block kernel needs a C++ compiler")
def test_block_shapes_kept_by_the_sparsifier_are_read_in_the_stored_layout():
    """``sparse_block_shape`` (4, 1) of an ``in x out`` weight is 1 x 4 in the map."""
    model = nn.Sequential(conv1d())
    model[0].sparse_params = {"sparse_block_shape": (4, 1)}
    assert to_sparse(model, layout="row_blocks").deploy_report["0"].layout == "row_blocks1x4"
    model[0].sparse_params = {"sparse_block_shape": (1, 4)}
    assert to_sparse(model, layout="row_blocks").deploy_report["0"].layout == "row_blocks4x1"


def test_a_misfit_names_the_conv1d_and_leaves_the_model_unchanged():
    model = block_sparse_gpt2()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'transformer.h.0.attn.c_attn' \(Conv1D \(32, 96\)\)"):
        to_sparse(model, layout="bsr", blocksize=(5, 5), inplace=True)
    assert_unchanged(before, model)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch 2.13 deprecates its int8 modules
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dynamic", [True, False])
def test_sparse_quantize_treats_gpt2_as_its_linear_twin(dynamic):
    model = block_sparse_gpt2()
    twin = linearized(model)
    quantized = sparse_quantize(model, [INPUTS], dynamic=dynamic)
    assert not any(isinstance(m, Conv1D) for m in quantized.modules())
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)  # the input is untouched
    expected = logits(sparse_quantize(twin, [INPUTS], dynamic=dynamic))
    assert torch.equal(logits(quantized), expected)  # int8 error itself: test_deploy_quantized
    kind = QnnpackSparseDynamicLinear if dynamic else FbgemmSparseQuantizedLinear
    assert sum(isinstance(m, kind) for m in quantized.modules()) == 9  # and lm_head


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch 2.13 deprecates its int8 modules
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_mask_still_attached_to_a_conv1d_is_read_through():
    layer = conv1d()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 16))  # dense: only the mask makes zeros
    mask = block_sparse(32, 16, (4, 4), 0.7, seed=9) != 0
    parametrize.register_parametrization(layer, "weight", FakeSparsity(mask))
    model = nn.Sequential(layer)
    x = torch.randn(5, 32)
    deployed = to_sparse(model, layout="bsr")
    torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-5)
    assert deployed.deploy_report["0"].layout == "bsr4x4"
    quantized = sparse_quantize(model)
    expected = sparse_quantize(linearized(nn.Sequential(conv1d_of(model[0]))))
    assert torch.equal(quantized(x), expected(x))


def conv1d_of(masked: nn.Module) -> Conv1D:
    """A plain Conv1D holding ``masked``'s masked weight."""
    plain = Conv1D(nf=masked.nf, nx=masked.nx)
    with torch.no_grad():
        plain.weight.copy_(masked.weight)
        plain.bias.copy_(masked.bias)
    return plain
