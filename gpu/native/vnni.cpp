// Decode (few activation rows) for the packed int4 and int8 formats on x86 CPUs with AVX512-VNNI: integer
// dot products.
//
// Format (gpu/quant.py): a row of W [N, K] is groups of G consecutive inputs, w_hat = q * scale + min, scale
// and min float16 per (row, group). int8: one code per byte. int4: a group's G/2 bytes hold q[j] in the low
// nibble of byte j and q[j + G/2] in the high one. Here every group's length is a multiple of 32 (the Python
// side checks), and int8 groups are at most 4096 long (so the int32 lanes below cannot overflow).
//
// The activations are quantised per group to int16 (d = max|x| / 32767, round to nearest: a relative error
// of at most 1.5e-5 of the group's largest activation, far below bfloat16's 3.9e-3) and kept in input order.
// int4: 64 packed bytes of a group hold, in their low nibbles, the codes of 64 consecutive inputs and, in their
// high nibbles, those of the 64 inputs G/2 later: one mask and one shift give them. The codes are widened to
// 16 bits and multiplied with the activations by VPDPWSSD (pairs of 16-bit products summed into int32 lanes,
// exact: a lane holds at most G/32 * 2 * 15 * 32767 < 2^31 for int4 groups under 65536, and G/32 * 2 * 255 *
// 32767 for int8 ones, under 2^31 up to G = 4096). Per group:
//     y[m, n] += scale[n, g] * d[m, g] * (q . xq) + min[n, g] * sum(x[m, g])
// the min term on the exact float32 sum of the group's activations.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>

#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
#error "lensbench's native kernels need AVX512F, AVX512BW and AVX512-VNNI"
#endif

namespace {

constexpr int64_t kRows = 4;  // output rows computed together: independent accumulator chains
constexpr int64_t kPrefetch = 4;  // blocks of kRows rows fetched ahead

struct Activations {
  std::vector<int16_t> q;  // [M, K] int16, in input order
  std::vector<float> d;    // [M, groups] each group's scale
  std::vector<float> sum;  // [M, groups] exact float32 sum of each group's activations
};

Activations quantize(const float* x, int64_t m_rows, int64_t k, int64_t group) {
  const int64_t groups = (k + group - 1) / group;
  Activations a{std::vector<int16_t>(m_rows * k), std::vector<float>(m_rows * groups),
                std::vector<float>(m_rows * groups)};
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t g0 = gi * group, len = std::min(group, k - g0);
      const float* xg = x + m * k + g0;
      float amax = 0.f, s = 0.f;
      for (int64_t i = 0; i < len; ++i) { amax = std::fmax(amax, std::fabs(xg[i])); s += xg[i]; }
      const float d = amax / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
      int16_t* q = a.q.data() + m * k + g0;
      for (int64_t i = 0; i < len; ++i) q[i] = static_cast<int16_t>(std::nearbyint(xg[i] * inv));
      a.d[m * groups + gi] = d;
      a.sum[m * groups + gi] = s;
    }
  }
  return a;
}

inline float half_to_float(c10::Half h) { return _cvtsh_ss(h.x); }

inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Output rows [n0, n0 + R) for activation rows [m0, m0 + MB), R * MB <= 4 (four rows at one activation row for
// decode; one row at up to four activation rows otherwise): a step's codes are unpacked and widened once per
// output row and dotted with every activation row. Two int32 accumulators per pair (low and high nibbles).
template <int BITS, int R, int MB>
void rows(const uint8_t* packed, const c10::Half* scales, const c10::Half* mins, const Activations& a, int64_t m0,
          int64_t n0, int64_t n, int64_t k, int64_t group, int64_t groups, float* y) {
  const int64_t row_bytes = k * BITS / 8;
  const int16_t* q = a.q.data() + m0 * k;  // activation row m0 + m at q + m * k
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m256i mask256 = _mm256_set1_epi8(0x0F);
  const __m128i mask128 = _mm_set1_epi8(0x0F);
  __m512 acc[R][MB];
  float minterm[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) { acc[r][m] = _mm512_setzero_ps(); minterm[r][m] = 0.f; }
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t g0 = gi * group, len = std::min(group, k - g0), half = len / 2;
    const uint8_t* pg = packed + n0 * row_bytes + g0 * BITS / 8;
    __m512i lo[R][MB], hi[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) lo[r][m] = hi[r][m] = _mm512_setzero_si512();
    // 32 codes of output row r (16-bit) times the 32 activations from input `at` of every activation row
    auto dot = [&](__m512i (&sum)[R][MB], int r, __m512i codes, int64_t at) {
      for (int m = 0; m < MB; ++m) sum[r][m] = _mm512_dpwssd_epi32(sum[r][m], codes, load512(q + m * k + at));
    };
    if constexpr (BITS == 8) {  // 64 codes a step, then 32
      int64_t b = 0;
      for (; b + 64 <= len; b += 64)
        for (int r = 0; r < R; ++r) {
          const __m512i w = load512(pg + r * row_bytes + b);
          dot(lo, r, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(w)), g0 + b);
          dot(hi, r, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(w, 1)), g0 + b + 32);
        }
      if (b < len)
        for (int r = 0; r < R; ++r) dot(lo, r, _mm512_cvtepu8_epi16(load256(pg + r * row_bytes + b)), g0 + b);
    } else {  // inputs g0+b.. in the low nibbles and g0+half+b.. in the high ones: 64 bytes a step, then 32, 16
      int64_t b = 0;
      for (; b + 64 <= half; b += 64)
        for (int r = 0; r < R; ++r) {
          const __m512i w = load512(pg + r * row_bytes + b);
          const __m512i l = _mm512_and_si512(w, mask), h = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
          dot(lo, r, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(l)), g0 + b);
          dot(hi, r, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(h)), g0 + half + b);
          dot(lo, r, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(l, 1)), g0 + b + 32);
          dot(hi, r, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(h, 1)), g0 + half + b + 32);
        }
      if (b + 32 <= half) {
        for (int r = 0; r < R; ++r) {
          const __m256i w = load256(pg + r * row_bytes + b);
          dot(lo, r, _mm512_cvtepu8_epi16(_mm256_and_si256(w, mask256)), g0 + b);
          dot(hi, r, _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), mask256)), g0 + half + b);
        }
        b += 32;
      }
      if (b < half)  // 16 bytes left (a group of 32, or 32 more): both nibbles' 16 codes side by side
        for (int r = 0; r < R; ++r) {
          const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pg + r * row_bytes + b));
          const __m512i codes = _mm512_cvtepu8_epi16(
              _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(w, 4), mask128), _mm_and_si128(w, mask128)));
          for (int m = 0; m < MB; ++m) {
            const int16_t* qm = q + m * k + g0 + b;
            const __m512i xq = _mm512_inserti64x4(_mm512_castsi256_si512(load256(qm)), load256(qm + half), 1);
            lo[r][m] = _mm512_dpwssd_epi32(lo[r][m], codes, xq);
          }
        }
    }
    for (int r = 0; r < R; ++r) {
      const float s = half_to_float(scales[(n0 + r) * groups + gi]), mn = half_to_float(mins[(n0 + r) * groups + gi]);
      for (int m = 0; m < MB; ++m) {
        const int64_t at = (m0 + m) * groups + gi;
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo[r][m], hi[r][m])),
                                    _mm512_set1_ps(s * a.d[at]), acc[r][m]);
        minterm[r][m] += mn * a.sum[at];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) y[(m0 + m) * n + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) + minterm[r][m];
}

// Output rows [n0, n0 + r), r <= kRows, for every activation row.
template <int BITS>
void row_block(const uint8_t* pp, const c10::Half* sp, const c10::Half* mp, const Activations& a, int64_t m_rows,
               int64_t n0, int64_t r, int64_t n, int64_t k, int64_t group, int64_t groups, float* y) {
  if (m_rows == 1) {
    switch (r) {
      case 4: rows<BITS, 4, 1>(pp, sp, mp, a, 0, n0, n, k, group, groups, y); break;
      case 3: rows<BITS, 3, 1>(pp, sp, mp, a, 0, n0, n, k, group, groups, y); break;
      case 2: rows<BITS, 2, 1>(pp, sp, mp, a, 0, n0, n, k, group, groups, y); break;
      default: rows<BITS, 1, 1>(pp, sp, mp, a, 0, n0, n, k, group, groups, y); break;
    }
    return;
  }
  for (int64_t i = n0; i < n0 + r; ++i)
    for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
      switch (std::min<int64_t>(4, m_rows - m0)) {
        case 4: rows<BITS, 1, 4>(pp, sp, mp, a, m0, i, n, k, group, groups, y); break;
        case 3: rows<BITS, 1, 3>(pp, sp, mp, a, m0, i, n, k, group, groups, y); break;
        case 2: rows<BITS, 1, 2>(pp, sp, mp, a, m0, i, n, k, group, groups, y); break;
        default: rows<BITS, 1, 1>(pp, sp, mp, a, m0, i, n, k, group, groups, y); break;
      }
    }
}

at::Tensor packed_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t group, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "packed_mm: bits must be 4 or 8");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8 [N, K*bits/8]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf && scales.is_contiguous() &&
              mins.is_contiguous(), "scales, mins: contiguous float16 [N, groups]");
  const int64_t m_rows = x.size(0), k = x.size(1), n = packed.size(0), groups = scales.size(1);
  TORCH_CHECK(k % 32 == 0 && group % 32 == 0 && packed.size(1) * 8 == k * bits && groups == (k + group - 1) / group
              && (bits == 4 || group <= 4096),
              "packed_mm: K and the group size must be multiples of 32 (int8 groups at most 4096), packed [N, "
              "K*bits/8], scales [N, ceil(K/G)]");
  at::Tensor y = at::empty({m_rows, n}, x.options());
  const Activations a = quantize(x.data_ptr<float>(), m_rows, k, group);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const c10::Half* mp = mins.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (n + kRows - 1) / kRows, block_bytes = kRows * (k * bits / 8);
  // Small tasks (16 blocks = 64 rows): a thread the OS preempts holds up the others for less. Each block's
  // rows are dotted with every activation row while they sit in L1, and the block kPrefetch blocks ahead is
  // fetched meanwhile: a decode-size matrix is too short a stream for the hardware prefetcher to ramp up.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b + kPrefetch < b1) {
        const char* ahead = reinterpret_cast<const char*>(pp + (b + kPrefetch) * block_bytes);
        for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
      }
      const int64_t n0 = b * kRows, r = std::min(kRows, n - n0);
      if (bits == 4) row_block<4>(pp, sp, mp, a, m_rows, n0, r, n, k, group, groups, yp);
      else row_block<8>(pp, sp, mp, a, m_rows, n0, r, n, k, group, groups, yp);
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
