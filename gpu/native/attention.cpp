// Attention for a few query tokens over a key/value cache, on x86 CPUs with AVX-512, in float32:
//     out[b, q, h] = softmax_j(scaling * q[b, h, q] . k[b, h / G, j])  . v[b, h / G, j]
// over the positions j that the boolean mask keeps (all of them without a mask), G query heads sharing each
// key/value head. Positions the mask drops are never read: a static cache of L positions holding t tokens costs
// t dot products per head, not L (the masked matmul + softmax of transformers' eager attention computes all L).
// A query row whose mask keeps no position gets zeros (eager attention's additive mask would give the average
// of the values, SDPA NaN).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "lanes.h"

#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

// exp(x) for x <= 0 (scores less their maximum): x = n ln2 + r, |r| <= ln2 / 2, exp(r) = 1 + r + r^2 P(r) with
// Cephes' expf polynomial (relative error about 1e-7), times 2^n by VSCALEFPS; below -87 it is at most 2^-125.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact to float
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

using lensbench_native::tail;

// Lane j of the result: the sum of v[j]'s lanes (a transposing tree of adds, not 16 reductions).
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i]'s pair sums at 0 and 2, v[2i + 1]'s at 1 and 3
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i], ..., v[4i + 3]
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // across the four 128-bit lanes: block k of the result holds b[k]'s four sums
  const __m512 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, 0x88), _mm512_shuffle_f32x4(d01, d23, 0xDD));
}

// The G query rows that share one key/value head: row g's query at qv + g * qg, D <= 16 * ND; keys and values at
// `kp`, `vp` with position strides `kj`, `vj`; `keep(g, j0, n)` which of positions [j0, j0 + n), n <= 16, row g
// attends (bit t: position j0 + t); `s` holds G * (len + 32) floats of scratch; row g's output at out + g * og.
// Each block of 16 key (then value) rows is read from memory once and used by all G rows while it sits in L1.
// Scores are made 16 positions at a time (one vector per position over D, then one transposing sum); the values
// are summed position by position into ND independent accumulators.
template <int ND, typename Keep>
void one_group(int64_t G, const float* qv, int64_t qg, const float* kp, const float* vp, int64_t kj, int64_t vj,
               int64_t len, int64_t d, float scaling, Keep keep, float* s, float* out, int64_t og) {
  constexpr float kDropped = -std::numeric_limits<float>::infinity();
  const __m512 dropped = _mm512_set1_ps(kDropped);
  const int64_t stride = len + 32;  // of `s` per row
  for (int64_t g = 0; g < G; ++g) s[g * stride + stride - 1] = kDropped;  // the row's running maximum
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - j0);
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s + g * stride;
      const __mmask16 kept = keep(g, j0, n);
      if (!kept) {  // a stretch the mask drops (a static cache's empty tail): not read
        _mm512_storeu_ps(sg + j0, dropped);
        continue;
      }
      __m512 q[ND];
      for (int c = 0; c < ND; ++c) q[c] = _mm512_maskz_loadu_ps(tail(d - 16 * c), qv + g * qg + 16 * c);
      __m512 dots[16];
      for (int t = 0; t < 16; ++t) {
        dots[t] = _mm512_setzero_ps();
        if (!(kept >> t & 1)) continue;
        const float* kr = kp + (j0 + t) * kj;
        for (int c = 0; c < ND; ++c)
          dots[t] = _mm512_fmadd_ps(q[c], _mm512_maskz_loadu_ps(tail(d - 16 * c), kr + 16 * c), dots[t]);
      }
      const __m512 sv = _mm512_mask_mov_ps(dropped, kept, _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scaling)));
      _mm512_storeu_ps(sg + j0, sv);
      sg[stride - 1] = std::max(sg[stride - 1], _mm512_reduce_max_ps(sv));
    }
  }
  thread_local std::vector<float> inv;  // this thread's: no allocation per task once it is G long
  inv.assign(G, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * stride;
    float* o = out + g * og;
    for (int c = 0; c < ND; ++c) _mm512_mask_storeu_ps(o + 16 * c, tail(d - 16 * c), _mm512_setzero_ps());
    const float top = sg[stride - 1];
    if (top == kDropped) {  // nothing attended: zeros, and no value is read for it
      for (int64_t j = 0; j < len; j += 16) _mm512_storeu_ps(sg + j, _mm512_setzero_ps());
      continue;
    }
    const __m512 topb = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {  // dropped positions: probability 0 exactly
      const __m512 x = _mm512_loadu_ps(sg + j);
      const __mmask16 kept = _mm512_mask_cmp_ps_mask(tail(len - j), x, dropped, _CMP_NEQ_OQ);
      const __m512 p = _mm512_maskz_mov_ps(kept, exp_nonpositive(_mm512_sub_ps(x, topb)));
      _mm512_storeu_ps(sg + j, p);
      total = _mm512_add_ps(total, p);
    }
    inv[g] = 1.f / _mm512_reduce_add_ps(total);
  }
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    for (int64_t g = 0; g < G; ++g) {
      const float* sg = s + g * stride;
      const __mmask16 nonzero = _mm512_mask_cmp_ps_mask(tail(len - j0), _mm512_loadu_ps(sg + j0),
                                                        _mm512_setzero_ps(), _CMP_NEQ_OQ);
      if (!nonzero) continue;
      float* o = out + g * og;
      __m512 acc[ND];
      for (int c = 0; c < ND; ++c) acc[c] = _mm512_maskz_loadu_ps(tail(d - 16 * c), o + 16 * c);
      for (int t = 0; t < 16; ++t) {
        if (!(nonzero >> t & 1)) continue;
        const __m512 p = _mm512_set1_ps(sg[j0 + t]);
        const float* vr = vp + (j0 + t) * vj;
        for (int c = 0; c < ND; ++c)
          acc[c] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(tail(d - 16 * c), vr + 16 * c), acc[c]);
      }
      for (int c = 0; c < ND; ++c) _mm512_mask_storeu_ps(o + 16 * c, tail(d - 16 * c), acc[c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < ND; ++c) {
      float* o = out + g * og + 16 * c;
      _mm512_mask_storeu_ps(o, tail(d - 16 * c), _mm512_mul_ps(_mm512_maskz_loadu_ps(tail(d - 16 * c), o),
                                                                 _mm512_set1_ps(inv[g])));
    }
}

// one_group for the smallest ND of 1, 2, 4, 8, 16 that holds D (at most 256)
template <typename Keep>
void any_group(int64_t G, const float* qv, int64_t qg, const float* kp, const float* vp, int64_t kj, int64_t vj,
               int64_t len, int64_t d, float scaling, Keep keep, float* s, float* out, int64_t og) {
  if (d <= 16) one_group<1>(G, qv, qg, kp, vp, kj, vj, len, d, scaling, keep, s, out, og);
  else if (d <= 32) one_group<2>(G, qv, qg, kp, vp, kj, vj, len, d, scaling, keep, s, out, og);
  else if (d <= 64) one_group<4>(G, qv, qg, kp, vp, kj, vj, len, d, scaling, keep, s, out, og);
  else if (d <= 128) one_group<8>(G, qv, qg, kp, vp, kj, vj, len, d, scaling, keep, s, out, og);
  else one_group<16>(G, qv, qg, kp, vp, kj, vj, len, d, scaling, keep, s, out, og);
}

// q [B, H, Q, D], k and v [B, Hkv, L, D] (H a multiple of Hkv; D contiguous in each), mask bool broadcastable to
// [B, H, Q, L] or none -> out [B, Q, H, D] (the layout transformers' attention functions return).
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const std::optional<at::Tensor>& mask, double scaling) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "decode_attention: q, k, v must be 4-d");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "decode_attention: float32 q, k, v");
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), len = k.size(2);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch && v.size(1) == kv_heads && v.size(2) == len &&
              k.size(3) == d && v.size(3) == d && kv_heads > 0 && heads % kv_heads == 0 && d <= 256,
              "decode_attention: k and v [B, Hkv, L, D] with the query's B and D (at most 256), H a multiple of Hkv");
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4, "decode_attention: the mask must be 4-d bool");
    m = mask->expand({batch, heads, rows, len});
  }
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const int64_t ms0 = m.defined() ? m.stride(0) : 0, ms1 = m.defined() ? m.stride(1) : 0;
  const int64_t ms2 = m.defined() ? m.stride(2) : 0, ms3 = m.defined() ? m.stride(3) : 0;
  at::Tensor out = at::empty({batch, rows, heads, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = heads / kv_heads, tasks = batch * kv_heads * rows;  // a task: the heads of one kv head
  // Parallel only where the work outweighs waking the other threads (9 heads x 162 positions x 64 is not).
  const int64_t grain = batch * heads * rows * len * d > (1 << 18) ? 1 : tasks;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scores;
    scores.resize(group * (len + 32));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (kv_heads * rows), hk = t / rows % kv_heads, r = t % rows, h0 = hk * group;
      const float* qv = qp + b * q.stride(0) + h0 * q.stride(1) + r * q.stride(2);
      const float* kr = kp + b * k.stride(0) + hk * k.stride(1);
      const float* vr = vp + b * v.stride(0) + hk * v.stride(1);
      float* o = op + ((b * rows + r) * heads + h0) * d;
      const float sc = static_cast<float>(scaling);
      const bool* mr = mp ? mp + b * ms0 + h0 * ms1 + r * ms2 : nullptr;  // row g's mask at mr + g * ms1
      auto run = [&](auto keep) {
        any_group(group, qv, q.stride(1), kr, vr, k.stride(2), v.stride(2), len, d, sc, keep, scores.data(), o, d);
      };
      if (!mp) {
        run([](int64_t, int64_t, int64_t n) { return tail(n); });
      } else if (ms3 == 1) {  // 16 mask bytes at a time
        run([&](int64_t g, int64_t j0, int64_t n) {
          const __m128i m = _mm_maskz_loadu_epi8(tail(n), mr + g * ms1 + j0);
          return static_cast<__mmask16>(_mm_test_epi8_mask(m, m));
        });
      } else {
        run([&](int64_t g, int64_t j0, int64_t n) {
          __mmask16 kept = 0;
          for (int64_t t = 0; t < n; ++t) kept |= static_cast<__mmask16>(mr[g * ms1 + (j0 + t) * ms3] ? 1u << t : 0u);
          return kept;
        });
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lensbench_native, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(lensbench_native, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
}
