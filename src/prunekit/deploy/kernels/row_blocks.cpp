// prunekit's CPU kernel for weights stored as BSR with blocks of h x c (h rows, c input
// features): 1 x c row blocks, which torch's CPU BSR matmul (MKL, square blocks only)
// refuses, and h x c blocks, whose rows share their column indices. It reads one index
// per block, keeps a group of up to 8 output rows' accumulators in registers while it
// walks their blocks, so each activation it loads is multiplied into every row of the
// group, and reads the activations transposed (features x tokens) so every weight
// multiplies a contiguous run of tokens. bfloat16 and float16 weights (which torch's CPU
// sparse kernels refuse) are read as they are stored, half the bytes of float32, and
// multiplied in float32: every row accumulates in float32, and the activations are
// widened once per call (contiguous bfloat16 ones, in blocks with rows, as they are
// loaded).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

// Accumulators per row group and tile: 256 floats are 16 AVX-512 registers (of 32), so a
// group of G rows takes tiles of 256 / G tokens (64 at most), the rest in halving tiles.
constexpr int64_t kAccumulators = 256;
constexpr int64_t kTile = 64;
constexpr int64_t kMaxGroup = 8;
constexpr int64_t kLanes = 16;  // float32 lanes of an AVX-512 register

// A stored weight in float32 (acc_t), in a loop vectorised over the weights. float16 is
// widened from its bits: c10::Half's own conversion is one scalar instruction per value
// (_cvtsh_ss), which keeps such a loop from being vectorised; these integer selects
// vectorise, and give what the hardware conversion gives for all 65536 values. (In
// scalar loops the one instruction is the cheaper: there the cast stays.)
inline float widen(c10::Half value) {
  const uint32_t h = value.x, em = h & 0x7fffu;  // em: exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;  // exponent rebiased, 15 -> 127
  const uint32_t tiny = __builtin_bit_cast(uint32_t, static_cast<float>(em) * 0x1p-24f);
  const uint32_t special = (em << 13) | 0x7f800000u | (uint32_t(em > 0x7c00u) << 22);  // inf, quiet nan
  const uint32_t is_tiny = 0u - uint32_t(em < 0x0400u), is_special = 0u - uint32_t(em >= 0x7c00u);
  uint32_t r = (tiny & is_tiny) | (normal & ~is_tiny);
  r = (special & is_special) | (r & ~is_special);
  return __builtin_bit_cast(float, r | ((h & 0x8000u) << 16));
}

// Rows summed together for blocks of H rows. The height is a compile-time constant, so
// one-row blocks (unstructured, 1 x c) compile to loops with no row group at all.
template <int64_t H>
constexpr int64_t kGroup = std::min(H, kMaxGroup);

// index_t: int32 (what prunekit packs: 4 bytes per block less to read than int64) or int64.
template <typename index_t>
struct BlockRows {
  const index_t* crow;  // (block rows + 1) offsets into col and val, per block row
  const index_t* col;   // block column of each block (in units of width)
  int64_t width;        // c, the block's width along the input features
};

// Rows g0..g0+G of block row R (blocks of H rows), tokens t0..t0+N (N a compile-time
// trip count the compiler unrolls into registers): yT[r, t] = bias[r] + the sum over
// the blocks of R of val[b, r] . xT[block's features, t]. scalar_t is the stored type of
// the weights and the output, acc_t (float for the 16-bit types) that of the bias and
// the sums, x_t that of the activations (acc_t, or bfloat16 kept as it came).
// Not inlined: compiled on its own, the tile's code does not change with the callers
// around it (inlined, the same loops ran 10-30% slower on one-row blocks).
template <typename scalar_t, typename acc_t, int64_t N, int64_t H, typename x_t,
          typename index_t>
__attribute__((noinline)) void tile_group(const BlockRows<index_t>& w, const scalar_t* val, const acc_t* bias,
                const x_t* xT, int64_t tokens, int64_t t0, scalar_t* yT, int64_t R,
                int64_t g0) {
  constexpr int64_t G = kGroup<H>;
  const int64_t c = w.width, r0 = R * H + g0;
  acc_t acc[G][N];
  for (int64_t i = 0; i < G; ++i) {
    const acc_t start = bias ? bias[r0 + i] : acc_t(0);
    for (int64_t t = 0; t < N; ++t) acc[i][t] = start;
  }
  for (int64_t b = w.crow[R]; b < w.crow[R + 1]; ++b) {
    const scalar_t* wb = val + (b * H + g0) * c;
    const x_t* xb = xT + int64_t(w.col[b]) * c * tokens + t0;
    for (int64_t k = 0; k < c; ++k) {
      acc_t wk[G];
      for (int64_t i = 0; i < G; ++i) wk[i] = static_cast<acc_t>(wb[i * c + k]);
      const x_t* xk = xb + k * tokens;
      // simd: vectorise over the tokens, which keeps the tile in registers (left to
      // itself, GCC may vectorise over the blocks instead, up to 3x slower).
      for (int64_t i = 0; i < G; ++i)
#pragma omp simd
        for (int64_t t = 0; t < N; ++t) acc[i][t] += wk[i] * static_cast<acc_t>(xk[t]);
    }
  }
  for (int64_t i = 0; i < G; ++i) {
    scalar_t* y = yT + (r0 + i) * tokens + t0;
    for (int64_t t = 0; t < N; ++t) y[t] = static_cast<scalar_t>(acc[i][t]);
  }
}

// Every row group of block rows R0..R1 on tokens t0..t0+N.
template <typename scalar_t, typename acc_t, int64_t N, int64_t H, typename x_t,
          typename index_t>
void tile_rows(const BlockRows<index_t>& w, const scalar_t* val, const acc_t* bias,
               const x_t* xT, int64_t tokens, int64_t t0, scalar_t* yT, int64_t R0,
               int64_t R1) {
  for (int64_t R = R0; R < R1; ++R)
    for (int64_t g0 = 0; g0 < H; g0 += kGroup<H>)
      tile_group<scalar_t, acc_t, N, H>(w, val, bias, xT, tokens, t0, yT, R, g0);
}

// The tokens left after the full tiles (fewer than 2N): one tile each of N, N/2, ..., 1
// where it fits. Every tile has a compile-time length: a loop of run-time length over a
// few tokens runs several times slower (measured at 2-13 tokens, as experts get).
template <typename scalar_t, typename acc_t, int64_t N, int64_t H, typename x_t,
          typename index_t>
void remainder_tiles(const BlockRows<index_t>& w, const scalar_t* val, const acc_t* bias,
                     const x_t* xT, int64_t tokens, int64_t t0, scalar_t* yT, int64_t R0,
                     int64_t R1) {
  if (t0 + N <= tokens) {
    tile_rows<scalar_t, acc_t, N, H>(w, val, bias, xT, tokens, t0, yT, R0, R1);
    t0 += N;
  }
  if constexpr (N > 1)
    remainder_tiles<scalar_t, acc_t, N / 2, H>(w, val, bias, xT, tokens, t0, yT, R0, R1);
}

// One token, blocks of one row: one scalar sum per row, which the compiler keeps in a
// register. Blocks of one (unstructured weights) gather x by index, in SIMD lanes
// (AVX-512 and AVX2 gathers).
template <typename scalar_t, typename acc_t, typename index_t>
acc_t dot_row(const BlockRows<index_t>& w, const scalar_t* val, const acc_t* x, int64_t R) {
  const int64_t c = w.width;
  acc_t acc = 0;
  if (c == 1) {
#pragma omp simd reduction(+ : acc)
    for (int64_t b = w.crow[R]; b < w.crow[R + 1]; ++b)
      acc += static_cast<acc_t>(val[b]) * x[w.col[b]];
    return acc;
  }
  for (int64_t b = w.crow[R]; b < w.crow[R + 1]; ++b) {
    const scalar_t* wb = val + b * c;
    const acc_t* xb = x + int64_t(w.col[b]) * c;
    for (int64_t k = 0; k < c; ++k) acc += static_cast<acc_t>(wb[k]) * xb[k];
  }
  return acc;
}

// One token, rows g0..g0+G of block row R: each block's run of x is read once for the
// G rows. Narrow blocks (c < 8) keep one scalar sum per row; wide ones keep a vector of
// partial sums per row (one FMA per 16 weights), added up once at the end of the row.
template <typename scalar_t, typename acc_t, int64_t H, typename index_t>
void dot_group(const BlockRows<index_t>& w, const scalar_t* val, const acc_t* x, int64_t R,
               int64_t g0, acc_t* sums) {
  constexpr int64_t G = kGroup<H>;
  const int64_t c = w.width;
  if (c < kLanes / 2) {
    for (int64_t b = w.crow[R]; b < w.crow[R + 1]; ++b) {
      const scalar_t* wb = val + (b * H + g0) * c;
      const acc_t* xb = x + int64_t(w.col[b]) * c;
      for (int64_t i = 0; i < G; ++i)
        for (int64_t k = 0; k < c; ++k) sums[i] += static_cast<acc_t>(wb[i * c + k]) * xb[k];
    }
    return;
  }
  acc_t part[G][kLanes] = {};
  for (int64_t b = w.crow[R]; b < w.crow[R + 1]; ++b) {
    const scalar_t* wb = val + (b * H + g0) * c;
    const acc_t* xb = x + int64_t(w.col[b]) * c;
    for (int64_t k0 = 0; k0 < c; k0 += kLanes) {
      const int64_t m = std::min(kLanes, c - k0);
      for (int64_t i = 0; i < G; ++i) {
        if constexpr (std::is_same_v<scalar_t, c10::Half>) {
#pragma omp simd
          for (int64_t k = 0; k < m; ++k) part[i][k] += widen(wb[i * c + k0 + k]) * xb[k0 + k];
        } else {  // the cast, exactly: any wrapper around it cost float32 here 7-14%
#pragma omp simd
          for (int64_t k = 0; k < m; ++k)
            part[i][k] += static_cast<acc_t>(wb[i * c + k0 + k]) * xb[k0 + k];
        }
      }
    }
  }
  for (int64_t i = 0; i < G; ++i)
    for (int64_t k = 0; k < kLanes; ++k) sums[i] += part[i][k];
}

// One token: y = W @ x + bias for block rows R0..R1.
template <typename scalar_t, typename acc_t, int64_t H, typename index_t>
void vector_rows(const BlockRows<index_t>& w, const scalar_t* val, const acc_t* bias,
                 const acc_t* x, scalar_t* y, int64_t R0, int64_t R1) {
  constexpr int64_t G = kGroup<H>;
  for (int64_t R = R0; R < R1; ++R) {
    for (int64_t g0 = 0; g0 < H; g0 += G) {
      const int64_t r0 = R * H + g0;
      acc_t sums[G];
      for (int64_t i = 0; i < G; ++i) sums[i] = bias ? bias[r0 + i] : acc_t(0);
      if constexpr (H == 1)
        sums[0] += dot_row<scalar_t, acc_t>(w, val, x, R);
      else
        dot_group<scalar_t, acc_t, H>(w, val, x, R, g0, sums);
      for (int64_t i = 0; i < G; ++i) y[r0 + i] = static_cast<scalar_t>(sums[i]);
    }
  }
}

// out (rows, tokens) = W @ x + b[:, None] for blocks of H rows, block rows split across
// threads. One token takes x in acc_t; more take it in x_t.
template <typename scalar_t, typename acc_t, int64_t H, typename x_t, typename index_t>
void multiply(const BlockRows<index_t>& w, const x_t* x, const scalar_t* val,
              const acc_t* bias, int64_t block_rows, int64_t tokens, scalar_t* out) {
  constexpr int64_t N = std::min(kTile, kAccumulators / kGroup<H>);
  // Enough rows per task that a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, 256 / (tokens * H));
  at::parallel_for(0, block_rows, grain, [&](int64_t R0, int64_t R1) {
    if constexpr (std::is_same_v<x_t, acc_t>) {
      if (tokens == 1) {
        vector_rows<scalar_t, acc_t, H>(w, val, bias, x, out, R0, R1);
        return;
      }
    }
    int64_t t0 = 0;
    for (; t0 + N <= tokens; t0 += N)
      tile_rows<scalar_t, acc_t, N, H>(w, val, bias, x, tokens, t0, out, R0, R1);
    remainder_tiles<scalar_t, acc_t, N / 2, H>(w, val, bias, x, tokens, t0, out, R0, R1);
  });
}

// xT (features, tokens) contiguous: itself where it is so. The transposed view of a
// contiguous (tokens, features) input, which every layer reading a plain activation
// gets, is copied in blocks whose reads and writes stay in cache (torch's copy_ of such a
// view ran 10x slower than a clone: at 32 tokens, as long as the sparse product itself;
// 1.1-1.7x for the whole float32 layer in an A/B); other strides go through copy_.
template <typename scalar_t>
__attribute__((noinline)) at::Tensor transposed_copy(const at::Tensor& xT) {
  if (xT.is_contiguous()) return xT;
  at::Tensor out = at::empty_like(xT, at::MemoryFormat::Contiguous);
  const int64_t features = xT.size(0), tokens = xT.size(1), pitch = xT.stride(1);
  if (xT.stride(0) != 1 || pitch < features) return out.copy_(xT);
  const scalar_t* src = xT.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  // 8 tokens at a time: their rows lie a multiple of 4 KB apart for widths such as 3072
  // and share one set of the 8-way L1, so 32 of them (torch's copy, or 32 x 32 blocks)
  // evict each other before the next 15 features of each line are read.
  constexpr int64_t kTokens = 8, kFeatures = 64;
  const int64_t blocks = (features + kFeatures - 1) / kFeatures;
  const int64_t grain = std::max<int64_t>(1, 16384 / (kFeatures * tokens));  // 64 KB a task
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t f_end = std::min(features, b1 * kFeatures);
    for (int64_t f0 = b0 * kFeatures; f0 < f_end; f0 += kFeatures) {
      const int64_t f1 = std::min(f_end, f0 + kFeatures);
      for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
        const int64_t t1 = std::min(tokens, t0 + kTokens);
        for (int64_t f = f0; f < f1; ++f)
          for (int64_t t = t0; t < t1; ++t)
            dst[f * tokens + t] = src[t * pitch + f];
      }
    }
  });
  return out;
}

// (W @ xT + bias[:, None]) for W given as h x c blocks: xT (in, tokens) -> (out, tokens).
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
  TORCH_CHECK(values.dim() == 3 && values.scalar_type() == xT.scalar_type(),
              "row_block_linear_t: values must be (blocks, h, c) of the input's dtype ",
              xT.scalar_type(), ", got ", values.sizes(), " of ", values.scalar_type());
  TORCH_CHECK(values.size(1) >= 1 && values.size(2) >= 1 && col.numel() == values.size(0),
              "row_block_linear_t: ", col.numel(), " blocks but values of shape ",
              values.sizes());
  const int64_t height = values.size(1), width = values.size(2);
  TORCH_CHECK(height == 1 || height == 2 || height == 4 || height == 8 || height == 16,
              "row_block_linear_t: blocks of ", height, " rows; the kernel takes 1, 2, 4, 8 "
              "or 16");
  const int64_t block_rows = crow.numel() - 1, rows = block_rows * height;
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
    const BlockRows<index_t> w{c.data_ptr<index_t>(), k.data_ptr<index_t>(), width};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xT.scalar_type(),
                                    "row_block_linear_t", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
      // Contiguous bfloat16 activations (what a row-block layer passes the next) stay
      // bfloat16 in the tiles of blocks with rows (h > 1) from 32 tokens: half the bytes
      // each tile reads, widened by a shift as loaded, once for the group's rows (1.0-1.5x
      // in an A/B). The others are widened once, here: transposed views (they need a copy
      // anyway, and torch's bfloat16 transposing one ran slower than its widening one),
      // one-row blocks (one row per load: the shift cost 5-15%), few tokens (the shift is
      // scalar there), float16 (its widening is no shift) and one token (gathered).
      constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
      const bool narrow = kBf16 && xT.is_contiguous() && tokens >= 32 && height > 1;
      at::Tensor x;
      if constexpr (std::is_same_v<scalar_t, acc_t>)
        x = transposed_copy<scalar_t>(xT);
      else  // one copy at most: widened and made contiguous (a transposed view) at once
        x = narrow || (xT.scalar_type() == acc_type && xT.is_contiguous())
                ? xT
                : at::empty(xT.sizes(), xT.options().dtype(acc_type)).copy_(xT);
      const auto b = bias.has_value() ? bias->to(acc_type).contiguous() : at::Tensor();
      const auto run = [&](auto rows) {
        constexpr int64_t H = decltype(rows)::value;
        const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
        if constexpr (kBf16) {
          if (narrow) {
            multiply<scalar_t, acc_t, H>(w, x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bp,
                                         block_rows, tokens, out.data_ptr<scalar_t>());
            return;
          }
        }
        multiply<scalar_t, acc_t, H>(w, x.data_ptr<acc_t>(), v.data_ptr<scalar_t>(), bp,
                                     block_rows, tokens, out.data_ptr<scalar_t>());
      };
      switch (height) {
        case 1: run(std::integral_constant<int64_t, 1>()); break;
        case 2: run(std::integral_constant<int64_t, 2>()); break;
        case 4: run(std::integral_constant<int64_t, 4>()); break;
        case 8: run(std::integral_constant<int64_t, 8>()); break;
        default: run(std::integral_constant<int64_t, 16>());
      }
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
