// prunekit's CPU kernel for weights stored as rows of 1 x c blocks (BSR with blocksize
// (1, c)). Torch's CPU BSR matmul (MKL) takes square blocks only, and MKL's CSR kernel
// reads one index per nonzero; this one reads one index per block and keeps each output
// row's accumulators in registers while it walks the row's blocks, with the activations
// transposed (features x tokens) so every weight multiplies a contiguous run of tokens.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

// Tokens per accumulator tile: 64 floats are 8 AVX2 (4 AVX-512) registers.
constexpr int64_t kTile = 64;

struct RowBlocks {
  const int64_t* crow;  // (rows + 1) offsets into col and val, per output row
  const int64_t* col;   // block column of each block (in units of width)
  int64_t width;        // c, the block's width along the input features
};

// yT[r, t0:t0+n] = bias[r] + sum over the blocks of row r of val[b] . xT[block rows, t0:t0+n];
// n is kTile (a compile-time trip count the compiler unrolls into registers) or the rest.
template <typename scalar_t, int64_t Fixed>
void tile_rows(const RowBlocks& w, const scalar_t* val, const scalar_t* bias,
               const scalar_t* xT, int64_t tokens, int64_t t0, int64_t rest, scalar_t* yT,
               int64_t r0, int64_t r1) {
  const int64_t n = Fixed > 0 ? Fixed : rest;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t acc[kTile];
    const scalar_t start = bias ? bias[r] : scalar_t(0);
    for (int64_t t = 0; t < n; ++t) acc[t] = start;
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      const scalar_t* wb = val + b * w.width;
      const scalar_t* xb = xT + w.col[b] * w.width * tokens + t0;
      for (int64_t k = 0; k < w.width; ++k) {
        const scalar_t wk = wb[k];
        const scalar_t* xk = xb + k * tokens;
        for (int64_t t = 0; t < n; ++t) acc[t] += wk * xk[t];
      }
    }
    scalar_t* y = yT + r * tokens + t0;
    for (int64_t t = 0; t < n; ++t) y[t] = acc[t];
  }
}

// One token: each row is a sparse dot product over contiguous runs of x.
template <typename scalar_t>
void vector_rows(const RowBlocks& w, const scalar_t* val, const scalar_t* bias,
                 const scalar_t* x, scalar_t* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t acc = bias ? bias[r] : scalar_t(0);
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      const scalar_t* wb = val + b * w.width;
      const scalar_t* xb = x + w.col[b] * w.width;
      for (int64_t k = 0; k < w.width; ++k) acc += wb[k] * xb[k];
    }
    y[r] = acc;
  }
}

// (W @ xT + bias[:, None]) for W given as 1 x c blocks: xT (in, tokens) -> (out, tokens).
at::Tensor row_block_linear_t(const at::Tensor& xT, const at::Tensor& crow,
                              const at::Tensor& col, const at::Tensor& values,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(xT.device().is_cpu(), "row_block_linear_t: CPU tensors only, got ", xT.device());
  TORCH_CHECK(xT.dim() == 2, "row_block_linear_t: xT must be 2-D (in, tokens), got ",
              xT.sizes());
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, "row_block_linear_t: bad crow indices");
  TORCH_CHECK(values.dim() >= 1 && values.scalar_type() == xT.scalar_type(),
              "row_block_linear_t: values must have the input's dtype ", xT.scalar_type());
  const int64_t rows = crow.numel() - 1;
  const int64_t width = values.dim() > 1 ? values.size(-1) : 1;
  TORCH_CHECK(col.numel() * width == values.numel(),
              "row_block_linear_t: ", col.numel(), " blocks but ", values.numel(), " values");
  TORCH_CHECK(!bias.has_value() || bias->numel() == rows,
              "row_block_linear_t: bias has ", bias.has_value() ? bias->numel() : 0,
              " entries for ", rows, " rows");
  const auto x = xT.contiguous();
  const auto c = crow.to(at::kLong).contiguous();
  const auto k = col.to(at::kLong).contiguous();
  const auto v = values.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(xT.scalar_type()).contiguous() : at::Tensor();
  const int64_t tokens = x.size(1);
  auto out = at::empty({rows, tokens}, x.options());
  if (rows == 0 || tokens == 0) return out;
  const RowBlocks w{c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), width};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_block_linear_t", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.data_ptr<scalar_t>();
    // Enough rows per task that a thread's share outweighs waking it.
    const int64_t grain = std::max<int64_t>(1, 256 / tokens);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      if (tokens == 1) {
        vector_rows<scalar_t>(w, vp, bp, xp, yp, r0, r1);
        return;
      }
      int64_t t0 = 0;
      for (; t0 + kTile <= tokens; t0 += kTile)
        tile_rows<scalar_t, kTile>(w, vp, bp, xp, tokens, t0, 0, yp, r0, r1);
      // Fixed-size tiles for the common remainders, then whatever is left.
      if (t0 + kTile / 2 <= tokens) {
        tile_rows<scalar_t, kTile / 2>(w, vp, bp, xp, tokens, t0, 0, yp, r0, r1);
        t0 += kTile / 2;
      }
      if (t0 + kTile / 4 <= tokens) {
        tile_rows<scalar_t, kTile / 4>(w, vp, bp, xp, tokens, t0, 0, yp, r0, r1);
        t0 += kTile / 4;
      }
      if (t0 < tokens)
        tile_rows<scalar_t, 0>(w, vp, bp, xp, tokens, t0, tokens - t0, yp, r0, r1);
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
