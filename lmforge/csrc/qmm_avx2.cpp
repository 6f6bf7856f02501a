// Matrix products with int4 / int8 weights and int8 activation blocks, for x86 CPUs with AVX2 and FMA (the decode
// step's other ops are in decode_avx2.cpp).
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

// x (M, K) -> xq int8 (M, K), sx (M, K/32) block scales, xs (M, K/32) block sums of the rounded x. Vectorised:
// the same float operations per value as x * (1 / (amax / 127)) rounded to nearest even, in 8 lanes.
// permute: the order in which the int4 kernel unpacks nibbles (low nibble = even column, high = odd). It
// takes blocks two at a time (one 32-byte load of nibbles): a pair b, b+1 is stored as [16 even columns of b |
// 16 even of b+1 | 16 odd of b | 16 odd of b+1]; a last unpaired block (odd K/32) as [16 even | 16 odd].
void quantize_rows(const float* x, int64_t M, int64_t K, bool permute, int8_t* xq, float* sx, float* xs) {
  const int64_t nb = K / QB;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * K + b * QB;
      __m256 f[4];
      for (int i = 0; i < 4; ++i) f[i] = _mm256_loadu_ps(v + 8 * i);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(f[0], absmask), _mm256_and_ps(f[1], absmask)),
                                _mm256_max_ps(_mm256_and_ps(f[2], absmask), _mm256_and_ps(f[3], absmask)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      const __m256 vi = _mm256_set1_ps(inv);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(f[i], vi));
      const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      const int sum = _mm_cvtsi128_si32(s);
      const __m256i p = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);  // 32 x int8 in order
      if (!permute) {  // (the values fit int8: |v * inv| <= 127; cvtps rounds to nearest even, as nearbyint)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * QB), p);
      } else {
        // [16 evens | 16 odds]: each 128-bit lane split into its evens and odds, then the halves regrouped
        const __m256i eo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(p, split), 0xD8);
        const bool paired = b + 1 < nb || (b & 1);
        int8_t* out = xq + m * K + (paired ? (b & ~int64_t{1}) * QB : b * QB);
        const int off = paired ? 16 * static_cast<int>(b & 1) : 0, odd = paired ? 32 : 16;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + off), _mm256_castsi256_si128(eo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + odd + off), _mm256_extracti128_si256(eo, 1));
      }
      sx[m * nb + b] = d;
      // the sum of the *rounded* block: the min term then sees the same x as the q term, so the rounding
      // error meets w = q * scale + min whole (not the uncentred q * scale, ~2x larger for int4 blocks)
      xs[m * nb + b] = d * static_cast<float>(sum);
    }
  }
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

// Each part's rows cut into tiles of rt (a shorter last one), so that no tile spans two parts; a tile is computed
// from its index, not stored (a stored list cost ~1-2 ms per call for a 152k-row LM head, ~0.1 ms for a 16k-row
// gate|up, grown by reallocation on every call).
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
