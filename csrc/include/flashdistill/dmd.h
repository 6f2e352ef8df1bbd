// DMD loss: the per-element math, shared by the CPU (g++) and CUDA (nvcc) builds, as the special
// case of the K1 score difference (score_diff.h): a = fake, b = real (+ uncond), norm = 1, no xt,
// scale or clip. Kept for code written against these names; new code uses score_diff.h.
//
// Distribution Matching Distillation, Yin et al. 2023 ("One-step Diffusion with Distribution
// Matching Distillation"), Eq. 8 with the weight of Sec. 3.2, as kept by DMD2 (Yin et al. 2024):
// the generator gradient is (mu_fake - mu_real) scaled per sample by 1 / mean|x - mu_real|.
// With x the generator sample, `real` / `fake` the x0 predictions of the real (teacher) and the
// fake (critic) score, `uncond` the teacher without its condition, per sample b over its D
// elements, in the compute type C (float, or double for float64):
//
//   r_i  = uncond_i + w_b (real_i - uncond_i)      classifier-free guidance (r = real without it)
//   n_b  = max(mean_i |x_i - r_i|, eps)            NaN passes through (torch.clamp)
//   g_i  = nan_to_num((fake_i - r_i) / n_b)        stored rounded to the input dtype
//   loss = 0.5 sum_{b,i} g_i^2 / (B D)             g^2 from the unrounded g
//
// loss equals 0.5 * mse(x, stopgrad(x - g)), whose gradient in x is g / (B D). The reductions
// (and their order) belong to each backend; this header is the scalar part only.
#pragma once

#include "flashdistill/common.h"
#include "flashdistill/score_diff.h"

namespace flashdistill {

FD_HD float dmd_abs(float v) { return sd_abs(v); }
FD_HD double dmd_abs(double v) { return sd_abs(v); }

// The guided teacher prediction r (kCfg = false: r = real, and uncond / w are not read).
template <bool kCfg, typename C> FD_HD C dmd_teacher(C real, C uncond, C w) { return sd_guided<kCfg>(real, uncond, w); }

// One term of sum_i |x_i - r_i|.
template <typename C> FD_HD C dmd_abs_term(C x, C r) { return sd_abs_term(x, r); }

// The per-sample normaliser from the sum of the |x - r| terms over the D elements.
template <typename C> FD_HD C dmd_norm(C mean_abs, C eps) { return sd_norm(mean_abs, eps); }

// nan_to_num: NaN -> 0, +inf -> max, -inf -> -max, else v (-0 stays -0).
template <typename C> FD_HD C dmd_nan_to_num(C v) { return sd_nan_to_num(v, C(Limits<C>::max)); }

// One element of g, in the compute type, before rounding to the storage type.
template <typename C> FD_HD C dmd_g(C fake, C r, C n) { return sd_g<true>(fake - r, n, C(Limits<C>::max)); }

}  // namespace flashdistill
