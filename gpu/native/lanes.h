// AVX-512 helpers the native float32 ops share (attention.cpp, dense.cpp).
#pragma once

#include <immintrin.h>
#include <cstdint>

namespace lensbench_native {

// The first `left` of 16 lanes (none for left <= 0).
inline __mmask16 tail(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

}  // namespace lensbench_native
