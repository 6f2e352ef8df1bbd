// grad_scale: dst[i] = src[i] * (scale[0] * factor), computed in the compute type, rounded once.
//
// The backward of every loss that saves dloss/dx (up to the scalar upstream gradient) in the input
// dtype: it must multiply by grad_output / N without rounding the factor to 16 bits (1/N underflows
// float16 for N > 2^24 / 16) and without a host sync (scale lives in memory, read once).
// Traffic: read n * b, write n * b (b = element size); 1 flop per element. Streaming stores from
// 2 n b > 16 MiB (cpu_simd.h): Zen 4 VM, 2 threads, n = 6.4M fp32, 0.75-0.8x the time.

// As the other CPU kernels (cpu_simd.h wants it): no FMA contraction, selects if-converted.
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <omp.h>

#include <stdexcept>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/cpu_simd.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

template <typename T>
void grad_scale_impl(int64_t n, const T* src, T* dst, typename Compute<T>::type s) {
  // Static schedule over fixed 16K-element blocks: each element's result is independent of threads.
  // A large dst is written through a tile in L1 with streaming stores (simd::stream_outputs).
  constexpr int64_t kBlock = 16384, kTile = 512;
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const bool nt = simd::stream_outputs(2 * n * int64_t(sizeof(T)));
#pragma omp parallel if (nblocks > 1)
  {
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t lo = blk * kBlock, hi = lo + kBlock < n ? lo + kBlock : n;
      if (nt) {
        alignas(64) T tile[kTile];
        for (int64_t t = lo; t < hi; t += kTile) {
          const int64_t m = hi - t < kTile ? hi - t : kTile;
#pragma omp simd
          for (int64_t i = 0; i < m; ++i) store(tile, i, load(src, t + i) * s);
          simd::stream_copy(tile, m, dst + t);
        }
      } else {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) store(dst, i, load(src, i) * s);
      }
    }
    simd::stream_fence();
  }
}

}  // namespace

void grad_scale(int64_t dtype, int64_t n, uintptr_t src, uintptr_t dst, uintptr_t scale, double factor) {
  switch (dtype) {
    case kFloat32:
      return grad_scale_impl(n, reinterpret_cast<const float*>(src), reinterpret_cast<float*>(dst),
                             float(*reinterpret_cast<const float*>(scale) * factor));
    case kFloat64:
      return grad_scale_impl(n, reinterpret_cast<const double*>(src), reinterpret_cast<double*>(dst),
                             *reinterpret_cast<const double*>(scale) * factor);
    case kBFloat16:
      return grad_scale_impl(n, reinterpret_cast<const bf16_t*>(src), reinterpret_cast<bf16_t*>(dst),
                             float(*reinterpret_cast<const float*>(scale) * factor));
    case kFloat16:
      return grad_scale_impl(n, reinterpret_cast<const f16_t*>(src), reinterpret_cast<f16_t*>(dst),
                             float(*reinterpret_cast<const float*>(scale) * factor));
    default:
      throw std::invalid_argument("grad_scale: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace cpu
}  // namespace flashdistill
