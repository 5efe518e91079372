"""Weight layouts for sparse inference: one class per layout behind ``Layout``, plus a registry.

A layout packs a zero-filled dense weight ``(out, in)`` into a torch tensor and multiplies
it with activations. ``Layout.fit`` decides whether a weight suits the layout and raises a
``ConfigError`` naming the layer when it does not, before anything is modified.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.deploy import native
from prunekit.errors import ConfigError, ConfigTypeError, UnsupportedError

__all__ = [
    "LAYOUTS",
    "BsrLayout",
    "CsrLayout",
    "DenseLayout",
    "Layout",
    "RowBlockLayout",
    "SemiStructuredLayout",
    "infer_blocksize",
    "register_layout",
]

# Block shapes tried when a weight carries no ``sparse_params["sparse_block_shape"]``,
# largest first so the coarsest fitting block (fewest indices) wins.
_BLOCK_CANDIDATES: tuple[tuple[int, int], ...] = (
    (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 16), (16, 1), (1, 8), (8, 1), (1, 4), (4, 1),
)  # fmt: skip
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@contextmanager
def _quiet_beta() -> Iterator[None]:
    """Silence torch's "sparse CSR support is in beta" notice: choosing the layout is ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse .* tensor support is in beta")
        yield


def check_float_weight(weight: torch.Tensor, where: str) -> None:
    """Sparse kernels multiply floating-point weights only (quantize *after* deploying)."""
    if weight.dtype not in _FLOAT_DTYPES:
        raise ConfigTypeError(
            f"{where}: weight dtype is {weight.dtype}; expected one of "
            f"{[str(d) for d in _FLOAT_DTYPES]} (deploy a float model, then quantize)"
        )


class Layout(ABC):
    """How a 2-D weight is stored and multiplied. Subclasses set ``name`` and register."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def fit(cls, weight: torch.Tensor, where: str, blocksize: tuple[int, int] | None) -> Layout:
        """A layout instance for ``weight``, or a ``ConfigError`` saying why it does not fit."""

    @abstractmethod
    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored form of the zero-filled dense ``weight``."""

    @abstractmethod
    def linear(self, x2d: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        """``x2d @ W.T + bias`` for a 2-D input ``(tokens, in)``."""

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """The dense weight back (for state_dict interop and reports)."""
        return packed.to_dense()

    def to_state(self, packed: Tensor) -> Tensor:
        """What ``state_dict`` stores: the packed tensor where torch can save it."""
        return packed

    def describe(self) -> str:
        return self.name


LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: make ``cls`` selectable as ``to_sparse(..., layout=cls.name)``."""
    LAYOUTS[cls.name] = cls
    return cls


def _compressed_linear(
    x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, layout: Layout
) -> torch.Tensor:
    # sparse @ dense wants the sparse operand first: y.T = W @ x.T (+ bias as a column).
    # ``layout`` names the layout in the error only: nothing is formatted per call.
    try:
        if bias is None:
            return torch.mm(packed, x2d.T).T
        return torch.addmm(bias.unsqueeze(1), packed, x2d.T).T
    except NotImplementedError as exc:  # a model cast to 16 bits after it was deployed
        if packed.device.type != "cpu" or packed.dtype not in (torch.bfloat16, torch.float16):
            raise
        raise UnsupportedError(
            f"layout {layout.describe()!r} with a {packed.dtype} weight: torch's CPU CSR/BSR "
            "kernels multiply float32 and float64 only. Deploy a 16-bit model (cast before "
            "to_sparse) with layout='row_blocks' or 'auto', or keep it in float32"
        ) from exc


@register_layout
class DenseLayout(Layout):
    """Leave the layer as it is: the baseline every other layout must beat."""

    name = "dense"

    @classmethod
    def fit(cls, weight: torch.Tensor, where: str, blocksize: tuple[int, int] | None) -> Layout:
        return cls()

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def linear(self, x2d: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x2d, packed, bias)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return packed


@register_layout
class CsrLayout(Layout):
    """Compressed sparse rows: one index per nonzero; suits unstructured sparsity."""

    name = "csr"

    @classmethod
    def fit(cls, weight: torch.Tensor, where: str, blocksize: tuple[int, int] | None) -> Layout:
        check_float_weight(weight, where)
        return cls()

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        with _quiet_beta():
            return weight.detach().contiguous().to_sparse_csr()

    def linear(self, x2d: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        return _compressed_linear(x2d, packed, bias, self)


def _stored_fraction(nonzero: torch.Tensor, block: tuple[int, int]) -> float:
    """Fraction of the weight a BSR layout with ``block`` stores (blocks with any nonzero)."""
    rows, cols = nonzero.shape
    blocks = nonzero.reshape(rows // block[0], block[0], cols // block[1], block[1])
    return blocks.any(dim=3).any(dim=1).float().mean().item()


def _coarsest_fitting_block(
    nonzero: torch.Tensor, density: float, candidates: tuple[tuple[int, int], ...]
) -> tuple[int, int] | None:
    """The first of ``candidates`` that divides the weight and whose blocks with any
    nonzero store at most 2% of the weight beyond its true ``density``."""
    rows, cols = nonzero.shape
    for block in candidates:
        if rows % block[0] or cols % block[1]:
            continue
        if _stored_fraction(nonzero, block) <= density + 0.02:
            return block
    return None


def infer_blocksize(weight: torch.Tensor) -> tuple[int, int] | None:
    """The coarsest block shape whose all-zero blocks hold (nearly) all of the zeros.

    A block fits when storing every block that has a nonzero costs at most 2% of the
    weight beyond its true density; ``None`` for unstructured (or dense) weights.
    """
    nonzero = weight.detach() != 0
    density = nonzero.float().mean().item()
    if density >= 1.0:
        return None
    return _coarsest_fitting_block(nonzero, density, _BLOCK_CANDIDATES)


@register_layout
class BsrLayout(Layout):
    """Block sparse rows with the mask's own block shape: one index per block."""

    name = "bsr"

    def __init__(self, blocksize: tuple[int, int]) -> None:
        self.blocksize = blocksize

    @classmethod
    def fit(cls, weight: torch.Tensor, where: str, blocksize: tuple[int, int] | None) -> Layout:
        check_float_weight(weight, where)
        block = blocksize if blocksize is not None else infer_blocksize(weight)
        if block is None:
            raise ConfigError(
                f"{where}: layout 'bsr' found no block structure in the zeros of the weight "
                f"{tuple(weight.shape)}; pass blocksize=(rows, cols) or use layout='csr'"
            )
        rows, cols = weight.shape
        if len(block) != 2 or min(block) < 1 or rows % block[0] or cols % block[1]:
            raise ConfigError(
                f"{where}: BSR block {tuple(block)} does not divide the weight shape "
                f"{(rows, cols)}; expected a block (r, c) with {rows} % r == 0 and {cols} % c == 0"
            )
        if weight.device.type == "cpu" and block[0] != block[1]:
            raise ConfigError(
                f"{where}: BSR block {tuple(block)} is not square; the CPU BSR kernel (MKL) "
                "multiplies square blocks only. Use layout='csr' (or a CUDA device)"
            )
        return cls((int(block[0]), int(block[1])))

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        with _quiet_beta():
            return weight.detach().contiguous().to_sparse_bsr(self.blocksize)

    def linear(self, x2d: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        return _compressed_linear(x2d, packed, bias, self)

    def describe(self) -> str:
        return f"bsr{self.blocksize[0]}x{self.blocksize[1]}"


# Blocks the row-block kernel tries, largest first (fewest indices per nonzero), the
# taller first of equal size (more rows share each activation it loads).
_ROW_BLOCK_HEIGHTS = (16, 8, 4, 2, 1)  # those the kernel is compiled for
_ROW_BLOCKS = tuple(
    sorted(
        ((h, c) for h in _ROW_BLOCK_HEIGHTS for c in (16, 8, 4, 2, 1) if h * c > 1),
        key=lambda block: (-block[0] * block[1], -block[0]),
    )
)


def infer_row_blocksize(weight: torch.Tensor) -> tuple[int, int]:
    """The coarsest ``h x c`` block (up to 16 x 16) that stores at most 2% of the weight
    beyond its true density (as ``infer_blocksize``); 1 x 1 when the zeros have no
    block structure."""
    nonzero = weight.detach() != 0
    density = nonzero.float().mean().item()
    # A block that fits has a fitting refinement, 1 x 2 or 2 x 1: one of those first
    # spares an unstructured weight the other 22 tries.
    if _coarsest_fitting_block(nonzero, density, ((1, 2), (2, 1))) is None:
        return (1, 1)
    return _coarsest_fitting_block(nonzero, density, _ROW_BLOCKS) or (1, 1)


@register_layout
class RowBlockLayout(Layout):
    """Blocks of h x c (1 x 1 is plain CSR) multiplied by prunekit's own CPU kernel
    (``prunekit.deploy.native``): one index per block, non-square blocks (1 x 4 and
    others, which torch's CPU BSR refuses), and the rows of a block (up to 8 at a time)
    share each activation they load. Heights 1, 2, 4, 8 and 16; a block of another
    height is stored as blocks of the tallest of those that divides it (a 12 x 4 block
    as 4 x 4 ones). Stored as a torch BSR tensor. Every float dtype: the
    only sparse CPU layout for bfloat16 and float16 models (read as stored, summed in
    float32), which torch's CPU CSR and BSR kernels refuse."""

    name = "row_blocks"

    def __init__(self, blocksize: tuple[int, int]) -> None:
        self.blocksize = blocksize

    @classmethod
    def fit(cls, weight: torch.Tensor, where: str, blocksize: tuple[int, int] | None) -> Layout:
        check_float_weight(weight, where)
        if weight.device.type != "cpu":
            raise ConfigError(
                f"{where}: layout 'row_blocks' is a CPU kernel; the weight is on "
                f"{weight.device} (use 'bsr' or 'semi_structured' there)"
            )
        rows, cols = weight.shape
        block = tuple(blocksize) if blocksize is not None else infer_row_blocksize(weight)
        if len(block) != 2 or min(block) < 1 or rows % block[0] or cols % block[1]:
            raise ConfigError(
                f"{where}: row blocks of {tuple(block)} do not divide the weight shape "
                f"{(rows, cols)}; expected a block (r, c) with {rows} % r == 0 and {cols} % c == 0"
            )
        error = native.row_block_kernel_error()
        if error is not None:
            raise ConfigError(
                f"{where}: layout 'row_blocks' needs prunekit's C++ kernel, which could not "
                f"be built here (a C++ compiler and ninja are needed): {error}"
            )
        # Blocks of any height are blocks of the tallest kernel height that divides it.
        height = next(h for h in _ROW_BLOCK_HEIGHTS if block[0] % h == 0)
        return cls((height, int(block[1])))

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """BSR with int32 indices where they fit: the kernel reads one per block, and at
        one token and 1x1 blocks int64 ones are more bytes than a 16-bit weight's value."""
        with _quiet_beta():
            packed = weight.detach().contiguous().to_sparse_bsr(self.blocksize)
            if packed.values().shape[0] > torch.iinfo(torch.int32).max:
                return packed
            return torch.sparse_bsr_tensor(
                packed.crow_indices().int(), packed.col_indices().int(), packed.values(),
                packed.shape, check_invariants=False,  # torch's own, narrowed
            )

    def linear(self, x2d: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        # (out, tokens) transposed back: a view, which the next row-block layer (after an
        # elementwise activation, which keeps the strides) reads without a copy.
        return native.row_block_linear_t(x2d.T, packed, bias).T

    def describe(self) -> str:
        return f"row_blocks{self.blocksize[0]}x{self.blocksize[1]}"


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every run of 4 along each row (the 2:4 pattern)."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.detach() != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


@register_layout
class SemiStructuredLayout(Layout):
    """2:4 semi-structured sparsity on CUDA tensor cores (``to_sparse_semi_structured``)."""

    name = "semi_structured"

    @classmethod
    def fit(cls, weight: torch.Tensor, where: str, blocksize: tuple[int, int] | None) -> Layout:
        check_float_weight(weight, where)
        if weight.device.type != "cuda":
            raise ConfigError(
                f"{where}: layout 'semi_structured' needs a CUDA weight; got device "
                f"{weight.device} (move the model to CUDA, or use 'csr'/'bsr' on the CPU)"
            )
        if not is_two_four(weight):
            raise ConfigError(
                f"{where}: layout 'semi_structured' needs a 2:4 weight (at most 2 nonzeros in "
                f"every 4 along a row, width % 4 == 0); weight {tuple(weight.shape)} is not"
            )
        return cls()

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(weight.detach().contiguous())

    def to_state(self, packed: Tensor) -> Tensor:
        return packed.to_dense()  # a tensor subclass; the dense form re-packs on load

    def linear(self, x2d: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x2d, packed, bias)
