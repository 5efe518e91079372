// prunekit's CPU kernel for weights stored as rows of 1 x c blocks (BSR with blocksize
// (1, c)). Torch's CPU BSR matmul (MKL) takes square blocks only, and MKL's CSR kernel
// reads one index per nonzero; this one reads one index per block and keeps each output
// row's accumulators in registers while it walks the row's blocks, with the activations
// transposed (features x tokens) so every weight multiplies a contiguous run of tokens.
// bfloat16 and float16 weights (which torch's CPU sparse kernels refuse) are read as
// they are stored, half the bytes of float32, and multiplied in float32: the activations
// are widened once per call and every row accumulates in float32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

// Tokens per accumulator tile: 64 floats are 8 AVX2 (4 AVX-512) registers.
constexpr int64_t kTile = 64;

// index_t: int32 (what prunekit packs: 4 bytes per block less to read than int64) or int64.
template <typename index_t>
struct RowBlocks {
  const index_t* crow;  // (rows + 1) offsets into col and val, per output row
  const index_t* col;   // block column of each block (in units of width)
  int64_t width;        // c, the block's width along the input features
};

// yT[r, t0:t0+n] = bias[r] + sum over the blocks of row r of val[b] . xT[block rows, t0:t0+n];
// n is kTile (a compile-time trip count the compiler unrolls into registers) or the rest.
// scalar_t is the stored type of the weights and the output, acc_t (float for the 16-bit
// types) that of the activations, the bias and the sums.
template <typename scalar_t, typename acc_t, int64_t Fixed, typename index_t>
void tile_rows(const RowBlocks<index_t>& w, const scalar_t* val, const acc_t* bias, const acc_t* xT,
               int64_t tokens, int64_t t0, int64_t rest, scalar_t* yT, int64_t r0, int64_t r1) {
  const int64_t n = Fixed > 0 ? Fixed : rest;
  for (int64_t r = r0; r < r1; ++r) {
    acc_t acc[kTile];
    const acc_t start = bias ? bias[r] : acc_t(0);
    for (int64_t t = 0; t < n; ++t) acc[t] = start;
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      const scalar_t* wb = val + b * w.width;
      const acc_t* xb = xT + int64_t(w.col[b]) * w.width * tokens + t0;
      for (int64_t k = 0; k < w.width; ++k) {
        const acc_t wk = static_cast<acc_t>(wb[k]);
        const acc_t* xk = xb + k * tokens;
        for (int64_t t = 0; t < n; ++t) acc[t] += wk * xk[t];
      }
    }
    scalar_t* y = yT + r * tokens + t0;
    for (int64_t t = 0; t < n; ++t) y[t] = static_cast<scalar_t>(acc[t]);
  }
}

// One token: each row is a sparse dot product over contiguous runs of x. Blocks of one
// (unstructured weights) gather x by index, in SIMD lanes (AVX-512 and AVX2 gathers).
template <typename scalar_t, typename acc_t, typename index_t>
void vector_rows(const RowBlocks<index_t>& w, const scalar_t* val, const acc_t* bias, const acc_t* x,
                 scalar_t* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    acc_t acc = bias ? bias[r] : acc_t(0);
    if (w.width == 1) {
#pragma omp simd reduction(+ : acc)
      for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b)
        acc += static_cast<acc_t>(val[b]) * x[w.col[b]];
    } else {
      for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
        const scalar_t* wb = val + b * w.width;
        const acc_t* xb = x + int64_t(w.col[b]) * w.width;
        for (int64_t k = 0; k < w.width; ++k) acc += static_cast<acc_t>(wb[k]) * xb[k];
      }
    }
    y[r] = static_cast<scalar_t>(acc);
  }
}

// out (rows, tokens) = W @ x + b[:, None], rows split across threads.
template <typename scalar_t, typename acc_t, typename index_t>
void multiply(const RowBlocks<index_t>& w, const acc_t* x, const scalar_t* val, const acc_t* bias,
              int64_t rows, int64_t tokens, scalar_t* out) {
  // Enough rows per task that a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, 256 / tokens);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (tokens == 1) {
      vector_rows<scalar_t, acc_t>(w, val, bias, x, out, r0, r1);
      return;
    }
    int64_t t0 = 0;
    for (; t0 + kTile <= tokens; t0 += kTile)
      tile_rows<scalar_t, acc_t, kTile>(w, val, bias, x, tokens, t0, 0, out, r0, r1);
    // Fixed-size tiles for the common remainders, then whatever is left.
    if (t0 + kTile / 2 <= tokens) {
      tile_rows<scalar_t, acc_t, kTile / 2>(w, val, bias, x, tokens, t0, 0, out, r0, r1);
      t0 += kTile / 2;
    }
    if (t0 + kTile / 4 <= tokens) {
      tile_rows<scalar_t, acc_t, kTile / 4>(w, val, bias, x, tokens, t0, 0, out, r0, r1);
      t0 += kTile / 4;
    }
    if (t0 < tokens)
      tile_rows<scalar_t, acc_t, 0>(w, val, bias, x, tokens, t0, tokens - t0, out, r0, r1);
  });
}

// (W @ xT + bias[:, None]) for W given as 1 x c blocks: xT (in, tokens) -> (out, tokens).
at::Tensor row_block_linear_t(const at::Tensor& xT, const at::Tensor& crow,
                              const at::Tensor& col, const at::Tensor& values,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(xT.device().is_cpu(), "row_block_linear_t: CPU tensors only, got ", xT.device());
  TORCH_CHECK(xT.dim() == 2, "row_block_linear_t: xT must be 2-D (in, tokens), got ",
              xT.sizes());
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, "row_block_linear_t: bad crow indices");
  TORCH_CHECK(crow.scalar_type() == col.scalar_type() &&
                  (crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong),
              "row_block_linear_t: indices must be both int32 or both int64, got ",
              crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(values.dim() >= 1 && values.scalar_type() == xT.scalar_type(),
              "row_block_linear_t: values must have the input's dtype ", xT.scalar_type());
  const int64_t rows = crow.numel() - 1;
  const int64_t width = values.dim() > 1 ? values.size(-1) : 1;
  TORCH_CHECK(col.numel() * width == values.numel(),
              "row_block_linear_t: ", col.numel(), " blocks but ", values.numel(), " values");
  TORCH_CHECK(!bias.has_value() || bias->numel() == rows,
              "row_block_linear_t: bias has ", bias.has_value() ? bias->numel() : 0,
              " entries for ", rows, " rows");
  const auto c = crow.contiguous();
  const auto k = col.contiguous();
  const auto v = values.contiguous();
  const int64_t tokens = xT.size(1);
  auto out = at::empty({rows, tokens}, xT.options());
  if (rows == 0 || tokens == 0) return out;
  AT_DISPATCH_INDEX_TYPES(c.scalar_type(), "row_block_linear_t", [&] {
    const RowBlocks<index_t> w{c.data_ptr<index_t>(), k.data_ptr<index_t>(), width};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xT.scalar_type(),
                                    "row_block_linear_t", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
      // One copy at most: widened (16-bit) and made contiguous (a transposed view) at once.
      const auto x = xT.scalar_type() == acc_type && xT.is_contiguous()
                         ? xT
                         : at::empty(xT.sizes(), xT.options().dtype(acc_type)).copy_(xT);
      const auto b = bias.has_value() ? bias->to(acc_type).contiguous() : at::Tensor();
      multiply<scalar_t, acc_t>(w, x.data_ptr<acc_t>(), v.data_ptr<scalar_t>(),
                                b.defined() ? b.data_ptr<acc_t>() : nullptr, rows, tokens,
                                out.data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(prunekit, m) {
  m.def("row_block_linear_t(Tensor xT, Tensor crow, Tensor col, Tensor values, Tensor? bias)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(prunekit, CPU, m) { m.impl("row_block_linear_t", row_block_linear_t); }
