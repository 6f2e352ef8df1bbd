// grad_scale: dst[i] = src[i] * (scale[0] * factor), in the compute type, rounded once.
// The CUDA twin of csrc/cpu/grad_scale.cpp (see there for why it exists). The scale is read from
// device memory by every thread block, so the launch needs no host sync and replays under a graph.
// Traffic: read n * b, write n * b; 1 flop per element: purely bandwidth-bound.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "flashdistill/common.h"
#include "ops.h"

namespace flashdistill {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // elements per thread per iteration (tuning only)

template <typename T, typename S>
__global__ void grad_scale_kernel(int64_t n, const T* __restrict__ src, T* __restrict__ dst,
                                  const S* __restrict__ scale, double factor) {
  using C = typename Compute<T>::type;
  const C s = C(double(*scale) * factor);
  const int64_t step = int64_t(gridDim.x) * kThreads * kItems;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * kItems + threadIdx.x; base < n; base += step) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < n) store(dst, i, load(src, i) * s);
    }
  }
}

template <typename T, typename S>
void launch(int64_t n, const void* src, void* dst, const void* scale, double factor, cudaStream_t stream) {
  if (n <= 0) return;  // a zero-block grid is a launch error
  const int64_t per_block = int64_t(kThreads) * kItems;
  int64_t blocks = (n + per_block - 1) / per_block;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  grad_scale_kernel<T, S><<<int(blocks), kThreads, 0, stream>>>(
      n, reinterpret_cast<const T*>(src), reinterpret_cast<T*>(dst), reinterpret_cast<const S*>(scale), factor);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("grad_scale_kernel launch: ") + cudaGetErrorString(err));
}

}  // namespace

void grad_scale_cuda(int64_t dtype, int64_t n, const void* src, void* dst, const void* scale, double factor,
                     CUstream_st* s) {
  switch (dtype) {
    case kFloat32: return launch<float, float>(n, src, dst, scale, factor, s);
    case kFloat64: return launch<double, double>(n, src, dst, scale, factor, s);
    case kBFloat16: return launch<bf16_t, float>(n, src, dst, scale, factor, s);
    case kFloat16: return launch<f16_t, float>(n, src, dst, scale, factor, s);
    default: throw std::invalid_argument("grad_scale: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace gpu
}  // namespace flashdistill
