// Float32 weight x float32 rows for the few rows of a decode step (f32_linear), for x86 CPUs with AVX2 and FMA.
//
// Why: batch-invariant decoding (lmforge/model/invariant.py) needs each row's product to be the same whatever
// other rows share the call. A BLAS picks its kernel, and so each output's summation order, by the call's shape,
// so lmforge ran its float linears in padded blocks of a fixed row count: a one-row step then paid for an 8-row
// GEMM, which torch runs far below the memory bandwidth that a one-row product is bound by. Here every output
// y[m][n] = sum_k x[m][k] * w[n][k] is one 8-lane FMA accumulator over k in steps of 8, then hsum, then the
// scalar tail: the same operations in the same order for any number of rows and any tile, so the product is
// batch-invariant by construction, and the weights stream once per call for all rows (a tile of weight rows
// against one or two rows of x at a time, blocks of tiles kept in L2 across the rows).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "avx2_common.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// RT weight rows (stride K) against MT rows of x (stride K): y[m * ystride + r]. RT * MT independent
// accumulators hide the FMA latency; each x vector is loaded once for the RT rows, each weight vector once for
// the MT rows. One accumulator per output, whatever RT and MT: the numbers do not depend on the tile shape.
// fetch: the first pass over these weight rows (from memory), which prefetches the rows 4 tiles ahead, once per
// 64-byte line; later passes (more rows of x) find them in L2 and skip the prefetches, which take load slots.
template <int RT, int MT>
inline void f32_tile(const float* w, const float* x, int64_t K, float* y, int64_t ystride, bool fetch) {
  __m256 acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    const bool line = fetch && (k & 15) == 0;
    for (int r = 0; r < RT; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
      // the same column 4 tiles ahead (tiles are consecutive rows), as the int kernels do; never faults
      if (line) _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * RT) * K + k), _MM_HINT_T0);
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t t = k; t < K; ++t) s += w[r * K + t] * x[m * K + t];  // (built with -ffp-contract=off)
      y[m * ystride + r] = s;
    }
}

// Tile shapes: one row of x (a decode step): 8 weight rows (10 of the 16 vector registers); more rows: 4 x 2.
template <int RT, int MT>
void tiles(const float* W, const float* X, float* Y, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t L2_BYTES = 192 << 10;  // weight bytes run against every row of x before the next ones
  const int64_t nt = (N + RT - 1) / RT;
  const int64_t grain = std::max<int64_t>(4, nt / (8 * std::max(1, at::get_num_threads())));
  const int64_t block = std::max<int64_t>(1, L2_BYTES / (RT * K * 4));
  at::parallel_for(0, nt, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t s = t0; s < t1; s += block) {
      const int64_t e = std::min(t1, s + block);
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const bool pair = MT == 2 && m0 + 1 < M;
        for (int64_t t = s; t < e; ++t) {
          const int64_t n = t * RT, rows = std::min<int64_t>(RT, N - n);
          const float* w = W + n * K;
          const float* x = X + m0 * K;
          float* y = Y + m0 * N + n;
          const bool fetch = m0 == 0;
          if (rows == RT) {
            if (pair) f32_tile<RT, MT>(w, x, K, y, N, fetch);
            else f32_tile<RT, 1>(w, x, K, y, N, fetch);
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              if (pair) f32_tile<1, MT>(w + r * K, x, K, y + r, N, fetch);
              else f32_tile<1, 1>(w + r * K, x, K, y + r, N, fetch);
            }
          }
        }
      }
    }
  });
}

// x (..., K) float32 times w (N, K) float32 -> (..., N): F.linear without bias, each output as above.
at::Tensor f32_linear(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 1,
              "f32_linear: x must be a float32 CPU tensor");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "f32_linear: the weight must be a contiguous float32 (N, K) CPU tensor");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x_in.size(-1) == K, "f32_linear: x has ", x_in.size(-1), " columns, the weight ", K);
  const at::Tensor x = x_in.contiguous().view({-1, K});
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    if (M == 1) tiles<8, 1>(w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
    else tiles<4, 2>(w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  }
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
  shape.push_back(N);
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) { m.def("f32_linear(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("f32_linear", &f32_linear); }
