// CPU kd_forward: the row kernel of kd_loss on logits (kernels/kd/reference.py: token_divergence,
// kd_loss; gradients from ../shared/research/llm_kd.md Sec. 1). One call gives, per row, the
// tempered divergence D, the hard-label cross-entropy on the untempered student logits and
// dL/dz = row_weight * dD/dz + hard_weight * (softmax(z) - onehot(label)).
//
// Traffic per element, s = sizeof(dtype): reads z and t once (2 s), writes grad once (s): fp32 12
// bytes (N = 2048, V = 32000 fp32: 2 x 262 MB read, 262 MB written). Everything else stays in the
// thread's L2: the row's u, v, exp(u - max), exp(v - max) and one auxiliary row (5 V of C: 640 KB for
// V = 32000 fp32), read back by passes 1b-3. Not counted: the read-for-ownership of grad when the call
// moves less than simd::kStreamMinBytes (above, grad goes out with streaming stores).
// Work per element (flops, an exp ~ 20, a log1p ~ 25 with its division): pass 1 two divisions by T
// and two maxima; pass 1b two exps (three with the hard CE) and the sums; pass 2 forward/reverse KL,
// mixed, TVD ~ 10; jsd and skew KL one logaddexp (exp + log1p, ~ 50) and the skew ones one more
// exp; pass 3 ~ 5 (+ one exp with the hard CE). About 60 (KL) to 130 (skew KL) flops per 12 bytes of
// fp32. Measured (Zen 4 VM, 2 threads, N = 2048, V = 32000 fp32, T = 2, median of 7; floor = 786 MB at
// copy_'s 25-37 GB/s = 21-31 ms): forward_kl 100-110 ms, reverse_kl / tvd / mixed 110-116, jsd 175-188,
// skew KL 200-225; + 30-60 ms with the hard CE. So 4-10x the bytes floor: compute bound (the exps, not
// L2: V = 4000 runs at the same ns per element). Eager PyTorch forward + backward of the same loss:
// forward_kl 1.7-2.0 s, jsd 10.5 s (18x, 56x).
//
// Scheme: rows in parallel (OpenMP, dynamic, one row per task); a row never splits, and its sums are
// fixed: blocks of sched::kBlock elements in simd::Lanes accumulators of C, the block totals added in
// double in block order, so every bit is independent of the thread count. Per row:
//  1a  u = z / T, v = t / T into the scratch (16-bit rows widened, fp16 with F16C), their maxima
//      (and max z for the hard CE);
//  1b  eu = exp(u - max u), ev = exp(v - max v) into the scratch, their sums (and sum exp(z - max z)):
//      LSE in double; q = eu / sum eu, log q = u - LSE(u) (log-space: no log per element), same for p;
//  2   the kind's row sums (D, and KL(q||p), sum q s, ... that the gradient needs), with log m (jsd)
//      or the per-element factor (skew KL) stored in the auxiliary row;
//  3   grad, in tiles of kTile: to memory directly or through an L1 tile with streaming stores.
// 0 log 0 = 0: every p (log p - .) and q (log q - .) term is a select on p > 0 / q > 0.
// A masked row (row_weight 0 and no active hard term) gets D = CE = 0 and a zero gradient row.

// fp-contract=off: the bits do not depend on the instruction set (no FMAs where -march has them).
// no-trapping-math: lets gcc if-convert the selects.
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/cpu_simd.h"
#include "flashdistill/kd.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

using kdmath::kd_exp;
using kdmath::kd_log1p;
using kdmath::kd_logaddexp;
using sched::kBlock;
using sched::kTile;

// dst[i] = C(src[i]) for i < m.
template <typename T, typename C> inline void load_tile(const T* __restrict__ src, int64_t m, C* __restrict__ dst) {
  if constexpr (simd::kInlineLoad<T>) {
    for (int64_t i = 0; i < m; ++i) dst[i] = C(simd::ld(src, i));
  } else {
    simd::widen(src, m, dst);
  }
}

template <typename C, int L> inline void lane_add(const C* __restrict__ x, int64_t m, C (&acc)[L]) {
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l) acc[l] += x[i + l];
  for (int l = 0; i + l < m; ++l) acc[l] += x[i + l];
}

// max(acc, x[0..m)): order-free, so an OpenMP simd reduction (gcc does not vectorize a plain max
// reduction without -ffinite-math-only).
template <typename C> inline C tile_max(const C* __restrict__ x, int64_t m, C acc) {
#pragma omp simd reduction(max : acc)
  for (int64_t i = 0; i < m; ++i) acc = x[i] > acc ? x[i] : acc;
  return acc;
}

// out[k] = sum over the row's n elements of the K values fill(t, m, tile) writes to tile[k][0..m)
// for the tile [t, t + m): simd::Lanes accumulators of C per block of kBlock, blocks added in double.
template <int K, typename C, typename F> inline void row_sums(int64_t n, double (&out)[K], const F& fill) {
  constexpr int L = simd::Lanes<C>::n;
  alignas(64) C tile[K][kTile];
  for (int k = 0; k < K; ++k) out[k] = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    C acc[K][L] = {};
    const int64_t be = std::min(n, b + kBlock);
    for (int64_t t = b; t < be; t += kTile) {
      const int64_t m = std::min(kTile, be - t);
      fill(t, m, tile);
      for (int k = 0; k < K; ++k) lane_add(tile[k], m, acc[k]);
    }
    for (int k = 0; k < K; ++k) out[k] += simd::lanes_total(acc[k]);
  }
}

// V: the width the divergence is over; s_width / t_width: the student's and teacher's row lengths
// (equal to V unless the vocabularies differ: columns past a row's width read as -inf, so a
// narrower row is padded with -inf; a wider one is truncated to V). grad is [N, s_width].
struct Args {
  int64_t N, V, s_stride, s_width, t_stride, t_width, kind;
  double T, beta, alpha, lam;
  uintptr_t student, teacher, row_weight, labels, hard_weight, grad, soft_rows, hard_rows;
};

// Writes a tile of m values of C to g (T storage), streaming when nt.
template <typename T, typename C> inline void store_tile(const C* __restrict__ src, int64_t m, T* __restrict__ g, bool nt) {
  if constexpr (std::is_same<T, C>::value) {
    if (nt) simd::stream_copy(src, m, g);
    else std::memcpy(g, src, size_t(m) * sizeof(T));
  } else {
    if (nt) {
      alignas(64) T b[kTile];
      simd::narrow(src, m, b);
      simd::stream_copy(static_cast<const T*>(b), m, g);
    } else {
      simd::narrow(src, m, g);
    }
  }
}

// dst[0..m) = src[i..i + m) as C, -inf past src's width.
template <typename T, typename C> inline void load_part(const T* src, int64_t width, int64_t i, int64_t m, C* dst) {
  const int64_t n = std::max<int64_t>(0, std::min(m, width - i));
  load_tile(src + i, n, dst);
  for (int64_t k = n; k < m; ++k) dst[k] = -C(__builtin_inf());
}

// gt[k] += hw (softmax(z) - onehot(y)) for the tile [i, i + m): exp(z - LSE(z)) from the row's
// untempered values (u_tile when T = 1, else z re-read, -inf past its width), minus hw at the label.
template <typename T, typename C>
inline void add_hard_grad(C* __restrict__ gt, int64_t i, int64_t m, const C* u_tile, const T* z, int64_t width,
                          int64_t y, C hw, C lse_z) {
  if (u_tile) {
    for (int64_t k = 0; k < m; ++k) gt[k] = gt[k] + hw * kd_exp(u_tile[k] - lse_z);
  } else {
    alignas(64) C zt[kTile];
    load_part(z, width, i, m, zt);
    for (int64_t k = 0; k < m; ++k) gt[k] = gt[k] + hw * kd_exp(zt[k] - lse_z);
  }
  if (y >= i && y < i + m) gt[y - i] = gt[y - i] - hw;
}

template <typename T> void kd_row(const Args& a, int64_t r, typename Compute<T>::type* scratch, bool nt) {
  using C = typename Compute<T>::type;
  const int64_t V = a.V;
  const T* z = reinterpret_cast<const T*>(a.student) + r * a.s_stride;
  const T* t = reinterpret_cast<const T*>(a.teacher) + r * a.t_stride;
  const int64_t Vs = a.s_width, Vt = a.t_width;
  T* g = reinterpret_cast<T*>(a.grad) + r * Vs;
  C* soft_rows = reinterpret_cast<C*>(a.soft_rows);
  C* hard_rows = reinterpret_cast<C*>(a.hard_rows);

  const RowWeights<C> rwt = row_weights<C>(reinterpret_cast<const void*>(a.row_weight),
                                           reinterpret_cast<const void*>(a.labels),
                                           reinterpret_cast<const void*>(a.hard_weight), r);
  const C rw = rwt.rw, hw = rwt.hw;
  const int64_t y = rwt.y;
  const bool hard_grad = rwt.hard_grad;
  const bool need_ce = y >= 0 && (hard_grad || hard_rows != nullptr);

  if (rw == C(0) && !hard_grad) {  // masked row
    soft_rows[r] = C(0);
    if (hard_rows) hard_rows[r] = C(0);
    alignas(64) C zero[kTile] = {};
    for (int64_t i = 0; i < Vs; i += kTile) store_tile(zero, std::min(kTile, Vs - i), g + i, nt);
    return;
  }

  const C Tc = C(a.T);
  const bool t_one = a.T == 1.0;
  C* U = scratch;
  C* Vv = scratch + V;
  C* EU = scratch + 2 * V;
  C* EV = scratch + 3 * V;
  C* W = scratch + 4 * V;

  // TAID is forward KL to softmax(lam v + (1 - lam) u): v is replaced in pass 1a (lam = 1: v; 0: u)
  const bool taid = a.kind == kKdTAID;
  const bool taid_mix = taid && a.lam < 1.0;
  const C lam_c = C(a.lam), one_m_lam = C(1.0 - a.lam);

  // ---- pass 1a: u, v and the maxima ----
  C mu = -C(__builtin_inf()), mv = mu, mz = mu;
  alignas(64) C zt[kTile];
  for (int64_t i = 0; i < V; i += kTile) {
    const int64_t m = std::min(kTile, V - i);
    load_part(z, Vs, i, m, U + i);
    load_part(t, Vt, i, m, Vv + i);
    if (need_ce && !t_one) mz = tile_max(U + i, m, mz);
    if (!t_one) {
      C* __restrict__ u = U + i;
      C* __restrict__ v = Vv + i;
      for (int64_t k = 0; k < m; ++k) {
        u[k] = u[k] / Tc;
        v[k] = v[k] / Tc;
      }
    }
    if (taid_mix) {  // the TAID target's logits (lam = 0 copies u: no 0 * inf from -inf padding)
      const C* __restrict__ u = U + i;
      C* __restrict__ v = Vv + i;
      if (a.lam == 0.0) {
        for (int64_t k = 0; k < m; ++k) v[k] = u[k];
      } else {
        for (int64_t k = 0; k < m; ++k) v[k] = lam_c * v[k] + one_m_lam * u[k];
      }
    }
    mu = tile_max(U + i, m, mu);
    mv = tile_max(Vv + i, m, mv);
  }
  if (t_one) mz = mu;

  // ---- pass 1b: exps, LSEs ----
  const C mzc = mz;
  double s1[3];
  const bool ce_sep = need_ce && !t_one;  // exp(z - max z) needs its own pass
  row_sums<3, C>(V, s1, [&](int64_t i, int64_t m, C (&tile)[3][kTile]) {
    const C* __restrict__ u = U + i;
    const C* __restrict__ v = Vv + i;
    C* __restrict__ eu = EU + i;
    C* __restrict__ ev = EV + i;
    for (int64_t k = 0; k < m; ++k) {
      eu[k] = kd_exp(u[k] - mu);
      ev[k] = kd_exp(v[k] - mv);
      tile[0][k] = eu[k];
      tile[1][k] = ev[k];
    }
    if (ce_sep) {
      load_part(z, Vs, i, m, zt);
      for (int64_t k = 0; k < m; ++k) tile[2][k] = kd_exp(zt[k] - mzc);
    } else {
      for (int64_t k = 0; k < m; ++k) tile[2][k] = C(0);
    }
  });
  const C lse_u = C(double(mu) + std::log(s1[0])), lse_v = C(double(mv) + std::log(s1[1]));
  const C inv_u = C(1.0 / s1[0]), inv_v = C(1.0 / s1[1]);
  const double sz = ce_sep ? s1[2] : s1[0];
  const C lse_z = C(double(mzc) + std::log(sz));
  if (hard_rows) hard_rows[r] = need_ce ? C(double(lse_z) - double(load(z, y))) : C(0);

  // log q = u - lse_u, q = eu * inv_u; the same for p.
  auto LQ = [=](int64_t i) { return U[i] - lse_u; };
  auto LP = [=](int64_t i) { return Vv[i] - lse_v; };
  auto Q = [=](int64_t i) { return EU[i] * inv_u; };
  auto P = [=](int64_t i) { return EV[i] * inv_v; };

  int64_t kind = taid ? int64_t(kKdForwardKL) : a.kind;
  const double beta = a.beta;
  if ((kind == kKdJSD || kind == kKdJSDNormalized) && beta == 0.0) kind = kKdForwardKL;
  if ((kind == kKdJSD || kind == kKdJSDNormalized) && beta == 1.0) kind = kKdReverseKL;
  constexpr C zero = C(0);

  // ---- pass 2: the row sums; pass 3's per-element soft gradient gs(i) (w.r.t. u) ----
  // Then grad = (rw / T) gs + hw (softmax(z) - onehot(y)).
  C cs = rw / Tc;
  const bool soft_grad = rw != C(0);
  alignas(64) C gt[kTile];
  auto pass3 = [&](const auto& gs) {
    for (int64_t i = 0; i < V; i += kTile) {
      const int64_t m = std::min(kTile, V - i);
      if (soft_grad) {
        for (int64_t k = 0; k < m; ++k) gt[k] = cs * gs(i + k);
      } else {
        for (int64_t k = 0; k < m; ++k) gt[k] = zero;
      }
      if (hard_grad) add_hard_grad(gt, i, m, t_one ? U + i : nullptr, z, Vs, y, hw, lse_z);
      const int64_t ms = std::min(m, Vs - i);  // columns past the student's width are not its own
      if (ms > 0) store_tile(gt, ms, g + i, nt);
    }
    for (int64_t k = 0; k < kTile; ++k) gt[k] = zero;  // a truncated student: zero past V
    for (int64_t i = V; i < Vs; i += kTile) store_tile(gt, std::min(kTile, Vs - i), g + i, nt);
  };

  double D = 0.0;
  switch (kind) {
    case kKdForwardKL: {
      double s[1];
      row_sums<1, C>(V, s, [=](int64_t i, int64_t m, C (&tile)[1][kTile]) {
        for (int64_t k = 0; k < m; ++k) {
          const C p = P(i + k);
          tile[0][k] = p > zero ? p * (LP(i + k) - LQ(i + k)) : zero;
        }
      });
      D = s[0];
      pass3([=](int64_t i) { return Q(i) - P(i); });
      break;
    }
    case kKdReverseKL: {
      double s[1];
      row_sums<1, C>(V, s, [=](int64_t i, int64_t m, C (&tile)[1][kTile]) {
        for (int64_t k = 0; k < m; ++k) {
          const C q = Q(i + k);
          tile[0][k] = q > zero ? q * (LQ(i + k) - LP(i + k)) : zero;
        }
      });
      D = s[0];
      const C K = C(s[0]);
      pass3([=](int64_t i) {
        const C q = Q(i);
        return q > zero ? q * ((LQ(i) - LP(i)) - K) : zero;
      });
      break;
    }
    case kKdJSD:
    case kKdJSDNormalized: {
      const C lb = C(std::log(beta)), l1b = C(std::log1p(-beta));
      double s[2];
      row_sums<2, C>(V, s, [=](int64_t i, int64_t m, C (&tile)[2][kTile]) {
        C* __restrict__ w = W + i;
        for (int64_t k = 0; k < m; ++k) {
          const C lp = LP(i + k), lq = LQ(i + k), p = P(i + k), q = Q(i + k);
          const C lm = kd_logaddexp(lp + lb, lq + l1b);
          w[k] = lm;
          tile[0][k] = p > zero ? p * (lp - lm) : zero;
          tile[1][k] = q > zero ? q * (lq - lm) : zero;
        }
      });
      D = beta * s[0] + (1.0 - beta) * s[1];
      C f = C(1.0 - beta);
      if (kind == kKdJSDNormalized) {
        D /= beta * (1.0 - beta);
        f = C(1.0 / beta);
      }
      const C Kqm = C(s[1]);
      pass3([=](int64_t i) {
        const C q = Q(i);
        return q > zero ? f * (q * ((LQ(i) - W[i]) - Kqm)) : zero;
      });
      break;
    }
    case kKdTVD: {
      double s[2];
      row_sums<2, C>(V, s, [=](int64_t i, int64_t m, C (&tile)[2][kTile]) {
        for (int64_t k = 0; k < m; ++k) {
          const C p = P(i + k), q = Q(i + k), d = q - p;
          const C sg = C(0.5) * (C(q > p) - C(q < p));
          tile[0][k] = d < zero ? -d : d;
          tile[1][k] = q * sg;
        }
      });
      D = 0.5 * s[0];
      const C S = C(s[1]);
      pass3([=](int64_t i) {
        const C p = P(i), q = Q(i);
        const C sg = C(0.5) * (C(q > p) - C(q < p));
        return q * (sg - S);
      });
      break;
    }
    case kKdSkewForwardKL: {
      const double al = a.alpha;
      const C la = C(std::log(al)), l1a = C(std::log1p(-al));
      double s[2];
      row_sums<2, C>(V, s, [=](int64_t i, int64_t m, C (&tile)[2][kTile]) {
        C* __restrict__ w = W + i;
        for (int64_t k = 0; k < m; ++k) {
          const C lp = LP(i + k), lq = LQ(i + k), p = P(i + k), q = Q(i + k);
          const C lm = kd_logaddexp(lp + la, lq + l1a);
          const C pm0 = kd_exp(lp - lm);
          const C pm = p > zero ? pm0 : zero;  // p / m
          w[k] = pm;
          tile[0][k] = p > zero ? p * (lp - lm) : zero;
          tile[1][k] = q * pm;
        }
      });
      D = s[0];
      const C S = C(s[1]), f = C(1.0 - al);
      pass3([=](int64_t i) { return f * (Q(i) * (S - W[i])); });
      break;
    }
    case kKdSkewReverseKL: {
      const double al = a.alpha;
      const C la = C(std::log(al)), l1a = C(std::log1p(-al)), alc = C(al);
      double s[2];
      row_sums<2, C>(V, s, [=](int64_t i, int64_t m, C (&tile)[2][kTile]) {
        C* __restrict__ w = W + i;
        for (int64_t k = 0; k < m; ++k) {
          const C lp = LP(i + k), lq = LQ(i + k), q = Q(i + k);
          const C x = lq - kd_logaddexp(lp + l1a, lq + la);  // log(q / m')
          const C ex = kd_exp(x), av0 = x - alc * ex;
          const C av = q > zero ? av0 : zero;
          w[k] = av;
          tile[0][k] = q > zero ? q * x : zero;
          tile[1][k] = q * av;
        }
      });
      D = s[0];
      const C S = C(s[1]);
      pass3([=](int64_t i) { return Q(i) * (W[i] - S); });
      break;
    }
    case kKdMixed:
    default: {
      const double lam = a.lam;
      double s[2];
      row_sums<2, C>(V, s, [=](int64_t i, int64_t m, C (&tile)[2][kTile]) {
        for (int64_t k = 0; k < m; ++k) {
          const C p = P(i + k), q = Q(i + k), d = LQ(i + k) - LP(i + k);
          tile[0][k] = p > zero ? p * -d : zero;
          tile[1][k] = q > zero ? q * d : zero;
        }
      });
      D = lam * s[0] + (1.0 - lam) * s[1];
      const C K = C(s[1]), cl = C(lam), c1l = C(1.0 - lam);
      pass3([=](int64_t i) {
        const C p = P(i), q = Q(i);
        const C r2 = q > zero ? q * ((LQ(i) - LP(i)) - K) : zero;
        return cl * (q - p) + c1l * r2;
      });
      break;
    }
  }
  soft_rows[r] = C(D);
}

template <typename T> void kd_run(const Args& a) {
  using C = typename Compute<T>::type;
  if (a.N <= 0) return;
  if (a.V <= 0) {
    for (int64_t r = 0; r < a.N; ++r) {
      reinterpret_cast<C*>(a.soft_rows)[r] = C(0);
      if (a.hard_rows) reinterpret_cast<C*>(a.hard_rows)[r] = C(0);
    }
    return;
  }
  const int nthr = sched::threads_for(a.N * a.V);
  const bool nt = simd::stream_outputs(a.N * (a.s_width * 2 + a.t_width) * int64_t(sizeof(T)));
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    std::vector<C> scratch(size_t(5 * a.V));
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t r = 0; r < a.N; ++r) kd_row<T>(a, r, scratch.data(), nt);
    simd::stream_fence();
  }
}


// ---- top-k teacher (topk_kd_forward) ---------------------------------------------------------------
// Forward KL against K stored teacher log-probs per row (reference.topk_forward_kl; llm_kd.md Sec.
// 1.1). With S the row's ids, q = softmax(z / T), Q_S = sum_S q, q_tail = 1 - Q_S computed as the sum
// over the complement (no cancellation), p the normalized teacher (p_tail its (K+1)-th bucket), the
// gradient w.r.t. u = z / T is
//   renorm_teacher  q_j - p_j                       (p_j = 0 off S)
//   renorm_both     on S: q_j / Q_S - p_j; off S: 0
//   tail_bucket     on S: q_j - p_j; off S: q_j (P_S - p_tail Q_S / q_tail), P_S = sum_S p = 1 - p_tail.
// Traffic per row: read z once (s V bytes), the K ids and log-probs, write grad once; the same passes
// as kd_row without the teacher row, so about half kd_loss's bytes and exps.

enum TopkMode : int64_t { kRenormTeacher = 0, kRenormBoth = 1, kTailBucket = 2 };

struct TopkArgs {
  int64_t N, V, s_stride, K, mode;
  double T, ratio;  // ratio = T_gen / T: the stored log-probs' re-tempering power (1 = none)
  uintptr_t student, ids, logprobs, row_weight, labels, hard_weight, grad, soft_rows, hard_rows;
};

// Per-thread row scratch: U, EU, the teacher's p scattered by id (zero elsewhere), and the id mask.
// The last two are reset after each row at the K positions it set (O(K), not O(V)).
template <typename C> struct TopkScratch {
  std::vector<C> buf;
  std::vector<uint8_t> mask;
  explicit TopkScratch(int64_t V) : buf(size_t(3 * V), C(0)), mask(size_t(V), 0) {}
};

// Returns 0, or 1 + the offending position (an id out of range or repeated) for the error message.
template <typename T> int64_t topk_row(const TopkArgs& a, int64_t r, TopkScratch<typename Compute<T>::type>& sc,
                                       bool nt) {
  using C = typename Compute<T>::type;
  const int64_t V = a.V, K = a.K;
  const T* z = reinterpret_cast<const T*>(a.student) + r * a.s_stride;
  const int64_t* ids = reinterpret_cast<const int64_t*>(a.ids) + r * K;
  const C* lp = reinterpret_cast<const C*>(a.logprobs) + r * K;
  T* g = reinterpret_cast<T*>(a.grad) + r * V;
  C* soft_rows = reinterpret_cast<C*>(a.soft_rows);
  C* hard_rows = reinterpret_cast<C*>(a.hard_rows);
  const RowWeights<C> rwt = row_weights<C>(reinterpret_cast<const void*>(a.row_weight),
                                           reinterpret_cast<const void*>(a.labels),
                                           reinterpret_cast<const void*>(a.hard_weight), r);
  const C rw = rwt.rw, hw = rwt.hw;
  const int64_t y = rwt.y;
  const bool hard_grad = rwt.hard_grad;
  const bool need_ce = y >= 0 && (hard_grad || hard_rows != nullptr);
  constexpr C zero = C(0);
  alignas(64) C gt[kTile], zt[kTile];

  if (rw == zero && !hard_grad) {  // masked row
    soft_rows[r] = zero;
    if (hard_rows) hard_rows[r] = zero;
    for (int64_t k = 0; k < kTile; ++k) gt[k] = zero;
    for (int64_t i = 0; i < V; i += kTile) store_tile(gt, std::min(kTile, V - i), g + i, nt);
    return 0;
  }
  C* U = sc.buf.data();
  C* EU = U + V;
  C* Pv = U + 2 * V;
  uint8_t* mask = sc.mask.data();
  int64_t bad = 0;
  for (int64_t k = 0; k < K && !bad; ++k) {
    const int64_t id = ids[k];
    if (id < 0 || id >= V || mask[id]) bad = 1 + k;
    else mask[id] = 1;
  }
  auto reset = [&] {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t id = ids[k];
      if (id >= 0 && id < V) { mask[id] = 0; Pv[id] = zero; }
    }
  };
  if (bad) { reset(); return bad; }

  const C Tc = C(a.T);
  const bool t_one = a.T == 1.0;
  C mu = -C(__builtin_inf()), mz = mu;
  for (int64_t i = 0; i < V; i += kTile) {
    const int64_t m = std::min(kTile, V - i);
    load_tile(z + i, m, U + i);
    if (need_ce && !t_one) mz = tile_max(U + i, m, mz);
    if (!t_one) {
      C* __restrict__ u = U + i;
      for (int64_t k = 0; k < m; ++k) u[k] = u[k] / Tc;
    }
    mu = tile_max(U + i, m, mu);
  }
  if (t_one) mz = mu;
  const bool ce_sep = need_ce && !t_one;
  double s1[3];
  row_sums<3, C>(V, s1, [&](int64_t i, int64_t m, C (&tile)[3][kTile]) {
    const C* __restrict__ u = U + i;
    C* __restrict__ eu = EU + i;
    const uint8_t* __restrict__ mk = mask + i;
    for (int64_t k = 0; k < m; ++k) {
      eu[k] = kd_exp(u[k] - mu);
      tile[0][k] = eu[k];
      tile[1][k] = mk[k] ? zero : eu[k];
    }
    if (ce_sep) {
      load_tile(z + i, m, zt);
      for (int64_t k = 0; k < m; ++k) tile[2][k] = kd_exp(zt[k] - mz);
    } else {
      for (int64_t k = 0; k < m; ++k) tile[2][k] = zero;
    }
  });
  const double total = s1[0], tail = s1[1];
  const double lse_u = double(mu) + std::log(total);
  const C lse_z = C(double(mz) + std::log(ce_sep ? s1[2] : total));
  if (hard_rows) hard_rows[r] = need_ce ? C(double(lse_z) - double(load(z, y))) : zero;

  // the teacher: P_S of the stored values, its tail, re-tempered, normalized over K (+1)
  double PS = 0.0, sS = 0.0, lmax = -__builtin_inf();  // sS = sum_S EU = Q_S * total
  for (int64_t k = 0; k < K; ++k) {
    PS += std::exp(double(lp[k]));
    sS += double(EU[ids[k]]);
    lmax = std::max(lmax, a.ratio * double(lp[k]));
  }
  const bool tail_mode = a.mode == kTailBucket;
  const double ltp = (PS < 1.0 ? std::log1p(-PS) : -__builtin_inf()) * a.ratio;
  if (tail_mode) lmax = std::max(lmax, ltp);
  double zsum = tail_mode && ltp > -__builtin_inf() ? std::exp(ltp - lmax) : 0.0;
  for (int64_t k = 0; k < K; ++k) zsum += std::exp(a.ratio * double(lp[k]) - lmax);
  const double lZ = lmax + std::log(zsum);
  // renorm_both: log q~_i = u_i - LSE_S(u), from the ids' own maximum (K = 1 gives exactly 0)
  double lse_S = lse_u;
  if (a.mode == kRenormBoth) {
    double mS = -__builtin_inf(), e = 0.0;
    for (int64_t k = 0; k < K; ++k) mS = std::max(mS, double(U[ids[k]]));
    for (int64_t k = 0; k < K; ++k) e += std::exp(double(U[ids[k]]) - mS);
    lse_S = mS + std::log(e);
  }
  double D = 0.0, PSn = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double lpk = a.ratio * double(lp[k]) - lZ, pk = std::exp(lpk);
    const double lq = double(U[ids[k]]) - lse_S;
    if (pk > 0.0) D += pk * (lpk - lq);
    PSn += pk;
    // on S the gradient is EU_j in_S - Pv_j; renorm_both puts all of q~_j - p_j in Pv (in_S = 0),
    // from the ids' own LSE, so that K = 1 gives exactly 0
    Pv[ids[k]] = a.mode == kRenormBoth ? C(pk - std::exp(lq)) : C(pk);
  }
  double p_tail = 0.0;
  if (tail_mode && ltp > -__builtin_inf()) {
    p_tail = std::exp(ltp - lZ);
    const double lqt = std::log(tail) - std::log(total);
    if (p_tail > 0.0) D += p_tail * ((ltp - lZ) - lqt);
  }
  soft_rows[r] = C(D);

  // gradient: (rw / T) g + hw (softmax(z) - onehot(y))
  const C cs = rw / Tc, inv_total = C(1.0 / total);
  const C in_S = a.mode == kRenormBoth ? zero : inv_total;  // q_j = EU_j * in_S on S
  C off_S = inv_total;                                              // q_j (P_S - ...) / q_j off S
  if (a.mode == kRenormBoth) off_S = zero;
  if (tail_mode) off_S = C((PSn - (tail > 0.0 ? p_tail * sS / tail : 0.0)) / total);
  const bool soft_grad = rw != zero;
  for (int64_t i = 0; i < V; i += kTile) {
    const int64_t m = std::min(kTile, V - i);
    const C* __restrict__ eu = EU + i;
    const C* __restrict__ pv = Pv + i;
    const uint8_t* __restrict__ mk = mask + i;
    if (soft_grad) {
      for (int64_t k = 0; k < m; ++k) gt[k] = cs * (mk[k] ? eu[k] * in_S - pv[k] : eu[k] * off_S);
    } else {
      for (int64_t k = 0; k < m; ++k) gt[k] = zero;
    }
    if (hard_grad) add_hard_grad(gt, i, m, t_one ? U + i : nullptr, z, V, y, hw, lse_z);
    store_tile(gt, m, g + i, nt);
  }
  reset();
  return 0;
}

template <typename T> void topk_run(const TopkArgs& a) {
  using C = typename Compute<T>::type;
  if (a.N <= 0) return;
  const int nthr = sched::threads_for(a.N * a.V);
  const bool nt = simd::stream_outputs(a.N * a.V * 2 * int64_t(sizeof(T)));
  int64_t bad_row = -1, bad_pos = 0;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    TopkScratch<C> sc(a.V);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t r = 0; r < a.N; ++r) {
      const int64_t bad = topk_row<T>(a, r, sc, nt);
      if (bad) {
#pragma omp critical(fd_topk_error)
        if (bad_row < 0 || r < bad_row) { bad_row = r; bad_pos = bad - 1; }
      }
    }
    simd::stream_fence();
  }
  if (bad_row >= 0) {
    const int64_t id = reinterpret_cast<const int64_t*>(a.ids)[bad_row * a.K + bad_pos];
    throw std::invalid_argument("topk_kd_loss: teacher_ids[" + std::to_string(bad_row) + ", " +
                                std::to_string(bad_pos) + "] = " + std::to_string(id) +
                                (id < 0 || id >= a.V ? " is outside [0, " + std::to_string(a.V) + ")"
                                                     : " repeats an earlier id of its row (ids must be distinct)"));
  }
}

}  // namespace

void kd_forward(int64_t dtype, int64_t N, int64_t V, uintptr_t student, int64_t s_stride, int64_t s_width,
                uintptr_t teacher, int64_t t_stride, int64_t t_width, int64_t kind, double temperature, double beta,
                double alpha, double lam,
                uintptr_t row_weight, uintptr_t labels, uintptr_t hard_weight, uintptr_t grad, uintptr_t soft_rows,
                uintptr_t hard_rows) {
  if (kind < kKdForwardKL || kind > kKdTAID)
    throw std::invalid_argument("kd_forward: unsupported kind code " + std::to_string(kind) + " (0..8)");
  if (s_width < 1 || t_width < 1 || V < std::min(s_width, t_width) || V > std::max(s_width, t_width))
    throw std::invalid_argument("kd_forward: V must lie between the student's and the teacher's widths");
  const Args a{N, V, s_stride, s_width, t_stride, t_width, kind, temperature, beta, alpha, lam,
               student, teacher, row_weight, labels, hard_weight, grad, soft_rows, hard_rows};
  sched::dispatch_dtype(dtype, "kd_forward", [&](auto tag) { kd_run<typename decltype(tag)::type>(a); });
}


void topk_kd_forward(int64_t dtype, int64_t N, int64_t V, uintptr_t student, int64_t s_stride, int64_t K,
                     uintptr_t ids, uintptr_t logprobs, int64_t mode, double temperature, double ratio,
                     uintptr_t row_weight, uintptr_t labels, uintptr_t hard_weight, uintptr_t grad,
                     uintptr_t soft_rows, uintptr_t hard_rows) {
  if (mode < kRenormTeacher || mode > kTailBucket)
    throw std::invalid_argument("topk_kd_forward: unsupported mode code " + std::to_string(mode) + " (0..2)");
  if (K < 1 || K > V) throw std::invalid_argument("topk_kd_forward: K must be in [1, V]");
  const TopkArgs a{N, V, s_stride, K, mode, temperature, ratio, student, ids, logprobs,
                   row_weight, labels, hard_weight, grad, soft_rows, hard_rows};
  sched::dispatch_dtype(dtype, "topk_kd_forward", [&](auto tag) { topk_run<typename decltype(tag)::type>(a); });
}

}  // namespace cpu
}  // namespace flashdistill
