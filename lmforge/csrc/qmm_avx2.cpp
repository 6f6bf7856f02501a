// Matrix products with int4 / int8 weights and int8 activation blocks, for x86 CPUs with AVX2 and FMA (the tiles
// in qmm_tiles.h; the decode step's other ops in decode_avx2.cpp).
//
// Why: without AVX-512, torch's packed kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) convert
// each weight to float and multiply with FMA, 8 multiply-adds per instruction. Here the activations are
// quantized to int8 per block of 32 (scale = max|x| / 127, as llama.cpp's Q8 blocks), and each block's dot
// product is one vpmaddubsw + vpmaddwd: 32 multiply-adds on integers, then one float FMA per block.
//
// Operands are lmforge's own storage formats, so no second copy of the weights is needed:
//   q4_mm: nibbles uint8 (N, K/2), low nibble = even column; scales, mins float32 or float16 (N, G),
//          w = q * scale + min
//          with groups of g = K / G columns, g = 32 * 2^k; a list of such layers, outputs side by side; mins
//          empty where they are -8 * scales (Q4_0), then derived, not read.
//   q4_mm_route / q8_mm_route: a mixture's experts for one token, row p of x through part p, the results
//          summed with per-part weights (1, N).
//   q8_mm: qweight int8 (N, K) in [-127, 127]; scales float32 (N, 1), w = q * scale.
// Both take x float32 (..., K) and return float32 (..., N). Registered as torch.ops.lmforge.q4_mm / q8_mm, so a
// torch.jit.trace of the decode step records them. Above `int_rows` rows of x (prefill) the integer products
// lose to a float GEMM: the weights are then dequantized a chunk of rows at a time (exactly, as lmforge's
// Python dequantize) and multiplied by torch's float32 matmul, with no whole-matrix float copy.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>
#include <torch/library.h>

#include "avx2_common.h"
#include "qmm_tiles.h"  // QB, quantize_rows, q4_tile, q8_tile

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Tile shapes: weight rows x rows of x, RT * MT accumulators in registers.
//   Up to 2 rows of x (decoding one sequence): 6 x 2 (6 measured against 4 and 8 rows: streamed sweep -13% vs
//   4, LM head -29%).
//   More rows, where AVX-512VL gives 32 vector registers: 4 x 4, each weight block decoded once for 4 rows of x
//   (Zen 4, one thread: 6% less time at 16 and 32 rows, the int8 LM head at 4 rows 25-45% less).
//   Otherwise (AVX2: 16 registers) 6 x 2 throughout.
struct Shape {
  int rt, mt;
};
inline Shape shape_for(int64_t M) {
#if defined(__AVX512VL__)
  if (M > 2) return {4, 4};
#endif
  (void)M;
  return {6, 2};
}

// fn(R, Mc, r) with compile-time R weight rows and Mc x rows (std::integral_constant) for a tile of `rows`
// weight rows of a full tile's Rf, and mt x rows: one call for a full tile (R = Rf, r = 0), else one per row
// (R = 1, r = 0..rows-1).
template <int Rf, int Mc, typename Fn>
inline void by_rows(int64_t rows, Fn& fn) {
  using std::integral_constant;
  if (rows == Rf) {
    fn(integral_constant<int, Rf>{}, integral_constant<int, Mc>{}, int64_t{0});
  } else {
    for (int64_t r = 0; r < rows; ++r) fn(integral_constant<int, 1>{}, integral_constant<int, Mc>{}, r);
  }
}

template <int Rf, typename Fn>
inline void by_mt(int64_t rows, int64_t mt, Fn& fn) {
  if constexpr (Rf == 4) {  // only the 4 x 4 shape takes more than 2 rows of x (shape_for)
    if (mt == 4) return by_rows<Rf, 4>(rows, fn);
    if (mt == 3) return by_rows<Rf, 3>(rows, fn);
  }
  if (mt == 2) return by_rows<Rf, 2>(rows, fn);
  by_rows<Rf, 1>(rows, fn);
}

template <typename Fn>
inline void by_shape(const Shape& s, int64_t rows, int64_t mt, Fn fn) {
  if (s.rt == 4) return by_mt<4>(rows, mt, fn);
  by_mt<6>(rows, mt, fn);
}

struct Tile {
  int64_t part, row, n, rows;  // weight part, its first row, the first output column, rows (<= RT)
};

// Each part's rows cut into tiles of rt (a shorter last one), so that no tile spans two parts; a tile is computed
// from its index, not stored (a list built per call cost a large LM head about a millisecond, docs/benchmarks.md).
class Tiles {
 public:
  Tiles(const std::vector<int64_t>& part_rows, int rt) : rows_(part_rows), rt_(rt) {
    int64_t t = 0, n = 0;
    for (int64_t r : part_rows) {
      first_.push_back(t);
      col_.push_back(n);
      t += (r + rt - 1) / rt;
      n += r;
    }
    count_ = t;
  }
  int64_t size() const { return count_; }
  Tile operator[](int64_t t) const {
    // the last part whose first tile is <= t (parts are few: q|k|v, gate|up, a token's experts)
    const int64_t p = std::upper_bound(first_.begin(), first_.end(), t) - first_.begin() - 1;
    const int64_t row = (t - first_[p]) * rt_;
    return {p, row, col_[p] + row, std::min<int64_t>(rt_, rows_[p] - row)};
  }

 private:
  std::vector<int64_t> rows_, first_, col_;
  int rt_;
  int64_t count_ = 0;
};

constexpr int64_t L2_BLOCK = 192 << 10;  // weight bytes run against every x row before the next ones

// Run fn(tile, m0, mt) over all tiles and all x rows, mt <= MT rows of x at a time, the tiles split across
// threads. A thread's tiles go in blocks of at most L2_BLOCK weight bytes (tile_bytes each), each block against
// all rows of x before the next: with more than MT rows each weight byte is then read from memory once, not
// once per MT rows (SmolLM2's 28 MB int8 LM head at 16 rows: 19 ms per call without the blocks, 10 with them).
template <typename Fn>
void over_tiles(const Tiles& tiles, int64_t M, int64_t MT, int64_t tile_bytes, Fn fn) {
  const int64_t nt = tiles.size();
  const int64_t grain = std::max<int64_t>(4, nt / (8 * std::max(1, at::get_num_threads())));
  const int64_t block = std::max<int64_t>(1, L2_BLOCK / std::max<int64_t>(1, tile_bytes));
  at::parallel_for(0, nt, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t s = t0; s < t1; s += block) {
      const int64_t e = std::min(t1, s + block);
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int64_t mt = std::min<int64_t>(MT, M - m0);
        for (int64_t t = s; t < e; ++t) fn(tiles[t], m0, mt);
      }
    }
  });
}

// x (..., K) -> the (M, K) view the kernels work on; y is built (M, N) and handed back as (..., N), so that a
// traced decode step records no reshape around each call.
at::Tensor rows_of(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 2 && x.is_contiguous(), op,
              ": x must be a contiguous float32 (..., K) CPU tensor");
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " columns, the weight ", K);
  TORCH_CHECK(K % QB == 0, op, ": K = ", K, " is not a multiple of 32");
  return x.view({-1, K});
}

at::Tensor shaped(const at::Tensor& y, const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(y.size(1));
  return y.view(shape);
}

constexpr int64_t CHUNK = 256;  // weight rows dequantized at a time by the dense path (<= 1.5 MB of floats)

// y[:, col + r0 : col + r0 + c] = x @ deq(rows r0..r0+c)^T for each chunk of `rows` weight rows; deq(r, out)
// writes row r of the weight as K floats.
template <typename Deq>
void dense_part(const at::Tensor& x, int64_t rows, int64_t K, int64_t col, at::Tensor& y, Deq deq) {
  for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
    const int64_t c = std::min(CHUNK, rows - r0);
    at::Tensor wf = at::empty({c, K}, x.options());
    float* F = wf.data_ptr<float>();
    at::parallel_for(0, c, 16, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) deq(r0 + r, F + r * K);
    });
    y.narrow(1, col + r0, c).copy_(at::mm(x, wf.t()));
  }
}

// Sum over the P rows of y (P, N): out = y_0 * w_0, then out = out + y_p * w_p in row order (a multiply and an
// add, each rounded: what `y * w` and `out + y` do in torch, so a mixture's experts sum to the same bits as
// summed one by one).
at::Tensor weighted_rows(const at::Tensor& y, const at::Tensor& w) {
  const int64_t P = y.size(0), N = y.size(1);
  at::Tensor out = at::empty({1, N}, y.options());
  const float *Y = y.data_ptr<float>(), *Wt = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) O[n] = Y[n] * Wt[0];
  for (int64_t p = 1; p < P; ++p)
    for (int64_t n = 0; n < N; ++n) O[n] = O[n] + Y[p * N + n] * Wt[p];
  return out;
}

// x (M, K) times the concatenation of the int4 layers in `nib` (each (N_i, K/2)): y (M, sum N_i). A list, so
// that q|k|v or gate|up run as one call (x quantized once, one parallel pass) with no fused copy of weights.
// A part's mins may be empty: mins = -8 * scales (Q4_0 blocks), not read (dot_group); all parts or none.
// route (mixture of experts, one token): x has one row per part, row p runs part p only (each row's integer
// products, as a call of its own would), and the result is sum_p route[p] * y_p (1, N) (weighted_rows).
at::Tensor q4_impl(const at::Tensor& x_in, at::TensorList nib, at::TensorList scales, at::TensorList mins,
                   int64_t int_rows, const at::Tensor* route) {
  TORCH_CHECK(!nib.empty() && nib.size() == scales.size() && nib.size() == mins.size(),
              "q4_mm: give as many scales and mins tensors as weights");
  const int64_t K = nib[0].size(1) * 2;
  const at::Tensor x = rows_of(x_in, K, "q4_mm");
  const int64_t M = x.size(0);
  const bool sym = mins[0].numel() == 0 && nib[0].size(0) > 0;
  const int64_t G = scales[0].size(1), nb = K / QB;
  std::vector<int64_t> rows;
  std::vector<const uint8_t*> W;
  std::vector<const void*> S, Z;
  const bool half = scales[0].scalar_type() == at::kHalf;
  const auto st = half ? at::kHalf : at::kFloat;
  for (size_t i = 0; i < nib.size(); ++i) {
    const at::Tensor &w = nib[i], &sc = scales[i], &mn = mins[i];
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(1) * 2 == K,
                "q4_mm: nibbles must be contiguous uint8 (N, K/2) of one K");
    TORCH_CHECK(sc.scalar_type() == st && sc.is_contiguous() && sc.dim() == 2 && sc.size(0) == w.size(0) &&
                    sc.size(1) == G &&
                    (sym ? mn.numel() == 0 : mn.scalar_type() == st && mn.is_contiguous() && sc.sizes() == mn.sizes()),
                "q4_mm: scales and mins must be contiguous (N, G), all float32 or all float16, one G for all parts "
                "(or all mins empty: mins = -8 * scales)");
    rows.push_back(w.size(0));
    W.push_back(w.data_ptr<uint8_t>());
    S.push_back(sc.data_ptr());
    Z.push_back(sym ? nullptr : mn.data_ptr());
  }
  if (route != nullptr) {
    TORCH_CHECK(M == static_cast<int64_t>(nib.size()) && route->scalar_type() == at::kFloat &&
                    route->is_contiguous() && route->numel() == M,
                "q4_mm_route: x must have one row per part and route one float32 weight per part");
    for (int64_t r : rows) TORCH_CHECK(r == rows[0], "q4_mm_route: the parts must have one output width");
  }
  const int64_t per_group = G > 0 && K % G == 0 ? (K / G) / QB : 0;
  TORCH_CHECK(per_group > 0 && (per_group & (per_group - 1)) == 0 && (K / G) % QB == 0, "q4_mm: group size ",
              K / std::max<int64_t>(G, 1), " is not 32 times a power of two");
  int shift = 0;
  while ((int64_t{1} << shift) < per_group) ++shift;
  int64_t N = 0;
  for (int64_t r : rows) N += r;
  at::Tensor y = route ? at::empty({M, rows[0]}, x.options()) : at::empty({M, N}, x.options());
  auto run = [&](auto tag) {  // the rest for scale type ST
    using ST = decltype(tag);
    if (M > int_rows && route == nullptr) {
      int64_t col = 0;
      for (size_t i = 0; i < nib.size(); ++i) {
        const uint8_t* w = W[i];
        const ST *sc = static_cast<const ST*>(S[i]), *mn = static_cast<const ST*>(Z[i]);
        dense_part(x, rows[i], K, col, y, [&](int64_t r, float* out) {
          const int64_t gs = K / G;  // columns per group
          for (int64_t g = 0; g < G; ++g) {
            const float d = ld(sc + r * G + g), z = mn ? ld(mn + r * G + g) : d * -8.f;
            const uint8_t* src = w + r * (K / 2) + g * (gs / 2);
            float* o = out + g * gs;
            for (int64_t k = 0; k < gs / 2; ++k) {
              o[2 * k] = static_cast<float>(src[k] & 15) * d + z;
              o[2 * k + 1] = static_cast<float>(src[k] >> 4) * d + z;
            }
          }
        });
        col += rows[i];
      }
      return;
    }
    std::vector<int8_t> xq(M * K);
    std::vector<float> sx(M * nb), xs(M * nb), xg(M * G, 0.f);
    quantize_rows(x.data_ptr<float>(), M, K, true, xq.data(), sx.data(), xs.data());
    for (int64_t m = 0; m < M; ++m)  // block sums -> group sums (the min term is per group)
      for (int64_t b = 0; b < nb; ++b) xg[m * G + (b >> shift)] += xs[m * nb + b];
    float* Y = y.data_ptr<float>();
    const Shape sh = shape_for(route ? 1 : M);
    const int64_t tile_bytes = sh.rt * (K / 2 + (sym ? 1 : 2) * G * static_cast<int64_t>(sizeof(ST)));
    over_tiles(Tiles(rows, sh.rt), route ? 1 : M, sh.mt, tile_bytes, [&](const Tile& t, int64_t m0, int64_t mt) {
      if (route) m0 = t.part;  // the part's own row of x, written to row t.part of y
      const uint8_t* w = W[t.part] + t.row * (K / 2);
      const ST *sc = static_cast<const ST*>(S[t.part]) + t.row * G;
      const ST* mn = sym ? nullptr : static_cast<const ST*>(Z[t.part]) + t.row * G;
      const int8_t* q = xq.data() + m0 * K;
      const float *a = sx.data() + m0 * nb, *g = xg.data() + m0 * G;
      const int64_t ld_y = route ? rows[0] : N;
      float* out = Y + m0 * ld_y + (route ? t.row : t.n);
      by_shape(sh, t.rows, mt, [&](auto R, auto Mc, int64_t r) {
        q4_tile<R(), Mc()>(w + r * (K / 2), sc + r * G, mn ? mn + r * G : nullptr, G, shift, q, a, g, K, out + r,
                           ld_y);
      });
    });
  };
  if (half) run(uint16_t{});
  else run(float{});
  if (route) return weighted_rows(y, *route);
  return shaped(y, x_in);
}

at::Tensor q4_mm(const at::Tensor& x, at::TensorList nib, at::TensorList scales, at::TensorList mins,
                 int64_t int_rows) {
  return q4_impl(x, nib, scales, mins, int_rows, nullptr);
}

// One token's experts (x (k, K): row p is expert p's input) -> sum_p route[p] * (x_p @ W_p^T), (1, N).
at::Tensor q4_mm_route(const at::Tensor& x, at::TensorList nib, at::TensorList scales, at::TensorList mins,
                       const at::Tensor& route) {
  return q4_impl(x, nib, scales, mins, 0, &route);
}

// x (M, K) times the concatenation of the int8 layers in `w8` (each (N_i, K), one float32 scale per row): y (M,
// sum N_i). A list, as q4_mm's: q|k|v or gate|up in one call (x quantized once, one parallel pass).
// route: as q4_impl's (one row of x per part, the rows' results summed with these weights).
at::Tensor q8_impl(const at::Tensor& x_in, at::TensorList w8, at::TensorList scales, int64_t int_rows,
                   const at::Tensor* route) {
  TORCH_CHECK(!w8.empty() && w8.size() == scales.size(), "q8_mm: give as many scales tensors as weights");
  const int64_t K = w8[0].size(1);
  const at::Tensor x = rows_of(x_in, K, "q8_mm");
  const int64_t M = x.size(0), nb = K / QB;
  std::vector<int64_t> rows;
  std::vector<const int8_t*> W;
  std::vector<const float*> S;
  for (size_t i = 0; i < w8.size(); ++i) {
    const at::Tensor &w = w8[i], &s = scales[i];
    TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
                "q8_mm: the weights must be contiguous int8 (N, K) of one K");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == w.size(0) && s.is_contiguous(),
                "q8_mm: scales must be contiguous float32 with one value per row (per-channel)");
    rows.push_back(w.size(0));
    W.push_back(w.data_ptr<int8_t>());
    S.push_back(s.data_ptr<float>());
  }
  if (route != nullptr) {
    TORCH_CHECK(M == static_cast<int64_t>(w8.size()) && route->scalar_type() == at::kFloat &&
                    route->is_contiguous() && route->numel() == M,
                "q8_mm_route: x must have one row per part and route one float32 weight per part");
    for (int64_t r : rows) TORCH_CHECK(r == rows[0], "q8_mm_route: the parts must have one output width");
  }
  int64_t N = 0;
  for (int64_t r : rows) N += r;
  at::Tensor y = route ? at::empty({M, rows[0]}, x.options()) : at::empty({M, N}, x.options());
  if (M > int_rows && route == nullptr) {
    int64_t col = 0;
    for (size_t i = 0; i < w8.size(); ++i) {
      const int8_t* w = W[i];
      const float* s = S[i];
      dense_part(x, rows[i], K, col, y, [&](int64_t r, float* out) {
        for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(w[r * K + k]) * s[r];
      });
      col += rows[i];
    }
    return shaped(y, x_in);
  }
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * nb), xs(M * nb);
  quantize_rows(x.data_ptr<float>(), M, K, false, xq.data(), sx.data(), xs.data());
  float* Y = y.data_ptr<float>();
  const Shape sh = shape_for(route ? 1 : M);
  // One row of x (a decode step) against short weight rows (K < 2048: Qwen2.5-0.5B's 896): one weight row at a
  // time, so the weights stream in address order (a 6-row tile reads 6 streams of a few cache lines each, which
  // the hardware prefetcher follows poorly). The same products in the same order: the bits do not change.
  const bool one_by_one = (M == 1 || route) && K < 2048;
  const int64_t ld_y = route ? rows[0] : N;
  over_tiles(Tiles(rows, sh.rt), route ? 1 : M, sh.mt, sh.rt * K, [&](const Tile& t, int64_t m0, int64_t mt) {
    if (route) m0 = t.part;  // the part's own row of x, written to row t.part of y
    const int8_t* w = W[t.part] + t.row * K;
    const float* s = S[t.part] + t.row;
    const int8_t* q = xq.data() + m0 * K;
    const float* a = sx.data() + m0 * nb;
    float* out = Y + m0 * ld_y + (route ? t.row : t.n);
    if (one_by_one) {
      for (int64_t r = 0; r < t.rows; ++r) q8_tile<1, 1>(w + r * K, s + r, q, a, K, out + r, ld_y);
      return;
    }
    by_shape(sh, t.rows, mt, [&](auto R, auto Mc, int64_t r) {
      q8_tile<R(), Mc()>(w + r * K, s + r, q, a, K, out + r, ld_y);
    });
  });
  if (route) return weighted_rows(y, *route);
  return shaped(y, x_in);
}

at::Tensor q8_mm_parts(const at::Tensor& x, at::TensorList w8, at::TensorList scales, int64_t int_rows) {
  return q8_impl(x, w8, scales, int_rows, nullptr);
}

// One token's int8 experts, as q4_mm_route.
at::Tensor q8_mm_route(const at::Tensor& x, at::TensorList w8, at::TensorList scales, const at::Tensor& route) {
  return q8_impl(x, w8, scales, 0, &route);
}

at::Tensor q8_mm(const at::Tensor& x_in, const at::Tensor& w8, const at::Tensor& scales, int64_t int_rows) {
  TORCH_CHECK(w8.scalar_type() == at::kChar && w8.is_contiguous(), "q8_mm: the weight must be contiguous int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == w8.size(0) && scales.is_contiguous(),
              "q8_mm: scales must be contiguous float32 with one value per row (per-channel)");
  const std::vector<at::Tensor> w{w8}, s{scales};
  return q8_mm_parts(x_in, w, s, int_rows);
}

// A mixture's decode tokens through their chosen experts, the routing given as tensors (so that a traced step
// records it instead of fixing one token's choice): x (M, K), one token per row; idx (M, k) int64 the chosen
// experts, w (M, k) float32 their weights; every expert's operands side by side, `per_up` parts each for gate|up
// (mins empty lists for int8) and `per_down` for down. Per row: the experts in ascending order, gate|up for all k
// in one call, silu(gate) * up, the k downs summed with the weights (q4_mm_route / q8_mm_route): the calls and
// numbers of lmforge.quant.experts.GroupedExperts for that row alone.
at::Tensor moe_mm(const at::Tensor& x_in, const at::Tensor& idx, const at::Tensor& w, at::TensorList up_w,
                  at::TensorList up_s, at::TensorList up_m, at::TensorList dn_w, at::TensorList dn_s,
                  at::TensorList dn_m, int64_t per_up, int64_t per_down, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "moe_mm: bits must be 4 or 8");
  TORCH_CHECK(per_up > 0 && per_down > 0 && !up_w.empty() && up_w.size() % per_up == 0 && up_s.size() == up_w.size(),
              "moe_mm: gate|up operands must be a whole number of experts");
  const int64_t E = static_cast<int64_t>(up_w.size()) / per_up;
  TORCH_CHECK(static_cast<int64_t>(dn_w.size()) == E * per_down && dn_s.size() == dn_w.size() &&
                  (bits == 8 || (up_m.size() == up_w.size() && dn_m.size() == dn_w.size())),
              "moe_mm: down operands (and int4 mins) for every expert");
  const int64_t K = x_in.size(-1);
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M > 0, "moe_mm: no tokens");
  TORCH_CHECK(idx.scalar_type() == at::kLong && w.scalar_type() == at::kFloat && idx.dim() == 2 && idx.size(0) == M &&
                  w.sizes() == idx.sizes(),
              "moe_mm: idx (M, k) int64 and w (M, k) float32, one row per token");
  const int64_t k = idx.size(1);
  const at::Tensor id = idx.contiguous(), wt = w.contiguous();
  static auto silu = c10::Dispatcher::singleton().findSchemaOrThrow("lmforge::silu_mul", "").typed<at::Tensor(
      const at::Tensor&)>();
  std::vector<at::Tensor> rows;
  for (int64_t m = 0; m < M; ++m) {
    std::vector<std::pair<int64_t, float>> pick;  // (expert, weight), ascending experts
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = id.data_ptr<int64_t>()[m * k + j];
      TORCH_CHECK(e >= 0 && e < E, "moe_mm: expert ", e, " outside the ", E, " given");
      pick.emplace_back(e, wt.data_ptr<float>()[m * k + j]);
    }
    std::sort(pick.begin(), pick.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<at::Tensor> uw, us, um, dw, ds, dm;
    at::Tensor route = at::empty({k}, x.options());
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = pick[j].first;
      route.data_ptr<float>()[j] = pick[j].second;
      for (int64_t p = e * per_up; p < (e + 1) * per_up; ++p) {
        uw.push_back(up_w[p]);
        us.push_back(up_s[p]);
        if (bits == 4) um.push_back(up_m[p]);
      }
      for (int64_t p = e * per_down; p < (e + 1) * per_down; ++p) {
        dw.push_back(dn_w[p]);
        ds.push_back(dn_s[p]);
        if (bits == 4) dm.push_back(dn_m[p]);
      }
    }
    const at::Tensor xm = x.narrow(0, m, 1);
    const at::Tensor gu = bits == 4 ? q4_impl(xm, uw, us, um, 1, nullptr) : q8_impl(xm, uw, us, 1, nullptr);
    const at::Tensor act = silu.call(gu.view({k, -1}));  // (k, F)
    rows.push_back(bits == 4 ? q4_impl(act, dw, ds, dm, 0, &route) : q8_impl(act, dw, ds, 0, &route));  // (1, D)
  }
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
  shape.push_back(rows[0].size(1));
  return (M == 1 ? rows[0] : at::cat(rows)).view(shape);
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("q4_mm(Tensor x, Tensor[] nibbles, Tensor[] scales, Tensor[] mins, int int_rows) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor qweight, Tensor scales, int int_rows) -> Tensor");
  m.def("q8_mm_parts(Tensor x, Tensor[] qweights, Tensor[] scales, int int_rows) -> Tensor");
  m.def("q4_mm_route(Tensor x, Tensor[] nibbles, Tensor[] scales, Tensor[] mins, Tensor route) -> Tensor");
  m.def("q8_mm_route(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor route) -> Tensor");
  m.def("moe_mm(Tensor x, Tensor idx, Tensor w, Tensor[] up_w, Tensor[] up_s, Tensor[] up_m, Tensor[] dn_w, "
        "Tensor[] dn_s, Tensor[] dn_m, int per_up, int per_down, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
  m.impl("q8_mm_parts", &q8_mm_parts);
  m.impl("q4_mm_route", &q4_mm_route);
  m.impl("q8_mm_route", &q8_mm_route);
  m.impl("moe_mm", &moe_mm);
}
