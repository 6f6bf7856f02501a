// The int4 / int8 product tiles of qmm_avx2.cpp (included by it alone): the activations' int8 quantization, the
// scale loads, and the register tiles of one weight row block against a few rows of x.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "avx2_common.h"

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

}  // namespace
