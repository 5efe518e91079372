"""Sparse inference: turn zero-filled dense weights into modules that skip the zeros.

``to_sparse`` picks a sparse layout per layer (torch's CSR, BSR and 2:4 semi-structured,
or prunekit's own row-block CPU kernel), or keeps it dense, by timing on real inputs;
``sparse_quantize`` produces int8 ``torch.ao.nn.sparse.quantized`` Linear modules.
Nothing here imports the sparsifiers: deployment consumes weights, whatever made their
zeros.
"""

from prunekit.deploy.convert import to_sparse
from prunekit.deploy.layouts import (
    LAYOUTS,
    BsrLayout,
    CsrLayout,
    DenseLayout,
    Layout,
    RowBlockLayout,
    SemiStructuredLayout,
    infer_blocksize,
    register_layout,
)
from prunekit.deploy.modules import SparseConv1D, SparseConv1x1, SparseLinear
from prunekit.deploy.quantized import SparseQuantizedIsland, sparse_quantize
from prunekit.deploy.quantized_modules import (
    FbgemmSparseQuantizedLinear,
    QnnpackSparseDynamicLinear,
)
from prunekit.deploy.report import DeployReport, LayerChoice

__all__ = [
    "LAYOUTS",
    "BsrLayout",
    "CsrLayout",
    "DenseLayout",
    "DeployReport",
    "FbgemmSparseQuantizedLinear",
    "LayerChoice",
    "Layout",
    "QnnpackSparseDynamicLinear",
    "RowBlockLayout",
    "SemiStructuredLayout",
    "SparseConv1D",
    "SparseConv1x1",
    "SparseLinear",
    "SparseQuantizedIsland",
    "infer_blocksize",
    "register_layout",
    "sparse_quantize",
    "to_sparse",
]
