// q_sample on the GPU: csrc/cpu/sampling.cpp's contract. One thread per Philox block (4 flat
// elements of the [B, D] tensor), grid-stride; eps read or drawn from the stream (philox.h) and
// written when asked. Traffic per element: read x0, write x_t (+ eps); compile-checked, never run
// here (no GPU has run this file yet).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/philox.h"
#include "ops.h"
#include "rowwise.cuh"

namespace flashdistill {
namespace gpu {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(int64_t B, int64_t D, const T* __restrict__ x0,
                                                            int64_t x0_bs, const void* alpha, const void* sigma,
                                                            const T* __restrict__ noise, int64_t noise_bs,
                                                            uint64_t seed, const int64_t* offset_ptr, uint64_t start,
                                                            T* __restrict__ xt, T* __restrict__ noise_out) {
  using C = typename Compute<T>::type;
  const C* a = reinterpret_cast<const C*>(alpha);
  const C* s = reinterpret_cast<const C*>(sigma);
  const uint64_t n = uint64_t(B) * uint64_t(D);
  const uint64_t offset = noise ? 0 : uint64_t(*offset_ptr);
  const uint64_t first = start >> 2, last = (start + n + 3) >> 2;
  for (uint64_t blk = first + blockIdx.x * uint64_t(kThreads) + threadIdx.x; blk < last;
       blk += uint64_t(gridDim.x) * kThreads) {
    C eps[4] = {C(0), C(0), C(0), C(0)};
    if (!noise) philox::block_normals<C>(philox::block_of(blk << 2, seed, offset), eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t idx = (blk << 2) + uint64_t(j);
      if (idx < start || idx >= start + n) continue;
      const int64_t f = int64_t(idx - start), b = f / D, d = f - b * D;
      const C e = noise ? C(rowwise::to_c(noise[b * noise_bs + d])) : eps[j];
      xt[f] = rowwise::FromC<T>::cvt(a[b] * C(rowwise::to_c(x0[b * x0_bs + d])) + s[b] * e);
      if (noise_out) noise_out[f] = rowwise::FromC<T>::cvt(e);
    }
  }
}

}  // namespace

void q_sample_cuda(int64_t dtype, int64_t B, int64_t D, const void* x0, int64_t x0_bs, const void* alpha,
                   const void* sigma, const void* noise, int64_t noise_bs, uint64_t seed, const void* offset,
                   uint64_t start, void* xt, void* noise_out, CUstream_st* stream) {
  if (B <= 0 || D <= 0) return;
  const uint64_t n = uint64_t(B) * uint64_t(D);
  const uint64_t blocks = (((start + n + 3) >> 2) - (start >> 2) + kThreads - 1) / kThreads;
  const int grid = int(blocks < 8192 ? blocks : 8192);
  rowwise::with_dtype(dtype, "q_sample", [&](auto tag) {
    using T = decltype(tag);
    q_sample_kernel<T><<<grid, kThreads, 0, stream>>>(B, D, reinterpret_cast<const T*>(x0), x0_bs, alpha, sigma,
                                                      reinterpret_cast<const T*>(noise), noise_bs, seed,
                                                      reinterpret_cast<const int64_t*>(offset), start,
                                                      reinterpret_cast<T*>(xt), reinterpret_cast<T*>(noise_out));
  });
  rowwise::check_launch("q_sample", "q_sample_kernel");
}

}  // namespace gpu
}  // namespace flashdistill
