// philox_fill on the GPU: the CPU rng.cpp's contract (include/flashdistill/philox.h has the generator
// and the stream layout). One thread per Philox block (4 elements), grid-stride; the offset is read
// from device memory, so a captured graph draws the substream the NoiseSource's offset names at
// replay time. Output only: ~40 integer ops per block, far below the store bandwidth's budget.
// Compile-checked; never run here (no GPU has run this file yet).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "flashdistill/common.h"
#include "flashdistill/philox.h"
#include "ops.h"
#include "rowwise.cuh"

namespace flashdistill {
namespace gpu {
namespace {

constexpr int kThreads = 256;

template <typename T, int KIND>  // KIND 0 bits (T = int64_t), 1 uniform, 2 normal
__global__ void __launch_bounds__(kThreads) philox_kernel(int64_t n, uint64_t seed, const int64_t* offset_ptr,
                                                          uint64_t start, T* out) {
  const uint64_t offset = uint64_t(*offset_ptr);
  const uint64_t end = start + uint64_t(n), first = start >> 2, last = (end + 3) >> 2;
  for (uint64_t blk = first + blockIdx.x * uint64_t(kThreads) + threadIdx.x; blk < last;
       blk += uint64_t(gridDim.x) * kThreads) {
    const philox::Block b = philox::block_of(blk << 2, seed, offset);
    using C = typename std::conditional<KIND == 0, float, typename Compute<T>::type>::type;
    C nrm[4];  // not `n`: that name would shadow the length in the bound below (a bug once)
    if constexpr (KIND == 2) philox::block_normals<C>(b, nrm);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t idx = (blk << 2) + uint64_t(j);
      if (idx < start || idx >= end) continue;
      const int64_t i = int64_t(idx - start);
      if constexpr (KIND == 0) {
        out[i] = int64_t(b.w[j]);
      } else if constexpr (KIND == 1) {
        out[i] = rowwise::FromC<T>::cvt(philox::uniform<typename Compute<T>::type>(b.w[j]));
      } else {
        out[i] = rowwise::FromC<T>::cvt(nrm[j]);
      }
    }
  }
}

template <typename T, int KIND>
void launch(int64_t n, uint64_t seed, const void* offset, uint64_t start, void* out, cudaStream_t stream) {
  const int64_t blocks_needed = int64_t((((start + uint64_t(n) + 3) >> 2) - (start >> 2) + kThreads - 1) / kThreads);
  const int grid = int(blocks_needed < 4096 ? blocks_needed : 4096);  // grid-stride beyond
  philox_kernel<T, KIND><<<grid, kThreads, 0, stream>>>(n, seed, reinterpret_cast<const int64_t*>(offset), start,
                                                        reinterpret_cast<T*>(out));
  rowwise::check_launch("philox_fill", "philox_kernel");
}

}  // namespace

void philox_fill_cuda(int64_t dtype, int64_t n, uint64_t seed, const void* offset, uint64_t start, int64_t kind,
                      void* out, CUstream_st* stream) {
  if (n <= 0) return;
  if (kind == 0) return launch<int64_t, 0>(n, seed, offset, start, out, stream);
  if (kind != 1 && kind != 2) rowwise::bad_arg("philox_fill", "unknown kind " + std::to_string(kind));
  rowwise::with_dtype(dtype, "philox_fill", [&](auto tag) {
    using T = decltype(tag);
    if (kind == 1) launch<T, 1>(n, seed, offset, start, out, stream);
    else launch<T, 2>(n, seed, offset, start, out, stream);
  });
}

}  // namespace gpu
}  // namespace flashdistill
