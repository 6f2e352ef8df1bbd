// CPU q_sample: x_t = alpha_b x0 + sigma_b eps for [B, D] rows, eps either read or drawn inside the
// kernel from the Philox stream (include/flashdistill/philox.h: element b * D + d + start of stream
// (seed, *offset), the same numbers flashdistill.randn gives), optionally written out.
//
// Traffic per element (s = element size): read x0, write x_t (2 s), + s to read a given eps or to
// write the drawn one: the floor 2 s against eager's 4-6 s (randn_like, mul, mul, add). Work: a
// quarter Philox block and half a Box-Muller pair per element (~25 flops + a log, sqrt, sin, cos per
// pair): compute bound on the CPU when drawing (libm's scalar log / sincos), memory bound otherwise.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/philox.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

template <typename T>
void run(int64_t B, int64_t D, const T* x0, int64_t x0_bs, const void* alpha, const void* sigma, const T* noise,
         int64_t noise_bs, uint64_t seed, uint64_t offset, uint64_t start, T* xt, T* noise_out) {
  using C = typename Compute<T>::type;
  const C* a = reinterpret_cast<const C*>(alpha);
  const C* s = reinterpret_cast<const C*>(sigma);
  constexpr int64_t kTileElems = 1024;
  const int64_t n = B * D, n_tiles = (n + kTileElems - 1) / kTileElems;
  const int nthr = sched::threads_for(n);
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(static)
  for (int64_t ti = 0; ti < n_tiles; ++ti) {
    const int64_t i0 = ti * kTileElems, m = std::min(kTileElems, n - i0);
    C eps[kTileElems];
    if (!noise) philox::normals<C>(start + uint64_t(i0), m, seed, offset, eps);
    for (int64_t k = 0; k < m;) {  // the tile's segments, one per row it touches
      const int64_t flat = i0 + k, b = flat / D, d0 = flat - b * D, len = std::min(m - k, D - d0);
      const C ab = a[b], sb = s[b];
      const T* xr = x0 + b * x0_bs + d0;
      T* out = xt + b * D + d0;
      if (noise) {
        const T* er = noise + b * noise_bs + d0;
        for (int64_t j = 0; j < len; ++j) store(out, j, ab * C(load(xr, j)) + sb * C(load(er, j)));
      } else {
        for (int64_t j = 0; j < len; ++j) store(out, j, ab * C(load(xr, j)) + sb * eps[k + j]);
        if (noise_out)
          for (int64_t j = 0; j < len; ++j) store(noise_out + b * D + d0, j, eps[k + j]);
      }
      k += len;
    }
  }
}

}  // namespace

void q_sample_forward(int64_t dtype, int64_t B, int64_t D, uintptr_t x0, int64_t x0_bs, uintptr_t alpha,
                      uintptr_t sigma, uintptr_t noise, int64_t noise_bs, uint64_t seed, uintptr_t offset_ptr,
                      uint64_t start, uintptr_t xt, uintptr_t noise_out) {
  if (B <= 0 || D <= 0) return;
  const uint64_t offset = noise ? 0 : uint64_t(*reinterpret_cast<const int64_t*>(offset_ptr));
  sched::dispatch_dtype(dtype, "q_sample", [&](auto tag) {
    using T = typename decltype(tag)::type;
    run<T>(B, D, reinterpret_cast<const T*>(x0), x0_bs, reinterpret_cast<const void*>(alpha),
           reinterpret_cast<const void*>(sigma), reinterpret_cast<const T*>(noise), noise_bs, seed, offset, start,
           reinterpret_cast<T*>(xt), reinterpret_cast<T*>(noise_out));
  });
}

}  // namespace cpu
}  // namespace flashdistill
