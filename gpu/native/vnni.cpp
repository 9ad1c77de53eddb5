// Decode (few activation rows) for the packed int4 and int8 formats on x86 CPUs with AVX512-VNNI: integer
// dot products.
//
// Format: packed_format.h (every group's length a multiple of 32; int8 groups at most 4096 long, so the int32
// lanes below cannot overflow).
//
// The activations are quantised per group to 16-bit integers xq = round(x / d), d = max|x| / 32639 (round to
// nearest: an error of at most 1.6e-5 of the group's largest activation, far below bfloat16's 3.9e-3). The
// codes are unsigned: bytes as they are (int8), or one mask or one shift and mask away (int4). Per group:
//     y[m, n] += scale[n, g] * d[m, g] * (q . xq) + min[n, g] * sum(x[m, g])
// the min term on the exact float32 sum of the group's activations. q . xq is exact in int32 lanes, by one of
// two instructions:
// * One activation row (decode): each xq is split into two signed bytes, xq = 256 * hi + lo (hi, lo in
//   [-128, 127]; 32639 = 127 * 256 + 127 keeps hi in range), so VPDPBUSD (four unsigned-by-signed byte products
//   summed into an int32 lane) takes the codes with no widening: one accumulator sums q . hi, another q . lo, and
//   256 * hi_sum + lo_sum is q . xq. Each code is dotted once, so widening it to a word (below) would add a
//   widening per 32 codes and leave the dot instructions as many (one per 32 codes against two per 64).
// * Several activation rows: xq stays one 16-bit word, the codes are widened to words once per step and VPDPWSSD
//   (two word products summed into an int32 lane) dots them with every activation row. As many dot
//   instructions as the byte planes, but one accumulator where they took two and no combine per group, so four
//   output rows by two activation rows fit the registers and share each activation load.
// A lane's true value is at most G/16 * 255 * 32639 < 2^31 for int8 groups up to 4096, G/16 * 15 * 32639 for
// int4 ones under 65536 (the int32 arithmetic wraps, so 256 * hi_sum + lo_sum is exact even where 256 * hi_sum
// alone is not). The activations are laid out in the order the codes are read (below), so every load is one
// contiguous vector.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include "lanes.h"
#include "packed_format.h"

#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__))
#error "lensbench's native kernels need AVX512F, AVX512BW, AVX512VL and AVX512-VNNI"
#endif

namespace {

constexpr int64_t kRows = 4;  // output rows computed together: independent accumulator chains
constexpr int64_t kPrefetch = 4;  // blocks of kRows rows fetched ahead
constexpr float kLevels = 32639.f;  // 127 * 256 + 127: the largest |xq| whose high byte fits a signed byte

struct Activations {
  std::vector<int8_t> hi, lo;  // one row: [K] the bytes of xq = 256 * hi + lo, in the order the codes are read
  std::vector<int16_t> w;      // several rows: [M, K] xq, in the order the codes are read
  std::vector<float> d;        // [M, groups] each group's scale
  std::vector<float> sum;      // [M, groups] exact float32 sum of each group's activations
  // one activation row: d and sum tiled, tiled_d[j] = d[j % groups] for j < groups + 16, so the factors of any 16
  // consecutive (row, group) entries of a weight's scales read one contiguous vector of each (`decode_factors`)
  std::vector<float> tiled_d, tiled_sum;
};

// Where the kernel reads the codes of a group of `len` inputs: int8 in input order; int4 in steps of 64, then
// 32, then 16 packed bytes at byte b, each step the low nibbles' inputs [b, b + s) then the high nibbles'
// [len/2 + b, len/2 + b + s). `emit(from, count)` is called for each contiguous run of inputs, in that order.
template <typename Emit>
void read_order(int64_t bits, int64_t len, Emit emit) {
  if (bits == 8) { emit(0, len); return; }
  const int64_t half = len / 2;
  int64_t b = 0;
  for (const int64_t step : {64, 32, 16})
    for (; b + step <= half; b += step) { emit(b, step); emit(half + b, step); }
}

// Into `a` (the calling thread's buffers, reused from call to call: no allocation per call once they are large
// enough).
void quantize(const float* x, int64_t m_rows, int64_t k, int64_t group, int64_t bits, Activations& a) {
  const int64_t groups = (k + group - 1) / group;
  const bool words = m_rows > 1;
  if (words) {
    a.w.resize(m_rows * k);
  } else {  // 64 bytes more, zero: a step of fewer than 64 codes still loads 64 activation bytes (times zero codes)
    a.hi.assign(k + 64, 0);
    a.lo.assign(k + 64, 0);
  }
  a.d.resize(m_rows * groups);
  a.sum.resize(m_rows * groups);
  const __m512i half_step = _mm512_set1_epi32(128);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t g0 = gi * group, len = std::min(group, k - g0);  // a multiple of 32
      const float* xg = x + m * k + g0;
      __m512 amax = _mm512_setzero_ps(), s = _mm512_setzero_ps();
      for (int64_t i = 0; i < len; i += 16) {
        const __m512 v = _mm512_loadu_ps(xg + i);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        s = _mm512_add_ps(s, v);
      }
      const float d = _mm512_reduce_max_ps(amax) / kLevels;
      const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
      int16_t* wq = words ? a.w.data() + m * k + g0 : nullptr;
      int8_t* hi = words ? nullptr : a.hi.data() + g0;
      int8_t* lo = words ? nullptr : a.lo.data() + g0;
      read_order(bits, len, [&](int64_t from, int64_t count) {
        for (int64_t i = 0; i < count; i += 16) {
          const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + from + i), inv));  // to nearest
          if (words) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(wq), _mm512_cvtepi32_epi16(q));
            wq += 16;
          } else {
            const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, half_step), 8);
            const __m512i l = _mm512_sub_epi32(q, _mm512_slli_epi32(h, 8));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtepi32_epi8(h));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtepi32_epi8(l));
            hi += 16;
            lo += 16;
          }
        }
      });
      a.d[m * groups + gi] = d;
      a.sum[m * groups + gi] = _mm512_reduce_add_ps(s);
    }
  }
  if (!words) {
    a.tiled_d.resize(groups + 16);
    a.tiled_sum.resize(groups + 16);
    for (int64_t j = 0; j < groups + 16; ++j) {
      a.tiled_d[j] = a.d[j % groups];
      a.tiled_sum[j] = a.sum[j % groups];
    }
  }
}

// Into L1: every cache line of [p, p + bytes).
inline void prefetch(const void* p, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t line = first; line < end; line += 64) _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
}

inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m128i load128(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// The lane sums of four vectors: {sum(v0), sum(v1), sum(v2), sum(v3)} (a tree of adds, not four reductions).
inline __m128 sum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  // halves: 8 lanes each, then pairs of vectors into one 512-bit register
  const __m256 a0 = _mm256_add_ps(_mm512_castps512_ps256(v0), _mm512_extractf32x8_ps(v0, 1));
  const __m256 a1 = _mm256_add_ps(_mm512_castps512_ps256(v1), _mm512_extractf32x8_ps(v1, 1));
  const __m256 a2 = _mm256_add_ps(_mm512_castps512_ps256(v2), _mm512_extractf32x8_ps(v2, 1));
  const __m256 a3 = _mm256_add_ps(_mm512_castps512_ps256(v3), _mm512_extractf32x8_ps(v3, 1));
  const __m256 h01 = _mm256_hadd_ps(a0, a1);  // per 128-bit half: a0 pairs, a1 pairs
  const __m256 h23 = _mm256_hadd_ps(a2, a3);
  const __m256 h = _mm256_hadd_ps(h01, h23);  // per half: {a0, a1, a2, a3} partial sums
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[r] = the lane sum of v[r] for r < R (four at a time by `sum4`).
template <int R>
inline void store_sums(float* out, const __m512 (&v)[R]) {
  if constexpr (R == 4) {
    _mm_storeu_ps(out, sum4(v[0], v[1], v[2], v[3]));
  } else {
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(v[r]);
  }
}

// Decode: one group's integer dot products of output rows [0, R) of `pg` (rows `row_bytes` apart) with the one
// activation row (`xh`, `xl` at the group's first input): hs[r] += q . hi, ls[r] += q . lo in int32 lanes.
template <int BITS, int R>
inline void group_dots(const uint8_t* pg, int64_t row_bytes, const int8_t* xh, const int8_t* xl, int64_t len,
                       __m512i (&hs)[R], __m512i (&ls)[R]) {
  // 64 codes of output row r (unsigned bytes; zero where fewer) times activation bytes [at, at + 64)
  auto dot = [&](int r, __m512i codes, int64_t at) {
    hs[r] = _mm512_dpbusd_epi32(hs[r], codes, load512(xh + at));
    ls[r] = _mm512_dpbusd_epi32(ls[r], codes, load512(xl + at));
  };
  const __m512i mask = _mm512_set1_epi8(0x0F);
  if constexpr (BITS == 8) {  // 64 codes a step, then 32
    int64_t b = 0;
    for (; b + 64 <= len; b += 64)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) dot(r, load512(pg + r * row_bytes + b), b);
    if (b < len)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) dot(r, _mm512_zextsi256_si512(load256(pg + r * row_bytes + b)), b);
  } else {  // a step of s bytes at b: the low nibbles' s codes, then the high nibbles' (the activations' order)
    const int64_t half = len / 2;
    int64_t b = 0;
    for (; b + 64 <= half; b += 64)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i w = load512(pg + r * row_bytes + b);
        dot(r, _mm512_and_si512(w, mask), 2 * b);
        dot(r, _mm512_and_si512(_mm512_srli_epi16(w, 4), mask), 2 * b + 64);
      }
    if (b + 32 <= half) {
      const __m256i m = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i w = load256(pg + r * row_bytes + b);
        const __m256i l = _mm256_and_si256(w, m), h = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
        dot(r, _mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1), 2 * b);
      }
      b += 32;
    }
    if (b < half) {  // 16 bytes left (a group of 32, or 32 more)
      const __m128i m = _mm_set1_epi8(0x0F);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m128i w = load128(pg + r * row_bytes + b);
        const __m128i l = _mm_and_si128(w, m), h = _mm_and_si128(_mm_srli_epi16(w, 4), m);
        dot(r, _mm512_zextsi256_si512(_mm256_set_m128i(h, l)), 2 * b);
      }
    }
  }
}

// Several activation rows: one group's dot products of output rows [0, R) of `pg` (rows `row_bytes` apart) with
// activation rows [0, MB) (`xw` at the group's first input, rows k apart): acc[r][m] += q . xq in int32 lanes.
// Each step widens R rows' codes to words once, and each activation vector is loaded once for the R rows.
template <int BITS, int R, int MB>
inline void group_words(const uint8_t* pg, int64_t row_bytes, const int16_t* xw, int64_t k, int64_t len,
                        __m512i (&acc)[R][MB]) {
  // c[r]: output row r's 32 codes for activation positions [at, at + 32)
  auto dots = [&](const __m512i (&c)[R], int64_t at) {
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      __m512i x = load512(xw + m * k + at);
      // a register, not R memory operands: left to itself GCC folds the load into every VPDPWSSD (R loads)
      asm("" : "+v"(x));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], c[r], x);
    }
  };
  __m512i c[R];
  if constexpr (BITS == 8) {  // 32 codes a step
    for (int64_t b = 0; b < len; b += 32) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) c[r] = _mm512_cvtepu8_epi16(load256(pg + r * row_bytes + b));
      dots(c, b);
    }
  } else {  // 32 bytes at b: their low nibbles, then their high nibbles, where read_order put them
    const __m512i mask = _mm512_set1_epi16(0x0F);
    const int64_t half = len / 2;
    int64_t b = 0;
    for (; b + 32 <= half; b += 32) {
      // read_order's step holding byte b: 64 bytes at `base` (this is its first or second half) or 32 at b
      const int64_t base = b & ~int64_t{63}, step = base + 64 <= half ? 64 : 32, lo_at = 2 * base + (b - base);
      __m512i w[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) w[r] = _mm512_cvtepu8_epi16(load256(pg + r * row_bytes + b));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) c[r] = _mm512_and_si512(w[r], mask);
      dots(c, lo_at);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) c[r] = _mm512_srli_epi16(w[r], 4);  // a byte widened: no mask needed
      dots(c, lo_at + step);
    }
    if (b < half) {  // 16 bytes left: one vector, low nibbles then high
      const __m256i m16 = _mm256_set1_epi16(0x0F);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm256_cvtepu8_epi16(load128(pg + r * row_bytes + b));
        c[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w, m16)), _mm256_srli_epi16(w, 4), 1);
      }
      dots(c, 2 * b);
    }
  }
}

// The float32 value of each lane's exact q . xq, from its two byte planes' sums.
inline __m512 combined(__m512i hs, __m512i ls) {
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hs, 8), ls));
}

// Decode's per-group factors for `count` consecutive (row, group) entries of the weight's scales and mins, as
// they are stored: sd = scale * d and mt = min * sum(x) of the one activation row, 16 entries a vector whatever
// the rows' boundaries (d and sum read from their tiled copies at the first entry's group): a block of 4 rows of
// 5 groups is 2 vectors, where a masked loop per row took 4.
void decode_factors(const c10::Half* scales, const c10::Half* mins, int64_t count, int64_t groups,
                    const Activations& a, float* sd, float* mt) {
  int64_t j = 0;  // the group of entry i
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 k16 = lensbench_native::tail(count - i);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k16, scales + i));
    const __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k16, mins + i));
    _mm512_mask_storeu_ps(sd + i, k16, _mm512_mul_ps(s, _mm512_loadu_ps(a.tiled_d.data() + j)));
    _mm512_mask_storeu_ps(mt + i, k16, _mm512_mul_ps(m, _mm512_loadu_ps(a.tiled_sum.data() + j)));
    j = (j + 16) % groups;
  }
}

// Decode: output rows [n0, n0 + R) for the one activation row; `sd`, `mt` their factors (`decode_factors`).
template <int BITS, int R>
void decode_rows(const uint8_t* packed, const float* sd, const float* mt, const Activations& a, int64_t n0,
                 int64_t k, int64_t group, int64_t groups, float* y) {
  const int64_t row_bytes = k * BITS / 8;
  __m512 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {  // from the min terms' lanes
    acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16)
      acc[r] = _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(lensbench_native::tail(groups - g), mt + r * groups + g));
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t g0 = gi * group;
    __m512i hs[R], ls[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) hs[r] = ls[r] = _mm512_setzero_si512();
    group_dots<BITS, R>(packed + n0 * row_bytes + g0 * BITS / 8, row_bytes, a.hi.data() + g0, a.lo.data() + g0,
                        std::min(group, k - g0), hs, ls);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(combined(hs[r], ls[r]), _mm512_set1_ps(sd[r * groups + gi]), acc[r]);
  }
  store_sums<R>(y + n0, acc);
}

// Several activation rows: output rows [n0, n0 + R) for activation rows [m0, m0 + MB). `sd` [R][MB][groups]: scale
// * d; `minterm` [R][MB]: lanes summing to sum_g min * sum(x).
template <int BITS, int R, int MB>
void rows(const uint8_t* packed, const float* sd, const __m512* minterm, const Activations& a, int64_t m0, int64_t n0,
          int64_t n, int64_t k, int64_t group, int64_t groups, float* y) {
  const int64_t row_bytes = k * BITS / 8;
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = minterm[r * MB + m];
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t g0 = gi * group;
    __m512i dots[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) dots[r][m] = _mm512_setzero_si512();
    group_words<BITS, R, MB>(packed + n0 * row_bytes + g0 * BITS / 8, row_bytes, a.w.data() + m0 * k + g0, k,
                             std::min(group, k - g0), dots);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r][m]), _mm512_set1_ps(sd[(r * MB + m) * groups + gi]),
                                    acc[r][m]);
  }
  for (int m = 0; m < MB; ++m) {
    __m512 column[R];
    for (int r = 0; r < R; ++r) column[r] = acc[r][m];
    store_sums<R>(y + (m0 + m) * n + n0, column);
  }
}

// `sd` and `minterm` of `rows` for output row n0 and activation rows [m0, m0 + mb), 16 groups at a time.
// `minterm` [mb] holds 16 lanes each whose sum is sum_g min * sum(x): `rows` starts its accumulators from them,
// so one horizontal sum per output serves both terms.
void group_factors(const c10::Half* scales, const c10::Half* mins, const Activations& a, int64_t m0, int64_t mb,
                   int64_t n0, int64_t groups, float* sd, __m512* minterm) {
  const c10::Half* s = scales + n0 * groups;
  const c10::Half* mn = mins + n0 * groups;
  for (int64_t m = 0; m < mb; ++m) {
    const float* d = a.d.data() + (m0 + m) * groups;
    const float* sum = a.sum.data() + (m0 + m) * groups;
    __m512 t = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 k16 = lensbench_native::tail(groups - g);
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k16, s + g));
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k16, mn + g));
      _mm512_mask_storeu_ps(sd + m * groups + g, k16, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k16, d + g)));
      t = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k16, sum + g), t);
    }
    minterm[m] = t;
  }
}

// Output rows [n0, n0 + R) and activation rows [m0, m0 + MB); `scratch` holds R * MB * groups floats.
template <int BITS, int R, int MB>
void run(const uint8_t* pp, const c10::Half* sp, const c10::Half* mp, const Activations& a, int64_t m0, int64_t n0,
         int64_t n, int64_t k, int64_t group, int64_t groups, float* scratch, float* y) {
  __m512 minterm[R * MB];
  for (int r = 0; r < R; ++r)
    group_factors(sp, mp, a, m0, MB, n0 + r, groups, scratch + r * MB * groups, minterm + r * MB);
  rows<BITS, R, MB>(pp, scratch, minterm, a, m0, n0, n, k, group, groups, y);
}

// Output rows [n0, n0 + r), r <= kRows. One activation row: `sd`, `mt` the rows' factors (`decode_factors`).
template <int BITS>
void decode_block(const uint8_t* pp, const float* sd, const float* mt, const Activations& a, int64_t n0, int64_t r,
                  int64_t k, int64_t group, int64_t groups, float* y) {
  switch (r) {
    case 4: decode_rows<BITS, 4>(pp, sd, mt, a, n0, k, group, groups, y); break;
    case 3: decode_rows<BITS, 3>(pp, sd, mt, a, n0, k, group, groups, y); break;
    case 2: decode_rows<BITS, 2>(pp, sd, mt, a, n0, k, group, groups, y); break;
    default: decode_rows<BITS, 1>(pp, sd, mt, a, n0, k, group, groups, y); break;
  }
}

// Output rows [n0, n0 + R), the activation rows two at a time (the last one alone where m_rows is odd).
template <int BITS, int R>
void pairs(const uint8_t* pp, const c10::Half* sp, const c10::Half* mp, const Activations& a, int64_t m_rows,
           int64_t n0, int64_t n, int64_t k, int64_t group, int64_t groups, float* scratch, float* y) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += 2) {
    if (m0 + 2 <= m_rows) run<BITS, R, 2>(pp, sp, mp, a, m0, n0, n, k, group, groups, scratch, y);
    else run<BITS, R, 1>(pp, sp, mp, a, m0, n0, n, k, group, groups, scratch, y);
  }
}

// Several activation rows (`m_rows`): a whole block (kRows output rows) together (8 int32 and 8 float32
// accumulators: more would not fit AVX-512's 32 registers with the codes); a short last block a row at a time.
// `scratch` holds kRows * 2 * groups floats.
template <int BITS>
void multi_block(const uint8_t* pp, const c10::Half* sp, const c10::Half* mp, const Activations& a, int64_t m_rows,
                 int64_t n0, int64_t r, int64_t n, int64_t k, int64_t group, int64_t groups, float* scratch, float* y) {
  if (r == kRows) {
    pairs<BITS, kRows>(pp, sp, mp, a, m_rows, n0, n, k, group, groups, scratch, y);
  } else {
    for (int64_t i = n0; i < n0 + r; ++i) pairs<BITS, 1>(pp, sp, mp, a, m_rows, i, n, k, group, groups, scratch, y);
  }
}

at::Tensor packed_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t group, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  lensbench_native::check_packed("packed_mm", packed, scales, mins, x.size(1), group, bits);
  const int64_t m_rows = x.size(0), k = x.size(1), n = packed.size(0), groups = scales.size(1);
  at::Tensor y = at::empty({m_rows, n}, x.options());
  // the caller's buffers, named by a reference: inside the parallel region the name of a thread_local would be
  // each worker's own (empty) instance
  thread_local Activations buffers;
  Activations& a = buffers;
  quantize(x.data_ptr<float>(), m_rows, k, group, bits, a);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const c10::Half* mp = mins.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (n + kRows - 1) / kRows, block_bytes = kRows * (k * bits / 8);
  // Small tasks (16 blocks = 64 rows): a thread the OS preempts holds up the others for less. Each block's
  // rows are dotted with every activation row while they sit in L1, and the block kPrefetch blocks ahead (its
  // codes, scales and mins) is fetched meanwhile: a decode-size matrix is too short a stream for the hardware
  // prefetcher to ramp up.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> scratch;
    scratch.resize(2 * kRows * groups);  // decode: sd and mt of a block; several rows: sd of a block
    for (int64_t b = b0; b < b1; ++b) {
      if (b + kPrefetch < b1) {
        const int64_t ahead = (b + kPrefetch) * kRows;
        prefetch(pp + ahead * (k * bits / 8), block_bytes);
        prefetch(sp + ahead * groups, kRows * groups * 2);
        prefetch(mp + ahead * groups, kRows * groups * 2);
      }
      const int64_t n0 = b * kRows, r = std::min(kRows, n - n0);
      if (m_rows == 1) {
        float* sd = scratch.data();
        float* mt = sd + r * groups;
        decode_factors(sp + n0 * groups, mp + n0 * groups, r * groups, groups, a, sd, mt);
        if (bits == 4) decode_block<4>(pp, sd, mt, a, n0, r, k, group, groups, yp);
        else decode_block<8>(pp, sd, mt, a, n0, r, k, group, groups, yp);
      } else if (bits == 4) {
        multi_block<4>(pp, sp, mp, a, m_rows, n0, r, n, k, group, groups, scratch.data(), yp);
      } else {
        multi_block<8>(pp, sp, mp, a, m_rows, n0, r, n, k, group, groups, scratch.data(), yp);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(lensbench_native, lib) {
  lib.def("packed_mm(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(lensbench_native, CPU, lib) {
  lib.impl("packed_mm", &packed_mm);
}
