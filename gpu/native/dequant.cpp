// Dequantising rows of a packed int4 or int8 weight into a float32 or bfloat16 tile, on x86 CPUs with AVX-512:
// the prefill path (many activation rows) multiplies such a tile with torch's GEMM. Format: packed_format.h,
// w_hat[n, g0 + j] = q * scale[n, g] + min[n, g]. bfloat16 is rounded to nearest even
// (VCVTNEPS2BF16 where the CPU has AVX512-BF16, the same rounding in integer arithmetic elsewhere).
//
// It runs on torch's thread pool, the one its GEMM runs on next: a dequantiser on another pool (numba's
// OpenMP) left each pool spinning while the other wanted the cores.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include "packed_format.h"

#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

inline void store(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store(c10::BFloat16* dst, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(rounded));
#endif
}

inline __m512 widen(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

template <int BITS, typename Out>
void dequant_row(const uint8_t* row, const c10::Half* sc, const c10::Half* mn, int64_t k, int64_t group, Out* dst) {
  for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, ++gi) {
    const int64_t len = std::min(group, k - g0);
    const __m512 s = _mm512_set1_ps(static_cast<float>(sc[gi])), m = _mm512_set1_ps(static_cast<float>(mn[gi]));
    if constexpr (BITS == 8) {
      const uint8_t* pg = row + g0;
      for (int64_t j = 0; j < len; j += 16)
        store(dst + g0 + j, _mm512_fmadd_ps(widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pg + j))), s, m));
    } else {
      const uint8_t* pg = row + g0 / 2;
      const int64_t half = len / 2;
      const __m128i low = _mm_set1_epi8(15);
      for (int64_t j = 0; j < half; j += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pg + j));
        store(dst + g0 + j, _mm512_fmadd_ps(widen(_mm_and_si128(b, low)), s, m));
        store(dst + g0 + half + j, _mm512_fmadd_ps(widen(_mm_and_si128(_mm_srli_epi16(b, 4), low)), s, m));
      }
    }
  }
}

template <typename Out>
void rows(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins, int64_t group, int64_t bits,
          int64_t n0, at::Tensor& out) {
  const int64_t r = out.size(0), k = out.size(1), pb = packed.size(1), groups = scales.size(1);
  const uint8_t* pp = packed.data_ptr<uint8_t>() + n0 * pb;
  const c10::Half* sp = scales.data_ptr<c10::Half>() + n0 * groups;
  const c10::Half* mp = mins.data_ptr<c10::Half>() + n0 * groups;
  Out* op = out.data_ptr<Out>();
  at::parallel_for(0, r, 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      if (bits == 4) dequant_row<4>(pp + i * pb, sp + i * groups, mp + i * groups, k, group, op + i * k);
      else dequant_row<8>(pp + i * pb, sp + i * groups, mp + i * groups, k, group, op + i * k);
    }
  });
}

// out [R, K] (float32 or bfloat16, contiguous) = rows n0 .. n0 + R of the weight, dequantised.
void dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins, int64_t group, int64_t bits,
             int64_t n0, at::Tensor out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() &&
              (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out: contiguous float32 or bfloat16 [R, K]");
  lensbench_native::check_packed("dequant", packed, scales, mins, out.size(1), group, bits);
  TORCH_CHECK(n0 >= 0 && n0 + out.size(0) <= packed.size(0),
              "dequant: rows n0 .. n0 + R must lie within the weight's N rows");
  if (out.scalar_type() == at::kFloat) rows<float>(packed, scales, mins, group, bits, n0, out);
  else rows<c10::BFloat16>(packed, scales, mins, group, bits, n0, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lensbench_native, lib) {
  lib.def("dequant(Tensor packed, Tensor scales, Tensor mins, int group, int bits, int n0, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lensbench_native, CPU, lib) {
  lib.impl("dequant", &dequant);
}
