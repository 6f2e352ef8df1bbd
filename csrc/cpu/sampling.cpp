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
// and writes out, and when asked the secondary output o2 = qx_b x + q0_b x0 (x0 itself for qx = 0,
// q0 = 1; Heun's half step, LCM's denoised sample otherwise) and the drawn z. coef is [B, 8]
// (ax, ap, kx, k0, kh, kz, qx, q0) of the compute type, w a per-sample array or a scalar.
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

// The segment loops. `general` serves every combination: each absent input is replaced by a stand-in
// (p and p_u by x, h and z by zeros) whose value a loop-invariant select drops (so a non-finite
// stand-in cannot leak in) and each absent output by a scratch tile. Its 5 loads and 3 stores per
// element cost ~2x a plain loop (measured, NOTES "samplers v0"), so the common steps have their own
// loop: `plain` (x, p, optional p_u, optional given / drawn z, no history, no extra output) covers
// q_sample and every deterministic or stochastic first-order step.
template <typename T, typename C, typename ZT>
inline void general(int64_t len, const T* __restrict__ xr, const T* __restrict__ pr, const T* __restrict__ pur,
                    const T* __restrict__ hr, const ZT* __restrict__ zr, bool has_p, bool has_pu, C w, const C* cb,
                    T* __restrict__ out, T* __restrict__ x0o, T* __restrict__ zo) {
  const C ax = cb[0], ap = cb[1], kx = cb[2], k0 = cb[3], kh = cb[4], kz = cb[5], qx = cb[6], q0 = cb[7];
  for (int64_t j = 0; j < len; ++j) {
    const C xv = C(load(xr, j)), pc = C(load(pr, j)), u = C(load(pur, j)), hv = C(load(hr, j));
    const C zv = C(load(zr, j));
    const C guided = has_pu ? u + w * (pc - u) : pc;
    const C x0 = has_p ? ax * xv + ap * guided : ax * xv;    store(out, j, kx * xv + k0 * x0 + kh * hv + kz * zv);
    store(x0o, j, qx * xv + q0 * x0);
    store(zo, j, zv);
  }
}

// out = c1 x + c2 cfg(p, p_u) + kz z, with c1 = kx + k0 ax, c2 = k0 ap folded per sample. ZK: 0 no
// noise, 1 given (T), 2 drawn (C tile).
template <typename T, typename C, bool HAS_P, bool HAS_PU, int ZK, typename ZT>
inline void plain(int64_t len, const T* __restrict__ xr, const T* __restrict__ pr, const T* __restrict__ pur,
                  const ZT* __restrict__ zr, C w, const C* cb, T* __restrict__ out, T* __restrict__ zo) {
  const C c1 = cb[2] + cb[3] * cb[0], c2 = cb[3] * cb[1], kz = cb[5];
  for (int64_t j = 0; j < len; ++j) {
    C v = c1 * C(load(xr, j));
    if constexpr (HAS_P) {
      C pv = C(load(pr, j));
      if constexpr (HAS_PU) {
        const C u = C(load(pur, j));
        pv = u + w * (pv - u);
      }
      v = v + c2 * pv;
    }
    if constexpr (ZK != 0) {
      const C zv = C(load(zr, j));
      v = v + kz * zv;
      if (zo) store(zo, j, zv);
    }
    store(out, j, v);
  }
}

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
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    alignas(64) T zeros[kTileElems], scratch_x0[kTileElems], scratch_z[kTileElems];
    alignas(64) C z[kTileElems];
    for (int64_t k = 0; k < kTileElems; ++k) zeros[k] = T{};
#pragma omp for schedule(static)
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      const int64_t i0 = ti * kTileElems, m = std::min(kTileElems, n - i0);
      if (a.draw) cpu_noise::normals(a.start + uint64_t(i0), m, a.seed, offset, z);
      for (int64_t k = 0; k < m;) {  // the tile's segments, one per row it touches
        const int64_t flat = i0 + k, b = flat / D, d0 = flat - b * D, len = std::min(m - k, D - d0);
        const C* cb = coef + 8 * b;
        const C w = wv ? wv[b] : C(a.w);
        const T* xr = x + b * a.x_bs + d0;
        const T* pr = p ? p + b * a.p_bs + d0 : xr;
        const T* pur = pu ? pu + b * a.pu_bs + d0 : xr;
        const T* hr = h ? h + b * a.h_bs + d0 : zeros;
        const int64_t o = b * D + d0;
        T* x0o = x0_out ? x0_out + o : scratch_x0;
        T* zo = noise_out ? noise_out + o : scratch_z;
        const T* nr = noise ? noise + b * a.noise_bs + d0 : zeros;
        const bool fast = !h && !x0_out;
        T* zo_fast = noise_out ? noise_out + o : nullptr;
        if (fast && a.draw) {
          if (!p) plain<T, C, false, false, 2>(len, xr, pr, pur, z + k, w, cb, out + o, zo_fast);
          else if (!pu) plain<T, C, true, false, 2>(len, xr, pr, pur, z + k, w, cb, out + o, zo_fast);
          else plain<T, C, true, true, 2>(len, xr, pr, pur, z + k, w, cb, out + o, zo_fast);
        } else if (fast && !noise_out) {
          if (noise) {
            if (!p) plain<T, C, false, false, 1>(len, xr, pr, pur, nr, w, cb, out + o, zo_fast);
            else if (!pu) plain<T, C, true, false, 1>(len, xr, pr, pur, nr, w, cb, out + o, zo_fast);
            else plain<T, C, true, true, 1>(len, xr, pr, pur, nr, w, cb, out + o, zo_fast);
          } else {
            if (!p) plain<T, C, false, false, 0, T>(len, xr, pr, pur, nr, w, cb, out + o, nullptr);
            else if (!pu) plain<T, C, true, false, 0, T>(len, xr, pr, pur, nr, w, cb, out + o, nullptr);
            else plain<T, C, true, true, 0, T>(len, xr, pr, pur, nr, w, cb, out + o, nullptr);
          }
        } else if (a.draw) {
          general<T, C, C>(len, xr, pr, pur, hr, z + k, p != nullptr, pu != nullptr, w, cb, out + o, x0o, zo);
        } else {
          general<T, C, T>(len, xr, pr, pur, hr, nr, p != nullptr, pu != nullptr, w, cb, out + o, x0o, zo);
        }
        k += len;
      }
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
