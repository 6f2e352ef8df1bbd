// K2, score identity losses (SiD, SIM, SFD): the per-element math, shared by the CPU (g++) and CUDA
// (nvcc) builds. The spec is kernels/score_identity/reference.py (`sums`, `grads`), in this order of
// operations; csrc/README.md "K2" gives the ABI.
//
// Per sample b, element i, in the compute type C (float, or double for float64):
//   r̄ = r_u + w_r (r - r_u)  (r̄ = r without r_u),   f̄ likewise with f_u, w_f
//   y = r̄ - f̄,   u = f̄ - x
//   forward terms:  |x - r̄|,  y²,  y u                    (summed per sample by each backend)
//   backward, with (P_b, Q_b) = coef[b]:
//     Gx = -P y,   Gr = P u + Q y,   Gf = -(Gx + Gr)
//     a guided prediction p splits G into  w G  (to p)  and  (1 - w) G  (to p_u)
//   P_b = Q_b = 0 (a dropped sample) writes exact zeros whatever the inputs hold (backends test
//   that per sample, before reading any row).
#pragma once

#include <math.h>

#include "flashdistill/common.h"

namespace flashdistill {

FD_HD float sid_abs(float v) { return fabsf(v); }
FD_HD double sid_abs(double v) { return fabs(v); }

// A prediction after classifier-free guidance (kCfg = false: p as it is; pu and w are not read).
template <bool kCfg, typename C> FD_HD C sid_guided(C p, C pu, C w) { return kCfg ? cfg(p, pu, w) : p; }

template <typename C> FD_HD C sid_y(C rb, C fb) { return rb - fb; }
template <typename C> FD_HD C sid_u(C fb, C x) { return fb - x; }

// The three forward terms of one element.
template <typename C> struct SidTerms {
  C abs_xr, yy, yu;
};
template <typename C> FD_HD SidTerms<C> sid_terms(C x, C rb, C fb) {
  const C y = sid_y(rb, fb), u = sid_u(fb, x);
  return SidTerms<C>{sid_abs(x - rb), y * y, y * u};
}

// Backward. neg_p = -P_b, computed once per sample (negation is exact, so (-P) y is -P * y).
template <typename C> FD_HD C sid_grad_x(C neg_p, C y) { return neg_p * y; }
template <typename C> FD_HD C sid_grad_r(C p, C q, C y, C u) { return p * u + q * y; }
template <typename C> FD_HD C sid_grad_f(C gx, C gr) { return -(gx + gr); }

// Whether sample b is dropped (its gradients are exact zeros).
template <typename C> FD_HD bool sid_dropped(C p, C q) { return p == C(0) && q == C(0); }

}  // namespace flashdistill
