// The packed weight format both native ops read (gpu/quant.py): a row of W [N, K] is groups of G consecutive
// inputs, w_hat = q * scale + min, scale and min float16 per (row, group). int8: one code per byte. int4: a
// group's G/2 bytes hold q[j] in the low nibble of byte j and q[j + G/2] in the high one. The native ops take
// groups whose lengths are all multiples of 32 (K and G multiples of 32), int8 groups at most 4096 long and int4
// ones under 65536 (so packed_mm's int32 lanes cannot overflow).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lensbench_native {

// Refuses, in one line naming `op`, a weight not in that format for inputs of length k.
inline void check_packed(const char* op, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                         int64_t k, int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              op, ": packed must be contiguous uint8 [N, K*bits/8]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf && scales.is_contiguous() &&
              mins.is_contiguous(), op, ": scales, mins must be contiguous float16 [N, groups]");
  TORCH_CHECK(k % 32 == 0 && group % 32 == 0 && packed.size(1) * 8 == k * bits && scales.dim() == 2 &&
              scales.size(0) == packed.size(0) && scales.size(1) == (k + group - 1) / group &&
              mins.sizes() == scales.sizes() && (bits == 4 ? group < 65536 : group <= 4096),
              op, ": K and the group size must be multiples of 32 (int8 groups at most 4096, int4 under 65536), "
              "packed [N, K*bits/8], scales and mins [N, ceil(K/G)]");
}

}  // namespace lensbench_native
