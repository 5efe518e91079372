"""prunekit's own CPU kernel (``kernels/row_blocks.cpp``), built on first use.

The kernel is compiled for the machine it runs on (``-march=native``) by
``torch.utils.cpp_extension`` and cached by torch (``TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``): the first use takes seconds, later processes load the
cached build. It needs a C++ compiler and ninja; without them ``row_block_kernel_error``
says why and the ``row_blocks`` layout is refused (``to_sparse(layout="auto")`` skips it).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["row_block_kernel_error", "row_block_linear_t"]

_SOURCE = Path(__file__).with_name("kernels") / "row_blocks.cpp"
# What a failed build raises: no ninja or a compiler error (torch wraps it in a
# RuntimeError), no compiler at all (OSError), a build that does not load (ImportError).
_BUILD_ERRORS = (RuntimeError, OSError, ImportError)


@functools.cache
def row_block_kernel_error() -> str | None:
    """``None`` once the kernel is built and registered as ``torch.ops.prunekit``, else
    the reason it could not be (first line of the build error). Tried once per process."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name="prunekit_row_blocks",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch has already loaded
            is_python_module=False,
            verbose=False,
        )
    except _BUILD_ERRORS as exc:
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0] if first else 'no message'}"

    @torch.library.register_fake("prunekit::row_block_linear_t")
    def _(xT, crow, col, values, bias):
        return xT.new_empty(((crow.shape[0] - 1) * values.shape[1], xT.shape[1]))

    torch.library.register_autograd(
        "prunekit::row_block_linear_t", _backward, setup_context=_setup_context
    )
    return None


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x_t, crow, col, values, bias = inputs
    ctx.save_for_backward(x_t, crow, col, values)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients for ``x_t``, the blocks' values and the bias, so a deployed layer inside
    a model being differentiated (input attributions, adapters trained around it) passes
    true gradients on rather than none. Dense products: backward is not the fast path."""
    x_t, crow, col, values = ctx.saved_tensors
    height, width = values.shape[1:]
    grid = (crow.numel() - 1, x_t.shape[0] // width)  # blocks down, blocks across
    rows, cols = grid[0] * height, grid[1] * width
    # The block row of every block; output_size keeps it traceable (torch.compile).
    block_rows = torch.repeat_interleave(torch.arange(grid[0], device=crow.device),
                                         crow.diff().long(), output_size=col.numel())
    at = (block_rows, col.long())
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        blocks = grad.new_zeros(*grid, height, width)
        blocks[at] = values.to(grad.dtype)
        grad_x = blocks.transpose(1, 2).reshape(rows, cols).T @ grad
    if ctx.needs_input_grad[3]:
        full = grad @ x_t.T.to(grad.dtype)
        grad_values = full.reshape(grid[0], height, grid[1], width).transpose(1, 2)[at]
        grad_values = grad_values.to(values.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.sum(1).to(ctx.bias_dtype)
    return grad_x, None, None, grad_values, grad_bias


def row_block_linear_t(
    x_t: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``W @ x_t (+ bias[:, None])`` for ``packed``, a BSR tensor with blocks of 1, 2, 4,
    8 or 16 rows (any width), and ``x_t`` of shape ``(in, tokens)``; returns
    ``(out, tokens)``."""
    error = row_block_kernel_error()
    if error is not None:
        raise RuntimeError(f"prunekit's row-block kernel is not available here: {error}")
    return torch.ops.prunekit.row_block_linear_t(
        x_t, packed.crow_indices(), packed.col_indices(), packed.values(), bias
    )
