// CPU affine_step: the one kernel of every first-order sampler step and of the forward noising
// (kernels/sampling: q_sample, ddim_step, euler_step, flow_euler_step, lcm_step build its per-sample
// coefficients; the math is in kernels/sampling/reference.py). Over [B, D] rows, per element:
//   p   = p_u + w_b (p_c - p_u)   (classifier-free guidance, "ho" form; p = p_c without p_u;
//                                   p = 0 without a prediction)
//   x0  = ax_b x + ap_b p          (the model output in its parameterization, as a data prediction)
//   z   = the given noise, or element start + b D + d of the Philox stream (seed, *offset)
//         (include/flashdistill/philox.h; flashdistill.randn's numbers) when drawing, else 0
//   out = kx_b x + k0_b x0 + kh_b h + kz_b z   (h: an optional history tensor, DPM-Solver++(2M)'s
//                                               previous x0)
// and writes out, and x0 and the drawn z when asked. coef is [B, 6] (ax, ap, kx, k0, kh, kz) of the
// compute type, w a per-sample array or a scalar.
//
// Traffic per element (s = element size): read x and the predictions (1-3 s, + s for given noise),
// write out (+ x0, + z): 3-4 passes for a guided deterministic step against eager's 8-14 (the
// research notes' count for diffusers, attn_sampler.md Sec. 4.3). Work: ~10 flops, plus a quarter
// Philox block and half a Box-Muller pair when drawing (compute bound on the CPU then).

// fp-contract=off: the bits do not depend on the instruction set (no FMAs where -march has them).
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/cpu_noise.h"
#include "flashdistill/philox.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

struct StepArgs {
  int64_t B, D, x_bs, p_bs, pu_bs, h_bs, noise_bs;
  uintptr_t x, p, pu, h, w_ptr, coef, noise, offset_ptr, out, x0_out, noise_out;
  double w;
  uint64_t seed, start;
  bool draw;
};

template <typename T>
void run(const StepArgs& a) {
  using C = typename Compute<T>::type;
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
  const uint64_t offset = a.draw ? uint64_t(*reinterpret_cast<const int64_t*>(a.offset_ptr)) : 0;
  constexpr int64_t kTileElems = 1024;
  const int64_t D = a.D, n = a.B * D, n_tiles = (n + kTileElems - 1) / kTileElems;
  const int nthr = sched::threads_for(n);
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(static)
  for (int64_t ti = 0; ti < n_tiles; ++ti) {
    const int64_t i0 = ti * kTileElems, m = std::min(kTileElems, n - i0);
    C z[kTileElems];
    if (a.draw) cpu_noise::normals(a.start + uint64_t(i0), m, a.seed, offset, z);
    for (int64_t k = 0; k < m;) {  // the tile's segments, one per row it touches
      const int64_t flat = i0 + k, b = flat / D, d0 = flat - b * D, len = std::min(m - k, D - d0);
      const C ax = coef[6 * b], ap = coef[6 * b + 1], kx = coef[6 * b + 2], k0 = coef[6 * b + 3];
      const C kh = coef[6 * b + 4], kz = coef[6 * b + 5];
      const C w = wv ? wv[b] : C(a.w);
      const T* xr = x + b * a.x_bs + d0;
      const T* pr = p ? p + b * a.p_bs + d0 : nullptr;
      const T* pur = pu ? pu + b * a.pu_bs + d0 : nullptr;
      const T* nr = noise ? noise + b * a.noise_bs + d0 : nullptr;
      const T* hr = h ? h + b * a.h_bs + d0 : nullptr;
      const int64_t o = b * D + d0;
      // branch-free passes over the segment (each vectorizes): the guided prediction, the noise, out
      C pv[kTileElems], zv[kTileElems], x0[kTileElems];
      if (pr) {
        for (int64_t j = 0; j < len; ++j) pv[j] = C(load(pr, j));
        if (pur)
          for (int64_t j = 0; j < len; ++j) {
            const C u = C(load(pur, j));
            pv[j] = u + w * (pv[j] - u);
          }
      } else {
        for (int64_t j = 0; j < len; ++j) pv[j] = C(0);
      }
      if (nr) {
        for (int64_t j = 0; j < len; ++j) zv[j] = C(load(nr, j));
      } else if (a.draw) {
        for (int64_t j = 0; j < len; ++j) zv[j] = z[k + j];
      } else {
        for (int64_t j = 0; j < len; ++j) zv[j] = C(0);
      }
      for (int64_t j = 0; j < len; ++j) {
        const C xv = C(load(xr, j));
        x0[j] = ax * xv + ap * pv[j];
        pv[j] = kx * xv + k0 * x0[j] + kz * zv[j];  // pv now holds out
      }
      if (hr)
        for (int64_t j = 0; j < len; ++j) pv[j] = pv[j] + kh * C(load(hr, j));
      for (int64_t j = 0; j < len; ++j) store(out, o + j, pv[j]);
      if (x0_out)
        for (int64_t j = 0; j < len; ++j) store(x0_out, o + j, x0[j]);
      if (noise_out)
        for (int64_t j = 0; j < len; ++j) store(noise_out, o + j, zv[j]);
      k += len;
    }
  }
}

}  // namespace

void affine_step(int64_t dtype, int64_t B, int64_t D, uintptr_t x, int64_t x_bs, uintptr_t p, int64_t p_bs,
                 uintptr_t pu, int64_t pu_bs, uintptr_t h, int64_t h_bs, uintptr_t w_ptr, double w, uintptr_t coef,
                 uintptr_t noise, int64_t noise_bs, bool draw, uint64_t seed, uintptr_t offset_ptr, uint64_t start, uintptr_t out,
                 uintptr_t x0_out, uintptr_t noise_out) {
  if (B <= 0 || D <= 0) return;
  if (draw && noise) throw std::invalid_argument("affine_step: draw and a given noise are exclusive");
  const StepArgs a{B, D, x_bs, p_bs, pu_bs, h_bs, noise_bs, x, p, pu, h, w_ptr, coef, noise, offset_ptr, out,
                   x0_out, noise_out, w, seed, start, draw};
  sched::dispatch_dtype(dtype, "affine_step", [&](auto tag) { run<typename decltype(tag)::type>(a); });
}

}  // namespace cpu
}  // namespace flashdistill
