// K3/K5, regression losses (consistency distillation: LCM, CM, iCT; denoising score matching): the
// per-element math, shared by the CPU (g++) and CUDA (nvcc) builds. The spec is
// kernels/regression/reference.py (`sums`, `grad`), in this order of operations; csrc/README.md
// "K3/K5" gives the ABI.
//
// Per sample b, element i, in the compute type C (float, or double for float64):
//   τ = t1                      (no coef)                       kTarget = kRegT1
//   τ = c1_b t1                 (coef, no t2)                   kTarget = kRegC1T1
//   τ = c1_b t1 + c2_b t2       (coef and t2)                   kTarget = kRegC1T1C2T2
//   d = pred - τ
//   forward term:  d²  (kind 0: l2, 2: per-sample pseudo-Huber)  or  sqrt(d² + c²) - c  (kind 1)
//   backward:      k_b d  (kind 0, 2)                            or  k_b d / sqrt(d² + c²)  (kind 1)
// c² is formed in double from the scalar argument and rounded once to C, as torch does for
// `d * d + c * c` with a Python float c; so is c itself.
#pragma once

#include <math.h>

#include "flashdistill/common.h"

namespace flashdistill {

enum RegTarget : int { kRegT1 = 0, kRegC1T1 = 1, kRegC1T1C2T2 = 2 };
enum RegKind : int { kRegL2 = 0, kRegHuber = 1, kRegPseudoHuber = 2 };

FD_HD float reg_sqrt(float v) { return sqrtf(v); }
FD_HD double reg_sqrt(double v) { return sqrt(v); }

template <int kTarget, typename C> FD_HD C reg_diff(C pred, C t1, C t2, C c1, C c2) {
  if (kTarget == kRegT1) return pred - t1;
  if (kTarget == kRegC1T1) return pred - c1 * t1;
  return pred - (c1 * t1 + c2 * t2);
}

// Kind 1 in steps (a backend may take the square roots of a whole tile at once): s = sqrt(d² + c²),
// term s - c, gradient k d / s.
template <typename C> FD_HD C reg_huber_arg(C d, C cc) { return d * d + cc; }
template <typename C> FD_HD C reg_huber_term(C s, C cr) { return s - cr; }
template <typename C> FD_HD C reg_huber_grad(C d, C k, C s) { return k * d / s; }

// One term of the per-sample sum (kHuber: kind 1, elementwise pseudo-Huber); cc = C(c * c), cr = C(c).
template <bool kHuber, typename C> FD_HD C reg_term(C d, C cc, C cr) {
  return kHuber ? reg_huber_term(reg_sqrt(reg_huber_arg(d, cc)), cr) : d * d;
}

// One element of d loss / d pred, before rounding to the storage type.
template <bool kHuber, typename C> FD_HD C reg_grad(C d, C k, C cc) {
  return kHuber ? reg_huber_grad(d, k, reg_sqrt(reg_huber_arg(d, cc))) : k * d;
}

}  // namespace flashdistill
