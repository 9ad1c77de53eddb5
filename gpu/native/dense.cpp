// A float32 matrix times a few activation rows on x86 CPUs with AVX-512, on torch's threads:
//     y[m, n] = x[m, :] . w[n, :]        (x [M, K], w [N, K] as nn.Linear keeps it, y [M, N])
// At decode size (a handful of rows) a linear is a matrix-vector product that reads the whole weight once per
// step, so its speed is the memory bandwidth the threads draw. torch's float32 path for it (MKL's gemv) runs on
// one thread at these shapes whatever torch's thread count; this splits the weight's rows over the threads.
// Each block of 8 weight rows is dotted with every activation row while it sits in L1 (2 x 8 accumulators up
// to 2 activation rows, 4 x 4 above).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "lanes.h"

#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kRows = 8;        // weight rows per block
constexpr int64_t kGrainBytes = 1 << 16;  // of weight per task, about: waking a thread for less costs more

using lensbench_native::tail;

// R <= NR rows of w (from `w`) against MR activation rows (from `x`).
template <int MR, int NR>
void block(const float* x, int64_t xs, const float* w, int64_t ws, int64_t k, int64_t r, float* y, int64_t ys) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    const __mmask16 mask = tail(k - k0);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = j < r ? _mm512_maskz_loadu_ps(mask, w + j * ws + k0) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * xs + k0);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < r; ++j) y[i * ys + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// A block of 8 rows as two of 4.
template <int MR>
void half(const float* x, int64_t xs, const float* w, int64_t ws, int64_t k, int64_t r, float* y, int64_t ys) {
  block<MR, 4>(x, xs, w, ws, k, std::min<int64_t>(4, r), y, ys);
  if (r > 4) block<MR, 4>(x, xs, w + 4 * ws, ws, k, r - 4, y + 4, ys);
}

at::Tensor dense_mm(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "dense_mm: float32 x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.size(1) == w.size(1), "dense_mm: x [M, K] and w [N, K] must share K");
  TORCH_CHECK(w.stride(1) == 1, "dense_mm: w's rows must be contiguous");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t m_rows = x.size(0), k = x.size(1), n = w.size(0), xs = x.stride(0), ws = w.stride(0);
  at::Tensor y = at::empty({m_rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (n + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, kRows * k * 4));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows, r = std::min(kRows, n - n0);
      const float* wb = wp + n0 * ws;
      for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
        const float* xb = xp + m0 * xs;
        float* yb = yp + m0 * n + n0;
        switch (std::min<int64_t>(4, m_rows - m0)) {  // 4 x 4 accumulators at most, or 2 x 8
          case 4: half<4>(xb, xs, wb, ws, k, r, yb, n); break;
          case 3: half<3>(xb, xs, wb, ws, k, r, yb, n); break;
          case 2: block<2, 8>(xb, xs, wb, ws, k, r, yb, n); break;
          default: block<1, 8>(xb, xs, wb, ws, k, r, yb, n); break;
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lensbench_native, lib) {
  lib.def("dense_mm(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(lensbench_native, CPU, lib) {
  lib.impl("dense_mm", &dense_mm);
}
