// K1 score difference: the per-element math, shared by the CPU (g++) and CUDA (nvcc) builds.
//
// The gradient to x of every score-difference loss (SDS, VSD, SwiftBrush, DMD/DMD2, f-distill) is a
// per-sample-weighted difference of two predictions, optionally normalised per sample
// (csrc/README.md, "K1: score_diff_forward"; the float64 spec is score_diff_forward in
// kernels/score_diff/reference.py). Per sample b over its D elements, in the compute type C (float,
// or double for float64), with cfg(p) = p_u + w (p - p_u) where p_u is given, else p:
//
//   ā_i  = cfg(a)_i,   b̄_i = cfg(b)_i
//   d_i  = ā_i - b̄_i                        then C_b d_i with xt, then s_b d_i with a scale
//   r_i  = b̄_i,  or A_b xt_i + C_b b̄_i with xt (the teacher of the normaliser)
//   n_b  = max(mean_i |x_i - r_i|, eps)    norm = 1 only (NaN passes through, as torch.clamp)
//   g_i  = nan_to_num(d_i / n_b)            (no division without norm), then clamped to +-clip
//   loss = loss_factor * 0.5 * sum_{b,i} g_i^2   from the unrounded g
//
// Each step is its own rounding, in this order, as the reference computes it (the CPU build turns
// off fp contraction so that a + w * b stays two roundings). DMD (Yin et al. 2023, Eq. 8; DMD2) is
// a = fake, b = real (+ real_uncond), norm = 1, loss_factor = 1 / (B D). The reductions (and their
// order) belong to each backend; this header is the scalar part only.
#pragma once

#include <math.h>

#include "flashdistill/common.h"

namespace flashdistill {

FD_HD float sd_abs(float v) { return fabsf(v); }
FD_HD double sd_abs(double v) { return fabs(v); }

// A prediction after classifier-free guidance (kCfg = false: p itself; p_u and w are not read).
template <bool kCfg, typename C> FD_HD C sd_guided(C p, C p_u, C w) { return kCfg ? cfg(p, p_u, w) : p; }

// The normaliser's teacher r from b̄ (kXt = false: b̄; xt, A, Cc are not read).
template <bool kXt, typename C> FD_HD C sd_teacher(C bbar, C xt, C A, C Cc) {
  return kXt ? A * xt + Cc * bbar : bbar;
}

// One term of sum_i |x_i - r_i|.
template <typename C> FD_HD C sd_abs_term(C x, C r) { return sd_abs(x - r); }

// The per-sample normaliser from the mean of the |x - r| terms.
template <typename C> FD_HD C sd_norm(C mean_abs, C eps) { return clamp_min_nan(mean_abs, eps); }

// d before the normaliser. kMul: times m1, then times m2, where (m1, m2) is (C_b, s_b), (C_b, 1)
// with xt alone, or (s_b, 1) with a scale alone (a product with 1 is exact: the same bits as
// skipping it).
template <bool kMul, typename C> FD_HD C sd_diff(C abar, C bbar, C m1, C m2) {
  C d = abar - bbar;
  if (kMul) {
    d = m1 * d;
    d = m2 * d;
  }
  return d;
}

// The bound of g: min(clip, max finite) with clip > 0 (clip rounded to C first, as torch.clamp
// rounds its scalar), else the max finite value of C.
template <typename C> FD_HD C sd_bound(double clip) {
  const C big = Limits<C>::max;
  return clip > 0.0 && clip < double(big) ? C(clip) : big;  // NaN: no clip
}

// nan_to_num followed by the clamp to [-big, big], as three selects (big <= max finite, so the
// clamp is the identity after nan_to_num without clip): NaN -> 0, +inf -> big, -inf -> -big, else
// v clamped (-0 stays -0). The order is picked for short vector code (gcc: two compare + blend
// pairs and an and).
template <typename C> FD_HD C sd_nan_to_num(C v, C big) {
  C a = v < big ? v : big;    // +inf (and NaN) -> big
  a = a > -big ? a : -big;    // -inf -> -big
  return v == v ? a : C(0);   // NaN -> 0
}

// One element of g, in the compute type, before rounding to the storage type.
template <bool kNorm, typename C> FD_HD C sd_g(C d, C n, C big) { return sd_nan_to_num(kNorm ? d / n : d, big); }

}  // namespace flashdistill
