// Matrix products with int4 / int8 weights and int8 activation blocks, for x86 CPUs with AVX2 and FMA (and, at
// the end, a one-pass RMSNorm for decode steps).
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
#include <ATen/ops/mm.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Built with -mavx512vnni -mavx512vl where the CPU has them (cpu_kernels._flags): each 4-byte group's integer
// dot product is then one vpdpbusd instead of vpmaddubsw + vpmaddwd, with the same int32 results (the int16
// sums of the two-step path cannot saturate for these operands, so both paths are exact). Measured on a Zen 4:
// 5-10% less time per call at 1 to 32 rows (docs/quantization.md).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LMF_VNNI 1
#else
#define LMF_VNNI 0
#endif
#if LMF_VNNI && defined(__AVX512BW__)
#define LMF_ZMM 1
#else
#define LMF_ZMM 0
#endif

constexpr int64_t QB = 32;  // activation block: 32 values, one float scale

// x (M, K) -> xq int8 (M, K), sx (M, K/32) block scales, xs (M, K/32) block sums of the rounded x.
// permute: the order in which the int4 kernel unpacks nibbles (low nibble = even column, high = odd). It
// takes blocks two at a time (one 32-byte load of nibbles): a pair b, b+1 is stored as [16 even columns of b |
// 16 even of b+1 | 16 odd of b | 16 odd of b+1]; a last unpaired block (odd K/32) as [16 even | 16 odd].
void quantize_rows(const float* x, int64_t M, int64_t K, bool permute, int8_t* xq, float* sx, float* xs) {
  const int64_t nb = K / QB;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * K + b * QB;
      float amax = 0.f;
      for (int j = 0; j < QB; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      // permute: a pair of blocks (b even, b + 1 < nb) is stored as [evens b | evens b+1 | odds b | odds b+1],
      // a last unpaired block as [evens | odds]
      const bool paired = permute && (b + 1 < nb || (b & 1));
      int8_t* out = xq + m * K + (paired ? (b & ~int64_t{1}) * QB : b * QB);
      const int off = paired ? 16 * static_cast<int>(b & 1) : 0, odd = paired ? 32 : 16;
      int sum = 0;
      for (int j = 0; j < QB; ++j) {
        const int p = permute ? ((j & 1) ? odd + off + (j >> 1) : off + (j >> 1)) : j;
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

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Scales and mins come as float32, or as float16 where every value is exactly a float16 (a GGUF's Q4_0 / Q4_1
// blocks): 4 bytes per group of weights instead of 8, so an int4 weight of a group of 32 streams 0.625 bytes
// instead of 0.75 (the matrices of a decode step are read from memory once per token).
inline float ld(const float* p) { return *p; }
inline float ld(const uint16_t* p) { return _cvtsh_ss(*p); }
// [p[0] x 4 | p[1] x 4]: the scales of a pair of blocks, as the pair's int32 lanes are laid out
inline __m256 ld_pair(const float* p) { return _mm256_set_m128(_mm_set1_ps(p[1]), _mm_set1_ps(p[0])); }
inline __m256 ld_pair(const uint16_t* p) {
  int32_t two;
  std::memcpy(&two, p, 4);
  const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128(two));  // [p0, p1, 0, 0]
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
#if LMF_ZMM
inline __m128 ld4(const float* p) { return _mm_loadu_ps(p); }  // 4 consecutive scales as floats
inline __m128 ld4(const uint16_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
#endif
inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// sum_i (f * a[i]) * b[i] over a row's per-group values: f = 1 for its mins; f = -8 reads a Q4_0 row's mins from
// its scales (w = (q - 8) * d): times -8 (and times 1) is exact in float, so the products are those of stored
// mins bit for bit, and the row streams no mins (0.5625 bytes per weight instead of 0.625, as llama.cpp reads)
template <typename ST>
inline float dot_group(const ST* a, const float* b, int64_t n, float f) {
  const __m256 vf = _mm256_set1_ps(f);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_mul_ps(ld8(a + i), vf), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += (ld(a + i) * f) * b[i];
  return s;
}

// A tile of the product: RT consecutive int4 weight rows (row stride K/2 bytes, scales/mins stride G; mins null:
// mins = -8 * scales) against
// MT rows of x. For weight row r and x row m:
//   y[m][r] = sum_b scale_{r, b >> shift} * sx_mb * (q_rb . xq_mb) + sum_g min_rg * xsum_mg
// (2^shift blocks of 32 make a group). RT * MT independent accumulators hide the FMA latency; each x block is
// loaded once for the RT rows, each weight block decoded once for the MT rows. Blocks go two at a time: one
// load, two vpmaddubsw, one vpmaddwd, one conversion and one FMA per pair (measured 15-30% less time per layer
// in cache than one block at a time, which needs a broadcast, a variable shift and each of those per block).
template <int RT, int MT, typename ST>
inline void q4_tile(const uint8_t* w, const ST* sc, const ST* mn, int64_t G, int shift, const int8_t* xq,
                    const float* sx, const float* xg, int64_t K, float* y, int64_t ystride) {
  const int64_t nb = K / QB;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i sh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t b = 0;
#if LMF_ZMM
  if (shift == 0 && nb >= 4) {
    // four blocks at a time in 512-bit registers (one scale per block): the 64 bytes of two pairs hold
    // [evens b | evens b+1 | evens b+2 | evens b+3] in their low nibbles and the odds in the high ones, and x's
    // pairs b and b+2 give the matching low / high halves; int32 lanes 4j..4j+3 are block b + j
    const __m512i m4z = _mm512_set1_epi8(0x0F);
    const __m512i quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 accz[RT][MT];
    for (int r = 0; r < RT; ++r)
      for (int m = 0; m < MT; ++m) accz[r][m] = _mm512_setzero_ps();
    for (; b + 4 <= nb; b += 4) {
      __m512i xlo[MT], xhi[MT];
      __m512 xd[MT];
      for (int m = 0; m < MT; ++m) {
        const int8_t* xp = xq + m * K + b * QB;
        xlo[m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp))),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 64)), 1);
        xhi[m] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32))),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 96)), 1);
        xd[m] = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(_mm_loadu_ps(sx + m * nb + b)));
      }
      for (int r = 0; r < RT; ++r) {
        const __m512i raw = _mm512_loadu_si512(w + r * (K / 2) + b * 16);
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * RT) * (K / 2) + b * 16), _MM_HINT_T0);
        const __m512i lo = _mm512_and_si512(raw, m4z);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4z);
        const __m512 d = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(ld4(sc + r * G + b)));
        for (int m = 0; m < MT; ++m) {
          const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[m]), hi, xhi[m]);
          accz[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(d, xd[m]), accz[r][m]);
        }
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int m = 0; m < MT; ++m)
        acc[r][m] = _mm256_add_ps(_mm512_castps512_ps256(accz[r][m]),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(accz[r][m]), 1)));
  }
#endif
  // two blocks at a time: one 32-byte load holds both blocks' nibbles; low nibbles = [evens b | evens b+1],
  // high = [odds b | odds b+1], the order quantize_rows gave x; int32 lanes 0-3 are block b, 4-7 block b+1
  for (; b + 2 <= nb; b += 2) {
    __m256i xlo[MT], xhi[MT];
    __m256 xd[MT];
    for (int m = 0; m < MT; ++m) {
      xlo[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * QB));
      xhi[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * QB + 32));
      xd[m] = _mm256_set_m128(_mm_set1_ps(sx[m * nb + b + 1]), _mm_set1_ps(sx[m * nb + b]));
    }
    for (int r = 0; r < RT; ++r) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * (K / 2) + b * 16));
      // the same pair 4 tiles ahead (rows are consecutive): measured ~1 ms less per SmolLM2 token, whose weights
      // stream from memory; a prefetch never faults, also past the end of the matrix
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * RT) * (K / 2) + b * 16), _MM_HINT_T0);
      const __m256i lo = _mm256_and_si256(raw, m4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
      const __m256 d = shift ? _mm256_set1_ps(ld(sc + r * G + (b >> shift))) : ld_pair(sc + r * G + b);
      for (int m = 0; m < MT; ++m) {
#if LMF_VNNI
        const __m256i p = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xlo[m]), hi, xhi[m]);
#else
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[m]), _mm256_maddubs_epi16(hi, xhi[m]));
        const __m256i p = _mm256_madd_epi16(s16, ones);  // |.| <= 4 * 15 * 127: no overflow in int16
#endif
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(d, xd[m]), acc[r][m]);
      }
    }
  }
  for (; b < nb; ++b) {  // a last unpaired block: [evens | odds]
    __m256i xv[MT];
    float xd[MT];
    for (int m = 0; m < MT; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * QB));
      xd[m] = sx[m * nb + b];
    }
    for (int r = 0; r < RT; ++r) {
      // the block's 16 bytes in both halves, the high half shifted by 4: [even columns | odd columns]
      const __m256i raw = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * (K / 2) + b * 16)));
      const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(raw, sh), m4);
      const float d = ld(sc + r * G + (b >> shift));
      for (int m = 0; m < MT; ++m) {
#if LMF_VNNI
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv[m]);
#else
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv[m]), ones);
#endif
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[m]), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m)
      y[m * ystride + r] = hsum(acc[r][m]) + (mn ? dot_group(mn + r * G, xg + m * G, G, 1.f) : dot_group(sc + r * G, xg + m * G, G, -8.f));
}

// The same for int8 weight rows (row stride K) with one scale per row: y[m][r] = scale_r * sum_b sx_mb * (q_rb . xq_mb).
// vpmaddubsw needs one unsigned operand: |x| (taken once per block of x, shared by the RT rows) times w with x's
// signs, so each weight block costs one vpsignb (|w| and x with w's signs would cost two per row); the same
// integers either way.
template <int RT, int MT>
inline void q8_tile(const int8_t* w, const float* scale, const int8_t* xq, const float* sx, int64_t K, float* y,
                    int64_t ystride) {
  const int64_t nb = K / QB;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT][MT];
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[MT], ax[MT];
    __m256 xd[MT];
    for (int m = 0; m < MT; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * QB));
      ax[m] = _mm256_abs_epi8(xv[m]);
      xd[m] = _mm256_set1_ps(sx[m * nb + b]);
    }
    for (int r = 0; r < RT; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + b * QB));
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 4 * RT) * K + b * QB), _MM_HINT_T0);  // as in q4_tile
      for (int m = 0; m < MT; ++m) {
#if LMF_VNNI
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax[m], _mm256_sign_epi8(wv, xv[m]));
#else
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[m], _mm256_sign_epi8(wv, xv[m])), ones);
#endif
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), xd[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) y[m * ystride + r] = hsum(acc[r][m]) * scale[r];
}

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

// Cut each part's rows into tiles of rt (a shorter last one), so that no tile spans two parts.
std::vector<Tile> tiles_of(const std::vector<int64_t>& part_rows, int rt) {
  std::vector<Tile> t;
  int64_t n = 0;
  for (size_t i = 0; i < part_rows.size(); ++i) {
    for (int64_t r = 0; r < part_rows[i]; r += rt) {
      const int64_t k = std::min<int64_t>(rt, part_rows[i] - r);
      t.push_back({static_cast<int64_t>(i), r, n + r, k});
    }
    n += part_rows[i];
  }
  return t;
}

constexpr int64_t L2_BLOCK = 192 << 10;  // weight bytes run against every x row before the next ones

// Run fn(tile, m0, mt) over all tiles and all x rows, mt <= MT rows of x at a time, the tiles split across
// threads. A thread's tiles go in blocks of at most L2_BLOCK weight bytes (tile_bytes each), each block against
// all rows of x before the next: with more than MT rows each weight byte is then read from memory once, not
// once per MT rows (SmolLM2's 28 MB int8 LM head at 16 rows: 19 ms per call without the blocks, 10 with them).
template <typename Fn>
void over_tiles(const std::vector<Tile>& tiles, int64_t M, int64_t MT, int64_t tile_bytes, Fn fn) {
  const int64_t nt = static_cast<int64_t>(tiles.size());
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
    over_tiles(tiles_of(rows, sh.rt), route ? 1 : M, sh.mt, tile_bytes, [&](const Tile& t, int64_t m0, int64_t mt) {
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
  over_tiles(tiles_of(rows, sh.rt), route ? 1 : M, sh.mt, sh.rt * K, [&](const Tile& t, int64_t m0, int64_t mt) {
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

// ---- RMSNorm for decode steps ---------------------------------------------------------------------------
// For one token per row, torch's composite CPU rms_norm (pow, mean, add, rsqrt, mul, mul) takes ~16 us for 576
// values, 61 times per SmolLM2 token; this is the same arithmetic in float32 in one pass (~3 us).

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

// ---- attention of one new token (generate's static decode step) -----------------------------------------
// Per layer, the traced step otherwise runs ~20 small ops around SDPA (views, rotary's mul / roll / add, two
// index_copy_ into the cache, SDPA over every column of the static cache, transpose): ~90 us per layer for
// one token, where the arithmetic is a few microseconds. This op does it in one pass and skips the masked
// (not yet written, padding) columns.

// e^x for x <= 0 (softmax after subtracting the max): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the
// Taylor polynomial to r^6 (relative error ~1e-7); below -87 the result is 0.
inline __m256 exp_neg(__m256 x) {
  const __m256 lim = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, lim, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lim);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 = hi + lo, hi exact in float
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Rotate-half rotary on the first `rot` of hd values (cos, signed sin as lmforge's Rotary.cos_sin: the sin's
// first half negated), out[i] = x[i] cos[i] + x[(i + rot/2) % rot] sin[i]; the rest copied.
inline void rotate(const float* x, const float* cs, const float* sn, int64_t rot, int64_t hd, float* out) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < rot; ++i) out[i] = x[i] * cs[i] + x[i < half ? i + half : i - half] * sn[i];
  for (int64_t i = rot; i < hd; ++i) out[i] = x[i];
}

// s[h * ldS + i] = (q_h . k_{idx[i]}) * scale + mask[idx[i]] for RH query heads (q rows of hd) over n columns,
// 4 columns at a time: RH * 4 independent FMA chains (one dot product alone waits on its own FMA latency).
template <int RH>
inline void scores(const float* q, const float* kb, const int32_t* idx, int64_t n, int64_t hd, float scale,
                   const float* mrow, float* s, int64_t ldS) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* kr[4] = {kb + idx[i] * hd, kb + idx[i + 1] * hd, kb + idx[i + 2] * hd, kb + idx[i + 3] * hd};
    __m256 a[RH][4];
    for (int h = 0; h < RH; ++h)
      for (int c = 0; c < 4; ++c) a[h][c] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      __m256 kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = _mm256_loadu_ps(kr[c] + d);
      for (int h = 0; h < RH; ++h) {
        const __m256 qv = _mm256_loadu_ps(q + h * hd + d);
        for (int c = 0; c < 4; ++c) a[h][c] = _mm256_fmadd_ps(qv, kv[c], a[h][c]);
      }
    }
    const __m128 m4 = _mm_setr_ps(mrow[idx[i]], mrow[idx[i + 1]], mrow[idx[i + 2]], mrow[idx[i + 3]]);
    for (int h = 0; h < RH; ++h) {  // the 4 sums of 8 lanes at once
      const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
      const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      _mm_storeu_ps(s + h * ldS + i, _mm_add_ps(_mm_mul_ps(sum, _mm_set1_ps(scale)), m4));
    }
  }
  for (; i < n; ++i)
    for (int h = 0; h < RH; ++h) s[h * ldS + i] = dot(q + h * hd, kb + idx[i] * hd, hd) * scale + mrow[idx[i]];
}

// out[h * hd + d] = inv[h] * sum_i p[h * ldP + i] v_{idx[i]}[d] for NH heads: tiles of NH heads x 16 values (one
// cache line of each value row), so a value row comes from L2 once per NH heads, not once per head; each (head,
// value) accumulates over the columns in their order, one FMA each.
template <int NH>
inline void weigh_values(const float* p, int64_t ldP, const float* vb, const int32_t* idx, int64_t n, int64_t hd,
                         const float* inv, float* out) {
  for (int64_t d0 = 0; d0 < hd; d0 += 16) {
    const bool two = hd - d0 >= 16;
    __m256 a[NH][2];
    for (int h = 0; h < NH; ++h) a[h][0] = a[h][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const float* vr = vb + idx[i] * hd + d0;
      const __m256 v0 = _mm256_loadu_ps(vr), v1 = two ? _mm256_loadu_ps(vr + 8) : v0;
      for (int h = 0; h < NH; ++h) {
        const __m256 w = _mm256_broadcast_ss(p + h * ldP + i);
        a[h][0] = _mm256_fmadd_ps(w, v0, a[h][0]);
        a[h][1] = _mm256_fmadd_ps(w, v1, a[h][1]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      const __m256 iv = _mm256_set1_ps(inv[h]);
      _mm256_storeu_ps(out + h * hd + d0, _mm256_mul_ps(a[h][0], iv));
      if (two) _mm256_storeu_ps(out + h * hd + d0 + 8, _mm256_mul_ps(a[h][1], iv));
    }
  }
}

// q (B, H*hd), k, v (B, KV*hd): this token's projections (rows may be strided views, values contiguous).
// cos, sin (B, rot) or None; kc, vc (B, KV, L, hd) the caches, written at column col[0], or at col[b] for row b
// when col holds B values; mask (B, L) additive (0 or -inf). Returns (B, H*hd): softmax(q k^T * scale + mask) v
// per head, query head h using kv head h / (H/KV). Every column is written before any row attends, so rows may
// share one cache (an expanded view, row stride 0): speculative verification's k + 1 query rows of one sequence,
// each writing its own column and attending over the columns its mask allows, each with the arithmetic of a
// one-row call.
at::Tensor decode_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, at::Tensor kc,
                       at::Tensor vc, const at::Tensor& col, const at::Tensor& mask, double scale) {
  // each (row, kv head) must hold its L x hd values contiguously; the rows and heads may be strided (a
  // continuous-batching cache whose leading padding columns were cut off is such a view)
  TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.strides() == vc.strides() && kc.stride(3) == 1 &&
                  kc.stride(2) == kc.size(3) && kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat &&
                  kc.size(3) % 8 == 0,
              "decode_attn: caches must be float32 (B, KV, L, hd) with contiguous (L, hd) per row and head, hd a "
              "multiple of 8");
  const int64_t B = kc.size(0), KV = kc.size(1), L = kc.size(2), hd = kc.size(3);
  const int64_t sb = kc.stride(0), sg = kc.stride(1);  // element offsets of a row and of a kv head
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2, "decode_attn: q, k, v must be 2-d (B, heads*hd)");
  const int64_t H = q.size(1) / hd;
  TORCH_CHECK(q.size(0) == B && k.size(0) == B && v.size(0) == B &&
                  q.size(1) == H * hd && H % KV == 0 && k.size(1) == KV * hd && v.size(1) == KV * hd &&
                  q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1 && q.scalar_type() == at::kFloat &&
                  k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attn: q (B, H*hd), k, v (B, KV*hd) float32 with contiguous rows");
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.is_contiguous() && mask.numel() == B * L,
              "decode_attn: mask must be a contiguous float32 additive mask of B x L values");
  TORCH_CHECK((col.numel() == 1 || col.numel() == B) && col.is_contiguous() && col.scalar_type() == at::kLong,
              "decode_attn: col must be one int64 or one per row");
  const int64_t* Col = col.data_ptr<int64_t>();
  const int64_t col_step = col.numel() == 1 ? 0 : 1;
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(Col[b * col_step] >= 0 && Col[b * col_step] < L, "decode_attn: column ", Col[b * col_step],
                " outside the cache's ", L);
  const bool has_rope = cos.has_value() && cos->defined();
  int64_t rot = 0;
  if (has_rope) {
    rot = cos->size(-1);
    TORCH_CHECK(sin.has_value() && cos->is_contiguous() && sin->is_contiguous() && cos->numel() == B * rot &&
                    sin->numel() == B * rot && rot <= hd && rot % 2 == 0 && cos->scalar_type() == at::kFloat &&
                    sin->scalar_type() == at::kFloat,
                "decode_attn: cos, sin must be contiguous float32 with B x rot values, rot even and <= hd");
  }
  const int64_t rep = H / KV;
  float *Kc = kc.data_ptr<float>(), *Vc = vc.data_ptr<float>();
  const float *Q = q.data_ptr<float>(), *Kn = k.data_ptr<float>(), *Vn = v.data_ptr<float>();
  const float* Mk = mask.data_ptr<float>();
  const float *Cs = has_rope ? cos->data_ptr<float>() : nullptr, *Sn = has_rope ? sin->data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({B, H * hd}, q.options().memory_format(at::MemoryFormat::Contiguous));
  float* Y = y.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  for (int64_t t = 0; t < B * KV; ++t) {  // every (row, kv head)'s cache column first (a few hd copies)
    const int64_t b = t / KV, g = t % KV, c = Col[b * col_step];
    float* kcol = Kc + b * sb + g * sg + c * hd;
    float* vcol = Vc + b * sb + g * sg + c * hd;
    const float* kn = Kn + b * k.stride(0) + g * hd;
    if (has_rope) rotate(kn, Cs + b * rot, Sn + b * rot, rot, hd, kcol);
    else std::copy(kn, kn + hd, kcol);
    std::copy(Vn + b * v.stride(0) + g * hd, Vn + b * v.stride(0) + (g + 1) * hd, vcol);
  }
  auto task = [&](int64_t t) {  // one (row, kv head): its rep query heads over the columns its mask allows
    const int64_t b = t / KV, g = t % KV;
    std::vector<float> qr(rep * hd), s(rep * L), inv(rep);
    std::vector<int32_t> idx;
    idx.reserve(L);
    const float* mrow = Mk + b * L;
    for (int64_t j = 0; j < L; ++j)
      if (mrow[j] != -INFINITY) idx.push_back(static_cast<int32_t>(j));
    const int64_t n = static_cast<int64_t>(idx.size());
    for (int64_t h = 0; h < rep; ++h) {
      const float* qh = Q + b * q.stride(0) + (g * rep + h) * hd;
      if (has_rope) rotate(qh, Cs + b * rot, Sn + b * rot, rot, hd, qr.data() + h * hd);
      else std::copy(qh, qh + hd, qr.data() + h * hd);
    }
    const float* kb = Kc + b * sb + g * sg;
    const float* vb = Vc + b * sb + g * sg;
    // scores s[h][i] for the compact columns i, tiles of 4 columns x 2 heads (8 accumulators, 4 key rows and a
    // query row in registers: 4 x 4 would spill on 16 registers); a block of 4 columns runs against every head
    // pair before the next block, so its keys come from L2 once, then from L1
    for (int64_t i0 = 0; i0 < n; i0 += 4) {
      const int64_t nc = std::min<int64_t>(4, n - i0);
      for (int64_t h0 = 0; h0 < rep; h0 += 2) {
        const float* qh = qr.data() + h0 * hd;
        float* sh = s.data() + h0 * L + i0;
        if (rep - h0 >= 2) scores<2>(qh, kb, idx.data() + i0, nc, hd, sc, mrow, sh, L);
        else scores<1>(qh, kb, idx.data() + i0, nc, hd, sc, mrow, sh, L);
      }
    }
    for (int64_t h = 0; h < rep; ++h) {
      float* sh = s.data() + h * L;
      float mx = -INFINITY;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sh[i]);
      __m256 tot = _mm256_setzero_ps();
      const __m256 vm = _mm256_set1_ps(mx);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(sh + i), vm));
        _mm256_storeu_ps(sh + i, e);
        tot = _mm256_add_ps(tot, e);
      }
      float sum = hsum(tot);
      for (; i < n; ++i) {
        sh[i] = std::exp(sh[i] - mx);
        sum += sh[i];
      }
      inv[h] = n > 0 ? 1.f / sum : 0.f;
    }
    // out[h] = sum_i p[h][i] v_i / sum[h]: a tile of up to 4 heads x 16 values (one cache line of each value row),
    // so a value row is read from L2 once per head group, not once per head; each (head, value) accumulates over
    // the columns in their order, as one head at a time would
    for (int64_t h0 = 0; h0 < rep; h0 += 4) {
      const float* p0 = s.data() + h0 * L;
      float* out = Y + b * H * hd + (g * rep + h0) * hd;
      switch (std::min<int64_t>(4, rep - h0)) {
        case 4: weigh_values<4>(p0, L, vb, idx.data(), n, hd, inv.data() + h0, out); break;
        case 3: weigh_values<3>(p0, L, vb, idx.data(), n, hd, inv.data() + h0, out); break;
        case 2: weigh_values<2>(p0, L, vb, idx.data(), n, hd, inv.data() + h0, out); break;
        default: weigh_values<1>(p0, L, vb, idx.data(), n, hd, inv.data() + h0, out);
      }
    }
  };
  // a token's attention is a few microseconds of arithmetic per kv head: threads only pay for long caches or
  // several rows
  const int64_t work = B * KV * L * hd * (rep + 1);
  if (work < (int64_t{1} << 19)) {
    for (int64_t t = 0; t < B * KV; ++t) task(t);
  } else {
    at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) task(t);
    });
  }
  return y;
}

// ---- a gated MLP's activation ----------------------------------------------------------------------------
// gu (..., 2F), gate | up side by side (a fused gate|up projection) -> silu(gate) * up (..., F) in one pass,
// instead of chunk, silu and mul (three ops, two intermediate tensors) per layer of a decode step.
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.device().is_cpu() && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.dim() >= 1 &&
                  gu.size(-1) % 2 == 0,
              "silu_mul: gu must be a contiguous float32 CPU tensor with an even last dimension");
  const int64_t F = gu.size(-1) / 2, R = F > 0 ? gu.numel() / (2 * F) : 0;
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end() - 1);
  shape.push_back(F);
  at::Tensor y = at::empty(shape, gu.options());
  const float* X = gu.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (int64_t r = 0; r < R; ++r) {
    const float *g = X + r * 2 * F, *u = g + F;
    float* o = Y + r * F;
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {  // sigmoid(g) = 1 / (1 + e^-g) for g >= 0, e^g / (1 + e^g) below: e^-|g| <= 1
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp_neg(_mm256_or_ps(gv, sign));  // e^-|g|
      const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
      const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), gv);  // sign bit of g picks e / (1 + e)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
    }
    for (; i < F; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("q4_mm(Tensor x, Tensor[] nibbles, Tensor[] scales, Tensor[] mins, int int_rows) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor qweight, Tensor scales, int int_rows) -> Tensor");
  m.def("q8_mm_parts(Tensor x, Tensor[] qweights, Tensor[] scales, int int_rows) -> Tensor");
  m.def("q4_mm_route(Tensor x, Tensor[] nibbles, Tensor[] scales, Tensor[] mins, Tensor route) -> Tensor");
  m.def("q8_mm_route(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor route) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("decode_attn(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, Tensor(a!) kc, Tensor(b!) vc, Tensor col, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
  m.impl("q8_mm_parts", &q8_mm_parts);
  m.impl("q4_mm_route", &q4_mm_route);
  m.impl("q8_mm_route", &q8_mm_route);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attn", &decode_attn);
}
