// Matrix products with int4 / int8 weights and int8 activation blocks, for x86 CPUs with AVX2 and FMA (and, at
// the end, a one-pass RMSNorm for decode steps).
//
// Why: without AVX-512, torch's packed kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) convert
// each weight to float and multiply with FMA, 8 multiply-adds per instruction. Here the activations are
// quantized to int8 per block of 32 (scale = max|x| / 127, as llama.cpp's Q8 blocks), and each block's dot
// product is one vpmaddubsw + vpmaddwd: 32 multiply-adds on integers, then one float FMA per block.
//
// Operands are lmforge's own storage formats, so no second copy of the weights is needed:
//   q4_mm: nibbles uint8 (N, K/2), low nibble = even column; scales, mins float32 (N, G), w = q * scale + min
//          with groups of g = K / G columns, g = 32 * 2^k; a list of such layers, outputs side by side.
//   q8_mm: qweight int8 (N, K) in [-127, 127]; scales float32 (N, 1), w = q * scale.
// Both take x float32 (M, K) and return float32 (M, N). Registered as torch.ops.lmforge.q4_mm / q8_mm, so a
// torch.jit.trace of the decode step records them. Above `int_rows` rows of x (prefill) the integer products
// lose to a float GEMM: the weights are then dequantized a chunk of rows at a time (exactly, as lmforge's
// Python dequantize) and multiplied by torch's float32 matmul, with no whole-matrix float copy.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t QB = 32;  // activation block: 32 values, one float scale

// x (M, K) -> xq int8 (M, K), sx (M, K/32) block scales, xs (M, K/32) block sums of the rounded x.
// permute: store each block as [its 16 even columns | its 16 odd columns], the order in which the int4
// kernel unpacks a block's 16 nibble bytes (low nibbles = even columns, high nibbles = odd).
void quantize_rows(const float* x, int64_t M, int64_t K, bool permute, int8_t* xq, float* sx, float* xs) {
  const int64_t nb = K / QB;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * K + b * QB;
      float amax = 0.f;
      for (int j = 0; j < QB; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* out = xq + m * K + b * QB;
      int sum = 0;
      for (int j = 0; j < QB; ++j) {
        const int p = permute ? ((j & 1) ? 16 + (j >> 1) : (j >> 1)) : j;
        out[p] = static_cast<int8_t>(std::nearbyint(v[j] * inv));  // |v * inv| <= 127
        sum += out[p];
      }
      sx[m * nb + b] = d;
      // the sum of the *rounded* block: the min term then sees the same x as the q term, so the rounding
      // error meets w = q * scale + min whole (not the uncentred q * scale, ~2x larger for int4 blocks)
      xs[m * nb + b] = d * static_cast<float>(sum);
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// A tile of the product: RT consecutive int4 weight rows (row stride K/2 bytes, scales/mins stride G) against
// MT rows of x. For weight row r and x row m:
//   y[m][r] = sum_b scale_{r, b >> shift} * sx_mb * (q_rb . xq_mb) + sum_g min_rg * xsum_mg
// (2^shift blocks of 32 make a group). RT * MT independent accumulators hide the FMA latency; each x block is
// loaded once for the RT rows, each weight block decoded once for the MT rows.
template <int RT, int MT>
inline void q4_tile(const uint8_t* w, const float* sc, const float* mn, int64_t G, int shift, const int8_t* xq,
                    const float* sx, const float* xg, int64_t K, float* y, int64_t ystride) {
  const int64_t nb = K / QB;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i sh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[MT];
    float xd[MT];
    for (int m = 0; m < MT; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * QB));
      xd[m] = sx[m * nb + b];
    }
    for (int r = 0; r < RT; ++r) {
      // the block's 16 bytes in both halves; the high half shifted by 4: [even columns | odd columns], values
      // 0..15, the order quantize_rows(permute) gave x
      const __m256i raw = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * (K / 2) + b * 16)));
      const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(raw, sh), m4);
      // the same block 4 tiles ahead (rows are consecutive): measured ~1 ms less per SmolLM2 token, whose 80 MiB
      // of weights stream from memory; a prefetch never faults, also past the end of the matrix
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * RT) * (K / 2) + b * 16), _MM_HINT_T0);
      const float d = sc[r * G + (b >> shift)];
      for (int m = 0; m < MT; ++m) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv[m]), ones);  // 8 int32 partial sums
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[m]), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) {
      float macc = 0.f;
      for (int64_t g = 0; g < G; ++g) macc += mn[r * G + g] * xg[m * G + g];
      y[m * ystride + r] = hsum(acc[r][m]) + macc;
    }
}

// The same for int8 weight rows (row stride K) with one scale per row: y[m][r] = scale_r * sum_b sx_mb * (q_rb . xq_mb).
template <int RT, int MT>
inline void q8_tile(const int8_t* w, const float* scale, const int8_t* xq, const float* sx, int64_t K, float* y,
                    int64_t ystride) {
  const int64_t nb = K / QB;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[MT];
    __m256 xd[MT];
    for (int m = 0; m < MT; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * QB));
      xd[m] = _mm256_set1_ps(sx[m * nb + b]);
    }
    for (int r = 0; r < RT; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * QB));
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w|: maddubs needs one unsigned operand
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * RT) * K + b * QB), _MM_HINT_T0);  // as in q4_tile
      for (int m = 0; m < MT; ++m) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[m], wv)), ones);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), xd[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) y[m * ystride + r] = hsum(acc[r][m]) * scale[r];
}

constexpr int RT = 4;  // weight rows per tile
constexpr int MT = 2;  // x rows per tile (RT * MT accumulators stay in registers)

struct Tile {
  int64_t part, row, n, rows;  // weight part, its first row, the first output column, rows (<= RT)
};

// Cut each part's rows into tiles of RT (a shorter last one), so that no tile spans two parts.
std::vector<Tile> tiles_of(const std::vector<int64_t>& part_rows) {
  std::vector<Tile> t;
  int64_t n = 0;
  for (size_t i = 0; i < part_rows.size(); ++i) {
    for (int64_t r = 0; r < part_rows[i]; r += RT) {
      const int64_t k = std::min<int64_t>(RT, part_rows[i] - r);
      t.push_back({static_cast<int64_t>(i), r, n + r, k});
    }
    n += part_rows[i];
  }
  return t;
}

// Run fn(tile, m0, mt) over all tiles and all x rows, the tiles split across threads.
template <typename Fn>
void over_tiles(const std::vector<Tile>& tiles, int64_t M, Fn fn) {
  const int64_t nt = static_cast<int64_t>(tiles.size());
  const int64_t grain = std::max<int64_t>(4, nt / (8 * std::max(1, at::get_num_threads())));
  at::parallel_for(0, nt, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int64_t mt = std::min<int64_t>(MT, M - m0);
      for (int64_t t = t0; t < t1; ++t) fn(tiles[t], m0, mt);
    }
  });
}

void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be a contiguous float32 (M, K) CPU tensor");
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(K % QB == 0, op, ": K = ", K, " is not a multiple of 32");
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

// x (M, K) times the concatenation of the int4 layers in `nib` (each (N_i, K/2)): y (M, sum N_i). A list, so
// that q|k|v or gate|up run as one call (x quantized once, one parallel pass) with no fused copy of weights.
at::Tensor q4_mm(const at::Tensor& x, at::TensorList nib, at::TensorList scales, at::TensorList mins,
                 int64_t int_rows) {
  TORCH_CHECK(!nib.empty() && nib.size() == scales.size() && nib.size() == mins.size(),
              "q4_mm: give as many scales and mins tensors as weights");
  const int64_t K = nib[0].size(1) * 2, M = x.size(0);
  check_x(x, K, "q4_mm");
  const int64_t G = scales[0].size(1), nb = K / QB;
  std::vector<int64_t> rows;
  std::vector<const uint8_t*> W;
  std::vector<const float*> S, Z;
  for (size_t i = 0; i < nib.size(); ++i) {
    const at::Tensor &w = nib[i], &sc = scales[i], &mn = mins[i];
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(1) * 2 == K,
                "q4_mm: nibbles must be contiguous uint8 (N, K/2) of one K");
    TORCH_CHECK(sc.scalar_type() == at::kFloat && mn.scalar_type() == at::kFloat && sc.is_contiguous() &&
                    mn.is_contiguous() && sc.sizes() == mn.sizes() && sc.dim() == 2 && sc.size(0) == w.size(0) &&
                    sc.size(1) == G,
                "q4_mm: scales and mins must be contiguous float32 (N, G), one G for all parts");
    rows.push_back(w.size(0));
    W.push_back(w.data_ptr<uint8_t>());
    S.push_back(sc.data_ptr<float>());
    Z.push_back(mn.data_ptr<float>());
  }
  const int64_t per_group = G > 0 && K % G == 0 ? (K / G) / QB : 0;
  TORCH_CHECK(per_group > 0 && (per_group & (per_group - 1)) == 0 && (K / G) % QB == 0, "q4_mm: group size ",
              K / std::max<int64_t>(G, 1), " is not 32 times a power of two");
  int shift = 0;
  while ((int64_t{1} << shift) < per_group) ++shift;
  int64_t N = 0;
  for (int64_t r : rows) N += r;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > int_rows) {
    int64_t col = 0;
    for (size_t i = 0; i < nib.size(); ++i) {
      const uint8_t* w = W[i];
      const float *sc = S[i], *mn = Z[i];
      dense_part(x, rows[i], K, col, y, [&](int64_t r, float* out) {
        const int64_t gs = K / G;  // columns per group
        for (int64_t g = 0; g < G; ++g) {
          const float d = sc[r * G + g], z = mn[r * G + g];
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
    return y;
  }
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * nb), xs(M * nb), xg(M * G, 0.f);
  quantize_rows(x.data_ptr<float>(), M, K, true, xq.data(), sx.data(), xs.data());
  for (int64_t m = 0; m < M; ++m)  // block sums -> group sums (the min term is per group)
    for (int64_t b = 0; b < nb; ++b) xg[m * G + (b >> shift)] += xs[m * nb + b];
  float* Y = y.data_ptr<float>();
  over_tiles(tiles_of(rows), M, [&](const Tile& t, int64_t m0, int64_t mt) {
    const uint8_t* w = W[t.part] + t.row * (K / 2);
    const float *sc = S[t.part] + t.row * G, *mn = Z[t.part] + t.row * G;
    const int8_t* q = xq.data() + m0 * K;
    const float *a = sx.data() + m0 * nb, *g = xg.data() + m0 * G;
    float* out = Y + m0 * N + t.n;
    if (t.rows == RT) {
      if (mt == 2) q4_tile<RT, 2>(w, sc, mn, G, shift, q, a, g, K, out, N);
      else q4_tile<RT, 1>(w, sc, mn, G, shift, q, a, g, K, out, N);
    } else {
      for (int64_t r = 0; r < t.rows; ++r) {
        const uint8_t* wr = w + r * (K / 2);
        if (mt == 2) q4_tile<1, 2>(wr, sc + r * G, mn + r * G, G, shift, q, a, g, K, out + r, N);
        else q4_tile<1, 1>(wr, sc + r * G, mn + r * G, G, shift, q, a, g, K, out + r, N);
      }
    }
  });
  return y;
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& w8, const at::Tensor& scales, int64_t int_rows) {
  const int64_t N = w8.size(0), K = w8.size(1), M = x.size(0);
  check_x(x, K, "q8_mm");
  TORCH_CHECK(w8.scalar_type() == at::kChar && w8.is_contiguous(), "q8_mm: the weight must be contiguous int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "q8_mm: scales must be contiguous float32 with one value per row (per-channel)");
  const int64_t nb = K / QB;
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* W = w8.data_ptr<int8_t>();
  const float* S = scales.data_ptr<float>();
  if (M > int_rows) {
    dense_part(x, N, K, 0, y, [&](int64_t r, float* out) {
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(W[r * K + k]) * S[r];
    });
    return y;
  }
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * nb), xs(M * nb);
  quantize_rows(x.data_ptr<float>(), M, K, false, xq.data(), sx.data(), xs.data());
  float* Y = y.data_ptr<float>();
  over_tiles(tiles_of({N}), M, [&](const Tile& t, int64_t m0, int64_t mt) {
    const int8_t* w = W + t.row * K;
    const int8_t* q = xq.data() + m0 * K;
    const float* a = sx.data() + m0 * nb;
    float* out = Y + m0 * N + t.n;
    if (t.rows == RT) {
      if (mt == 2) q8_tile<RT, 2>(w, S + t.row, q, a, K, out, N);
      else q8_tile<RT, 1>(w, S + t.row, q, a, K, out, N);
    } else {
      for (int64_t r = 0; r < t.rows; ++r) {
        if (mt == 2) q8_tile<1, 2>(w + r * K, S + t.row + r, q, a, K, out + r, N);
        else q8_tile<1, 1>(w + r * K, S + t.row + r, q, a, K, out + r, N);
      }
    }
  });
  return y;
}

// ---- RMSNorm for decode steps ---------------------------------------------------------------------------
// For one token per row, torch's composite CPU rms_norm (pow, mean, add, rsqrt, mul, mul) takes ~16 us for 576
// values, 61 times per SmolLM2 token; this is the same arithmetic in float32 in one pass (~3 us). (A decode
// attention written the same way was not faster than SDPA (35 against 31 us) and is not here.)

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x (..., D) float32 contiguous, w (D): x * rsqrt(mean(x^2) + eps) * w, as F.rms_norm.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "rms_norm: x must be a contiguous float32 CPU tensor");
  const int64_t D = x.size(-1), R = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "rms_norm: w must be (D,) float32");
  at::Tensor y = at::empty_like(x);
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = X + r * D;
    const float inv = 1.f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t i = 0; i < D; ++i) Y[r * D + i] = xr[i] * inv * W[i];
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("q4_mm(Tensor x, Tensor[] nibbles, Tensor[] scales, Tensor[] mins, int int_rows) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor qweight, Tensor scales, int int_rows) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
  m.impl("rms_norm", &rms_norm);
}
