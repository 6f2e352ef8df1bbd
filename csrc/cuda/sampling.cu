// affine_step on the GPU: csrc/cpu/sampling.cpp's contract (the top comment there has the math). One
// thread per Philox block (4 flat elements of the [B, D] tensor), grid-stride; z given, drawn from the
// stream (philox.h) or 0. Traffic per element: read x and the predictions (+ z), write out (+ x0, z).
// Compile-checked; never run here (no GPU has run this file yet).
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

struct StepArgs {
  int64_t B, D, x_bs, p_bs, pu_bs, h_bs, noise_bs;
  const void *x, *p, *pu, *h, *w_ptr, *coef, *noise;
  const int64_t* offset_ptr;
  void *out, *x0_out, *noise_out;
  double w;
  uint64_t seed, start;
  bool draw;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) affine_step_kernel(StepArgs a) {
  using C = typename Compute<T>::type;
  using rowwise::FromC;
  using rowwise::to_c;
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* p = reinterpret_cast<const T*>(a.p);
  const T* pu = reinterpret_cast<const T*>(a.pu);
  const T* h = reinterpret_cast<const T*>(a.h);
  const T* noise = reinterpret_cast<const T*>(a.noise);
  const C* wv = reinterpret_cast<const C*>(a.w_ptr);
  const C* coef = reinterpret_cast<const C*>(a.coef);
  T* out = reinterpret_cast<T*>(a.out);
  T* x0_out = reinterpret_cast<T*>(a.x0_out);
  T* noise_out = reinterpret_cast<T*>(a.noise_out);
  const uint64_t n = uint64_t(a.B) * uint64_t(a.D);
  const uint64_t offset = a.draw ? uint64_t(*a.offset_ptr) : 0;
  const uint64_t first = a.start >> 2, last = (a.start + n + 3) >> 2;
  for (uint64_t blk = first + blockIdx.x * uint64_t(kThreads) + threadIdx.x; blk < last;
       blk += uint64_t(gridDim.x) * kThreads) {
    C z[4] = {C(0), C(0), C(0), C(0)};
    if (a.draw) philox::block_normals<C>(philox::block_of(blk << 2, a.seed, offset), z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t idx = (blk << 2) + uint64_t(j);
      if (idx < a.start || idx >= a.start + n) continue;
      const int64_t f = int64_t(idx - a.start), b = f / a.D, d = f - b * a.D;
      const C* cb = coef + 8 * b;
      const C xv = C(to_c(x[b * a.x_bs + d]));
      C pv = C(0);
      if (p) {
        pv = C(to_c(p[b * a.p_bs + d]));
        if (pu) {
          const C u = C(to_c(pu[b * a.pu_bs + d])), w = wv ? wv[b] : C(a.w);
          pv = u + w * (pv - u);
        }
      }
      const C x0 = cb[0] * xv + cb[1] * pv;
      const C zv = noise ? C(to_c(noise[b * a.noise_bs + d])) : z[j];
      const C hv = h ? C(to_c(h[b * a.h_bs + d])) : C(0);
      out[f] = FromC<T>::cvt(cb[2] * xv + cb[3] * x0 + cb[5] * zv + cb[4] * hv);
      if (x0_out) x0_out[f] = FromC<T>::cvt(cb[6] * xv + cb[7] * x0);
      if (noise_out) noise_out[f] = FromC<T>::cvt(zv);
    }
  }
}

}  // namespace

void affine_step_cuda(int64_t dtype, int64_t B, int64_t D, const void* x, int64_t x_bs, const void* p, int64_t p_bs,
                      const void* pu, int64_t pu_bs, const void* h, int64_t h_bs, const void* w_ptr, double w, const void* coef,
                      const void* noise, int64_t noise_bs, bool draw, uint64_t seed, const void* offset,
                      uint64_t start, void* out, void* x0_out, void* noise_out, CUstream_st* stream) {
  if (B <= 0 || D <= 0) return;
  if (draw && noise) rowwise::bad_arg("affine_step", "draw and a given noise are exclusive");
  const uint64_t n = uint64_t(B) * uint64_t(D);
  const uint64_t blocks = (((start + n + 3) >> 2) - (start >> 2) + kThreads - 1) / kThreads;
  const int grid = int(blocks < 8192 ? blocks : 8192);
  const StepArgs a{B, D, x_bs, p_bs, pu_bs, h_bs, noise_bs, x, p, pu, h, w_ptr, coef, noise,
                   reinterpret_cast<const int64_t*>(offset), out, x0_out, noise_out, w, seed, start, draw};
  rowwise::with_dtype(dtype, "affine_step", [&](auto tag) {
    affine_step_kernel<decltype(tag)><<<grid, kThreads, 0, stream>>>(a);
  });
  rowwise::check_launch("affine_step", "affine_step_kernel");
}

}  // namespace gpu
}  // namespace flashdistill
