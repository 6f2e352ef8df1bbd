// CPU K3/K5, regression losses (LCM, CM, iCT, DSM): regression_forward / _backward of csrc/README.md,
// the math of include/flashdistill/regression.h.
//
// Traffic per element, s = sizeof(dtype) (4 fp32, 2 fp16/bf16, 8 fp64), t = 1 or 2 target rows:
//   forward   reads pred, t1 (+ t2): (1 + t) s, writes nothing per element (one sum per sample,
//             8 bytes of partials per 2048 elements): fp32 8 (12) bytes
//   backward  reads (1 + t) s, writes gpred s: fp32 12 (16) bytes
//   B = 64, D = 16*64*64 fp32, one target row: forward 33.6 MB, backward 50.3 MB.
//   Not counted: the read-for-ownership of gpred where the CPU does one: none when a call moves more
//   than simd::kStreamMinBytes (16 MiB), whose gpred goes out with streaming stores.
// Work per element: the target 0 (t1), 1 (c1 t1) or 3 (c1 t1 + c2 t2) flops and d 1; forward d² and
// the accumulation 2 (kind 1: d², + c², sqrt, - c, accumulate: 5); backward k d 1 (kind 1: d², + c²,
// sqrt, k d, division: 5). At most 9 flops (one a square root) per 12 bytes of fp32: memory-bound.
// Measured (Zen 4 VM, 2 threads, B = 64, D = 16*64*64 fp32, median of 30; copy_ of 256 MB: 28 GB/s):
// forward kind 0 / 1: 59 / 27 GB/s, backward 37 / 29 GB/s (the 34-50 MB partly sit in the 32 MB L3;
// with B = 256, from DRAM: 78-111% of copy_). Streaming gpred (B = 4, D = 16*16*60*104, against
// ordinary stores): fp32 0.74-0.9x the time, bf16 0.9-1.0x.
//
// Scheme (include/flashdistill/cpu_sched.h), as score_identity.cpp: the forward's items (b, k) each
// compute one partial sum of block k of sample b in simd::Lanes accumulators of the compute type,
// added in double in block order afterwards, so the sums are the same bits for any thread count and
// instruction set; the backward is elementwise over the same items. Rows go through tiles of kTile
// elements: kind 0/2 in one fused loop per tile; kind 1 writes d² + c² to a tile, takes its square
// roots with vector instructions (simd::sqrt_inplace: gcc will not vectorize sqrt itself, for errno;
// 3-4x in L2), then finishes. 16-bit rows: bf16 loads widen inline, fp16 rows per tile (F16C);
// 16-bit gpred goes through a float tile and simd::narrow.
// regression_forward_grad (eager CPU calls of the elementwise kinds, whose gradient at an upstream
// gradient of 1 is known before the backward): the forward's reduction and the backward's gpred in one
// pass, (1 + t) s read and s written per element instead of (2 + 2t) s and s.

// fp-contract=off: c1 t1 + c2 t2 and d² + c² stay two roundings each, as torch computes them,
// rather than FMAs where -march allows them, so the bits do not depend on the instruction set.
// no-trapping-math: lets gcc if-convert the conversions' selects (exception flags only).
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/cpu_simd.h"
#include "flashdistill/regression.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

using sched::Item;
using sched::kTile;  // fp16 rows are widened, and 16-bit gpred narrowed, in tiles this long
using sched::Rows;
using simd::ld;

// ---- lane loops over one tile (m <= kTile elements) ----------------------------------------------
// Kind 0/2 fuse everything into one loop; kind 1 writes sqrt's argument to a tile, takes the square
// roots of the tile in vector instructions (simd::sqrt_inplace) and finishes in a second loop.

// acc[j mod L] += d_j² for j < m (m: a multiple of L except at the end of a block).
template <int kTarget, typename T, typename C, int L>
inline void l2_lanes(const T* __restrict__ pred, const T* __restrict__ t1, const T* __restrict__ t2,
                     C c1, C c2, int64_t m, C (&acc)[L]) {
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l)
      acc[l] += reg_term<false>(reg_diff<kTarget>(ld(pred, i + l), ld(t1, i + l), ld(t2, i + l), c1, c2), C(0), C(0));
  for (int l = 0; i + l < m; ++l)
    acc[l] += reg_term<false>(reg_diff<kTarget>(ld(pred, i + l), ld(t1, i + l), ld(t2, i + l), c1, c2), C(0), C(0));
}

// acc[j mod L] += s_j - c for j < m, s: the tile of square roots.
template <typename C, int L> inline void huber_lanes(const C* __restrict__ s, C cr, int64_t m, C (&acc)[L]) {
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l) acc[l] += reg_huber_term(s[i + l], cr);
  for (int l = 0; i + l < m; ++l) acc[l] += reg_huber_term(s[i + l], cr);
}

// d[i] (when d is not null) and e[i] = d_i² + c² for i < m.
template <int kTarget, typename T, typename C>
inline void huber_arg(const T* __restrict__ pred, const T* __restrict__ t1, const T* __restrict__ t2,
                      C c1, C c2, C cc, int64_t m, C* __restrict__ d, C* __restrict__ e) {
  for (int64_t i = 0; i < m; ++i) {
    const C v = reg_diff<kTarget>(ld(pred, i), ld(t1, i), ld(t2, i), c1, c2);
    if (d) d[i] = v;
    e[i] = reg_huber_arg(v, cc);
  }
}

// g[i] = k d_i (kind 0, 2) for i < m.
template <int kTarget, typename T, typename C>
inline void l2_grad(const T* __restrict__ pred, const T* __restrict__ t1, const T* __restrict__ t2,
                    C c1, C c2, C k, int64_t m, C* __restrict__ g) {
  for (int64_t i = 0; i < m; ++i)
    g[i] = reg_grad<false>(reg_diff<kTarget>(ld(pred, i), ld(t1, i), ld(t2, i), c1, c2), k, C(0));
}

template <typename C>
inline void huber_grad(const C* __restrict__ d, const C* __restrict__ s, C k, int64_t m, C* __restrict__ g) {
  for (int64_t i = 0; i < m; ++i) g[i] = reg_huber_grad(d[i], k, s[i]);
}

// f(pred, t1, t2) on the tile [t, t + m) of the rows: the rows themselves where they load inline,
// fp16 widened into float buffers. t2 is t1 where the target has no t2 term (then never read).
template <int kTarget, typename T, typename F>
inline void with_tile(const T* pred, const T* t1, const T* t2, int64_t t, int64_t m, const F& f) {
  if constexpr (simd::kInlineLoad<T>) {
    f(pred + t, t1 + t, t2 + t);
  } else {
    alignas(64) float bp[kTile], b1[kTile], b2[kTile];
    simd::widen(pred + t, m, bp);
    simd::widen(t1 + t, m, b1);
    if (kTarget == kRegC1T1C2T2) simd::widen(t2 + t, m, b2);
    f(static_cast<const float*>(bp), static_cast<const float*>(b1),
      static_cast<const float*>(kTarget == kRegC1T1C2T2 ? b2 : b1));
  }
}

// ---- blocks ---------------------------------------------------------------------------------------

// The block's sum over its n elements. Tiles hold whole lane groups (kTile is a multiple of L), so
// lane l always takes the elements l mod L of the block.
template <int kTarget, bool kHuber, typename T, typename C = typename Compute<T>::type>
double sums_block(const T* pred, const T* t1, const T* t2, C c1, C c2, C cc, C cr, int64_t n) {
  constexpr int L = simd::Lanes<C>::n;
  C acc[L] = {};
  alignas(64) C e[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = std::min(kTile, n - t);
    with_tile<kTarget>(pred, t1, t2, t, m, [&](auto p, auto a, auto b) {
      if constexpr (kHuber) {
        huber_arg<kTarget>(p, a, b, c1, c2, cc, m, static_cast<C*>(nullptr), e);
        simd::sqrt_inplace(e, m);
        huber_lanes(e, cr, m, acc);
      } else {
        l2_lanes<kTarget>(p, a, b, c1, c2, m, acc);
      }
    });
  }
  return simd::lanes_total(acc);
}

// gpred over the block's n elements, stored rounded to T (16-bit: through a float tile); with
// streaming stores (through a tile in L1) when nt. kSums: also the block's sum, as sums_block computes
// it (the same lanes: the same bits), in the same pass (each tile is loaded from memory once, its
// second reading comes from L1); else 0.
template <int kTarget, bool kHuber, bool kSums, typename T, typename C = typename Compute<T>::type>
double grad_block(const T* pred, const T* t1, const T* t2, C c1, C c2, C cc, C cr, C k, int64_t n, T* g, bool nt) {
  constexpr int L = simd::Lanes<C>::n;
  C acc[L] = {};
  alignas(64) C d[kTile], e[kTile], bg[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = std::min(kTile, n - t);
    C* out = bg;
    if constexpr (std::is_same<T, C>::value)
      if (!nt) out = g + t;
    with_tile<kTarget>(pred, t1, t2, t, m, [&](auto p, auto a, auto b) {
      if constexpr (kHuber) {
        huber_arg<kTarget>(p, a, b, c1, c2, cc, m, d, e);
        simd::sqrt_inplace(e, m);
        if constexpr (kSums) huber_lanes(e, cr, m, acc);
        huber_grad(d, e, k, m, out);
      } else {
        if constexpr (kSums) l2_lanes<kTarget>(p, a, b, c1, c2, m, acc);
        l2_grad<kTarget>(p, a, b, c1, c2, k, m, out);
      }
    });
    if constexpr (std::is_same<T, C>::value) {
      if (nt) simd::stream_copy(bg, m, g + t);
    } else if (nt) {
      alignas(64) T line[kTile];
      simd::narrow(bg, m, line);
      simd::stream_copy(line, m, g + t);
    } else {
      simd::narrow(bg, m, g + t);
    }
  }
  return kSums ? simd::lanes_total(acc) : 0.0;
}

// One call's arguments.
template <typename T> struct Problem {
  using C = typename Compute<T>::type;
  int64_t B, D;
  Rows<T> pred, t1, t2;
  const C* coef;  // [B, 2] (c1, c2), or null: target = t1
  C cc, cr;       // c², c: formed in double, rounded once (as torch does with a Python float)

  template <int kTarget> C c1(int64_t b) const { return kTarget == kRegT1 ? C(1) : coef[2 * b]; }
  template <int kTarget> C c2(int64_t b) const { return kTarget == kRegC1T1C2T2 ? coef[2 * b + 1] : C(0); }

  // t2 row of sample b where the target uses it, else t1's (never read).
  template <int kTarget> const T* t2_row(int64_t b) const {
    return kTarget == kRegC1T1C2T2 ? t2.row(b) : t1.row(b);
  }

  // The item's partial sum, to *out.
  template <int kTarget, bool kHuber> void forward_item(const Item& it, double* out) const {
    const int64_t b = it.b, o = it.off;
    *out = sums_block<kTarget, kHuber>(pred.row(b) + o, t1.row(b) + o, t2_row<kTarget>(b) + o, c1<kTarget>(b),
                                       c2<kTarget>(b), cc, cr, it.n);
  }

  // Both at once: the item's partial sum to *out and its gpred.
  template <int kTarget, bool kHuber> void forward_grad_item(const Item& it, const C* k, T* g, bool nt,
                                                             double* out) const {
    const int64_t b = it.b, o = it.off;
    *out = grad_block<kTarget, kHuber, true>(pred.row(b) + o, t1.row(b) + o, t2_row<kTarget>(b) + o,
                                             c1<kTarget>(b), c2<kTarget>(b), cc, cr, k[b], it.n, g + b * D + o, nt);
    if (nt) simd::stream_fence();  // the reduction's threads do not fence at their end
  }

  template <int kTarget, bool kHuber> void backward_item(const Item& it, const C* k, T* g, bool nt) const {
    const int64_t b = it.b, o = it.off;
    grad_block<kTarget, kHuber, false>(pred.row(b) + o, t1.row(b) + o, t2_row<kTarget>(b) + o, c1<kTarget>(b),
                                       c2<kTarget>(b), cc, cr, k[b], it.n, g + b * D + o, nt);
  }
};

template <typename T>
Problem<T> make_problem(int64_t B, int64_t D, uintptr_t pred, int64_t pred_bs, uintptr_t t1, int64_t t1_bs,
                        uintptr_t t2, int64_t t2_bs, uintptr_t coef, double c) {
  using C = typename Compute<T>::type;
  return Problem<T>{B, D, sched::rows<T>(pred, pred_bs), sched::rows<T>(t1, t1_bs), sched::rows<T>(t2, t2_bs),
                    reinterpret_cast<const C*>(coef), C(c * c), C(c)};
}

// f(target, huber) with both as compile-time constants.
template <typename F> void dispatch_variant(const char* op, uintptr_t coef, uintptr_t t2, int64_t kind, const F& f) {
  if (kind != kRegL2 && kind != kRegHuber && kind != kRegPseudoHuber)
    throw std::invalid_argument(std::string(op) + ": unsupported kind " + std::to_string(kind) +
                                " (0 l2, 1 huber, 2 pseudo_huber)");
  sched::dispatch_bool(kind == kRegHuber, [&](auto huber) {
    if (!coef) f(std::integral_constant<int, kRegT1>{}, huber);
    else if (!t2) f(std::integral_constant<int, kRegC1T1>{}, huber);
    else f(std::integral_constant<int, kRegC1T1C2T2>{}, huber);
  });
}

}  // namespace

void regression_forward(int64_t dtype, int64_t B, int64_t D,
                        uintptr_t pred, int64_t pred_bs, uintptr_t t1, int64_t t1_bs, uintptr_t t2, int64_t t2_bs,
                        uintptr_t coef, int64_t kind, double c,
                        uintptr_t sums, uintptr_t /*workspace*/, int64_t /*workspace_bytes*/,
                        uintptr_t /*stream*/) {
  sched::dispatch_dtype(dtype, "regression_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    dispatch_variant("regression_forward", coef, t2, kind, [&](auto target, auto huber) {
      const Problem<T> P = make_problem<T>(B, D, pred, pred_bs, t1, t1_bs, t2, t2_bs, coef, c);
      sched::reduce<1>(B, D, reinterpret_cast<C*>(sums), [&](const Item& it, double* out) {
        P.template forward_item<decltype(target)::value, decltype(huber)::value>(it, out);
      });
    });
  });
}

int64_t regression_workspace_bytes(int64_t dtype, int64_t /*B*/, int64_t /*D*/) {
  sched::dispatch_dtype(dtype, "regression_workspace_bytes", [](auto) {});
  return 0;
}

void regression_backward(int64_t dtype, int64_t B, int64_t D,
                         uintptr_t pred, int64_t pred_bs, uintptr_t t1, int64_t t1_bs, uintptr_t t2, int64_t t2_bs,
                         uintptr_t coef, int64_t kind, double c, uintptr_t k, uintptr_t gpred, uintptr_t /*stream*/) {
  sched::dispatch_dtype(dtype, "regression_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    dispatch_variant("regression_backward", coef, t2, kind, [&](auto target, auto huber) {
      const Problem<T> P = make_problem<T>(B, D, pred, pred_bs, t1, t1_bs, t2, t2_bs, coef, c);
      const C* kp = reinterpret_cast<const C*>(k);
      T* g = reinterpret_cast<T*>(gpred);
      const bool nt = simd::stream_outputs((t2 ? 4 : 3) * B * D * int64_t(sizeof(T)));  // pred, t1 (t2), gpred
      sched::for_elementwise_items(B, D, [&](const Item& it) {
        P.template backward_item<decltype(target)::value, decltype(huber)::value>(it, kp, g, nt);
      });
    });
  });
}

void regression_forward_grad(int64_t dtype, int64_t B, int64_t D,
                             uintptr_t pred, int64_t pred_bs, uintptr_t t1, int64_t t1_bs, uintptr_t t2,
                             int64_t t2_bs, uintptr_t coef, int64_t kind, double c, uintptr_t k, uintptr_t sums,
                             uintptr_t gpred) {
  if (kind == kRegPseudoHuber)
    throw std::invalid_argument("regression_forward_grad: kind 2 (per-sample pseudo-Huber) needs the sums first; "
                                "use regression_forward, then regression_backward");
  sched::dispatch_dtype(dtype, "regression_forward_grad", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    dispatch_variant("regression_forward_grad", coef, t2, kind, [&](auto target, auto huber) {
      const Problem<T> P = make_problem<T>(B, D, pred, pred_bs, t1, t1_bs, t2, t2_bs, coef, c);
      const C* kp = reinterpret_cast<const C*>(k);
      T* g = reinterpret_cast<T*>(gpred);
      const bool nt = simd::stream_outputs((t2 ? 4 : 3) * B * D * int64_t(sizeof(T)));  // pred, t1 (t2), gpred
      sched::reduce<1>(B, D, reinterpret_cast<C*>(sums), [&](const Item& it, double* out) {
        P.template forward_grad_item<decltype(target)::value, decltype(huber)::value>(it, kp, g, nt, out);
      });
    });
  });
}

}  // namespace cpu
}  // namespace flashdistill
