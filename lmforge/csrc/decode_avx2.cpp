// The decode step's other ops, one pass each, for x86 CPUs with AVX2 and FMA: RMSNorm, the attention of one new
// token over its cache (rotary applied on the way in), and a gated MLP's activation. Registered next to the matmuls
// of qmm_avx2.cpp (one library, built from both files by lmforge.cpu_kernels).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "avx2_common.h"

namespace {

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

constexpr int64_t KAHEAD = 16;  // key rows prefetched this many columns ahead (decode_attn)

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
      // the cache was evicted by the layer's weights since the last token: ask for the key rows a few blocks
      // ahead and for this block's value rows (read after the softmax) while the scores run
      for (int64_t c = 0; c < nc; ++c) {
        const char* kr = reinterpret_cast<const char*>(kb + idx[std::min(n - 1, i0 + KAHEAD + c)] * hd);
        const char* vr = reinterpret_cast<const char*>(vb + idx[i0 + c] * hd);
        for (int64_t l = 0; l < hd * 4; l += 64) {
          _mm_prefetch(kr + l, _MM_HINT_T0);
          _mm_prefetch(vr + l, _MM_HINT_T1);
        }
      }
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

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("decode_attn(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, Tensor(a!) kc, Tensor(b!) vc, Tensor col, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attn", &decode_attn);
}
