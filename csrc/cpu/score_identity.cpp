// CPU K2, score identity losses (SiD, SIM, SFD): score_identity_forward / _backward of csrc/README.md,
// the math of include/flashdistill/score_identity.h.
//
// Traffic per element, s = sizeof(dtype) (4 fp32, 2 fp16/bf16, 8 fp64), g = guided predictions (0-2):
//   forward   reads x, r, f (+ r_u, f_u): (3 + g) s, writes nothing per element (3 sums per sample,
//             24 bytes of partials per 2048 elements): fp32 12 / 16 / 20 bytes
//   backward  reads (3 + g) s, writes one s per requested output (1-5): SiD without guidance
//             (gx, gr, gf) 6s = 24 bytes fp32; everything with both guided 10s = 40 bytes fp32
//   B = 64, D = 16*64*64 fp32: forward 50.3 MB (no guidance), backward (gx, gr, gf) 100.7 MB.
//   Not counted: the read-for-ownership of the outputs where the CPU does one: none when a call
//   moves more than simd::kStreamMinBytes (16 MiB), whose outputs go out with streaming stores.
// Work per element: forward y, u, x - r̄, |.|, y², y u and three accumulations: 9 flops, + 3 (sub,
// mul, add) per guided prediction. Backward y, u, Gx = (-P) y, Gr = P u + Q y: 6 flops, Gf 2 more,
// 1 per scaled output (a guided prediction's two parts), + 3 per guided prediction: at most 18.
// Under 1 flop per byte: memory-bound both ways. Measured (Zen 4 VM, 2 threads, B = 64,
// D = 16*64*64 fp32, median of 30; copy_ of 256 MB: 28 GB/s): forward 31 GB/s (34 with guidance on
// both), backward with (gx, gr, gf) 24 GB/s, all five outputs 25 GB/s: 86-123% of copy_ (copy_ also
// pays the read-for-ownership of its output; the forward has none). From DRAM (B = 256): 88-106%.
// Streaming the outputs (B = 4, D = 16*16*60*104 fp32, against ordinary stores): (gx, gr, gf)
// 0.58-0.68x the time, all five 0.66-0.79x; bf16 0.9-1.0x (its rounding is the limit there).
//
// Scheme (include/flashdistill/cpu_sched.h). Forward: item (b, k) = block k (kBlock elements) of
// sample b computes its three partial sums in simd::Lanes accumulators of the compute type, into its
// own slot; whole samples per task when B is large, all items split evenly when it is small; the
// partials are added in double, in block order, afterwards. No barrier, and the sums are the same
// bits for any thread count and instruction set (fp contraction is off below). Backward: pure
// elementwise over the same items; per tile of kTile elements Gx and Gr go to two buffers in L1, from
// which each requested output is scaled and rounded in its own short loop (one code path for any of
// the 2^5 output subsets; a dropped sample memsets its requested rows without reading any input).
//
// 16-bit rows: bf16 loads widen inline (a shift); fp16 rows are widened per tile (F16C). bf16
// outputs round inline (integer ops), fp16 ones through a float tile and simd::narrow (cpu_simd.h).
// Checked bit-identical: -march=x86-64 with -DFLASHDISTILL_NO_F16C, haswell and znver4 (AVX-512)
// builds; 1 and 2 threads (tests/test_skeleton_cpu_kernels.py).

// fp-contract=off: a + w * b stays two roundings, as torch computes it, rather than an FMA where
// -march allows one, so the bits do not depend on the instruction set. no-trapping-math: lets gcc
// if-convert the conversions' selects (it drops only the promise to keep exception flags).
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/cpu_simd.h"
#include "flashdistill/score_identity.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

using sched::Item;
using sched::kTile;  // 16-bit rows are widened, and outputs emitted, in tiles this long
using sched::Rows;
using simd::ld;

// ---- forward: the three sums of one block -------------------------------------------------------

// acc[j mod L] += each term of element j, j < m (m: a multiple of L except at the end of a block).
template <bool kR, bool kF, typename T, typename C, int L>
inline void sums_lanes(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ ru, C wr,
                       const T* __restrict__ f, const T* __restrict__ fu, C wf, int64_t m,
                       C (&sa)[L], C (&sq)[L], C (&sy)[L]) {
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l) {
      const SidTerms<C> t = sid_terms(ld(x, i + l), sid_guided<kR>(ld(r, i + l), ld(ru, i + l), wr),
                                      sid_guided<kF>(ld(f, i + l), ld(fu, i + l), wf));
      sa[l] += t.abs_xr;
      sq[l] += t.yy;
      sy[l] += t.yu;
    }
  for (int l = 0; i + l < m; ++l) {
    const SidTerms<C> t = sid_terms(ld(x, i + l), sid_guided<kR>(ld(r, i + l), ld(ru, i + l), wr),
                                    sid_guided<kF>(ld(f, i + l), ld(fu, i + l), wf));
    sa[l] += t.abs_xr;
    sq[l] += t.yy;
    sy[l] += t.yu;
  }
}

// out[0..2] = the block's sums of |x - r̄|, y², y u over its n elements. Tiles keep lane l on the
// elements l mod L (kTile is a multiple of L), so the fp16 path adds in the same order.
template <bool kR, bool kF, typename T, typename C = typename Compute<T>::type>
void sums_block(const T* x, const T* r, const T* ru, C wr, const T* f, const T* fu, C wf, int64_t n,
                double* out) {
  constexpr int L = simd::Lanes<C>::n;
  C sa[L] = {}, sq[L] = {}, sy[L] = {};
  if constexpr (simd::kInlineLoad<T>) {
    sums_lanes<kR, kF>(x, r, kR ? ru : r, wr, f, kF ? fu : f, wf, n, sa, sq, sy);
  } else {
    alignas(64) float bx[kTile], br[kTile], bru[kTile], bf[kTile], bfu[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t m = std::min(kTile, n - t);
      simd::widen(x + t, m, bx);
      simd::widen(r + t, m, br);
      if (kR) simd::widen(ru + t, m, bru);
      simd::widen(f + t, m, bf);
      if (kF) simd::widen(fu + t, m, bfu);
      sums_lanes<kR, kF>(bx, br, kR ? bru : br, wr, bf, kF ? bfu : bf, wf, m, sa, sq, sy);
    }
  }
  out[0] = simd::lanes_total(sa);
  out[1] = simd::lanes_total(sq);
  out[2] = simd::lanes_total(sy);
}

// ---- backward: one tile -------------------------------------------------------------------------

// gx[i] = -P y_i, gr[i] = P u_i + Q y_i for i < m (np = -P).
template <bool kR, bool kF, typename T, typename C>
inline void g_tile(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ ru, C wr,
                   const T* __restrict__ f, const T* __restrict__ fu, C wf, C np, C p, C q, int64_t m,
                   C* __restrict__ gx, C* __restrict__ gr) {
  for (int64_t i = 0; i < m; ++i) {
    const C rb = sid_guided<kR>(ld(r, i), ld(ru, i), wr), fb = sid_guided<kF>(ld(f, i), ld(fu, i), wf);
    const C y = sid_y(rb, fb), u = sid_u(fb, ld(x, i));
    gx[i] = sid_grad_x(np, y);
    gr[i] = sid_grad_r(p, q, y, u);
  }
}

// dst[i] = s src[i] (kScale) or src[i], rounded to T, for i < m; tmp: a tile of scratch.
template <bool kScale, typename T, typename C>
inline void emit_to(const C* __restrict__ src, C s, int64_t m, T* __restrict__ dst, C* __restrict__ tmp) {
  if constexpr (std::is_same<T, C>::value) {
    for (int64_t i = 0; i < m; ++i) dst[i] = kScale ? s * src[i] : src[i];
  } else if constexpr (std::is_same<T, bf16_t>::value) {  // integer rounding: vectorizes fused
    for (int64_t i = 0; i < m; ++i) dst[i].bits = simd::float_to_bf16_vec(kScale ? s * src[i] : src[i]);
  } else if constexpr (kScale) {
    for (int64_t i = 0; i < m; ++i) tmp[i] = s * src[i];
    simd::narrow(tmp, m, dst);
  } else {
    simd::narrow(src, m, dst);
  }
}

// emit_to, with streaming stores (through a tile of T in L1) when nt.
template <bool kScale, typename T, typename C>
inline void emit(const C* __restrict__ src, C s, int64_t m, T* __restrict__ dst, C* __restrict__ tmp, bool nt) {
  if (nt) {
    alignas(64) T line[kTile];
    emit_to<kScale>(src, s, m, line, tmp);
    simd::stream_copy(line, m, dst);
  } else {
    emit_to<kScale>(src, s, m, dst, tmp);
  }
}

// ---- the op -------------------------------------------------------------------------------------

// One call's arguments. Outputs of absent guided parts (gr_u without r_u) are never written.
template <typename T> struct Problem {
  using C = typename Compute<T>::type;
  int64_t B, D;
  Rows<T> x, r, ru, f, fu;
  const C* wr_ptr;
  double wr;
  const C* wf_ptr;
  double wf;

  // w of sample b and its complement 1 - w: in C from a per-sample w (as the reference's tensor
  // ops), in double and rounded once from a scalar w (as torch does with a Python float).
  static C w_at(const C* w_ptr, double w, int64_t b) { return w_ptr ? w_ptr[b] : C(w); }
  static C rest_at(const C* w_ptr, double w, int64_t b) { return w_ptr ? C(1) - w_ptr[b] : C(1.0 - w); }

  // The item's three partial sums, to out[0..2].
  template <bool kR, bool kF> void forward_item(const Item& it, double* out) const {
    const int64_t b = it.b, o = it.off;
    const T* rr = r.row(b) + o;
    const T* fr = f.row(b) + o;
    sums_block<kR, kF>(x.row(b) + o, rr, kR ? ru.row(b) + o : rr, kR ? w_at(wr_ptr, wr, b) : C(0), fr,
                       kF ? fu.row(b) + o : fr, kF ? w_at(wf_ptr, wf, b) : C(0), it.n, out);
  }

  template <bool kR, bool kF>
  void backward_item(const Item& it, const C* coef, bool nt, T* gx, T* gr, T* gru, T* gf, T* gfu) const {
    const int64_t b = it.b, o = it.off, n = it.n, base = b * D + o;
    const C p = coef[2 * b], q = coef[2 * b + 1];
    if (sid_dropped(p, q)) {
      for (T* g : {gx, gr, gru, gf, gfu})
        if (g) std::memset(static_cast<void*>(g + base), 0, size_t(n) * sizeof(T));  // +0 in every dtype
      return;
    }
    const C np = -p;
    const C w_r = kR ? w_at(wr_ptr, wr, b) : C(1), rest_r = kR ? rest_at(wr_ptr, wr, b) : C(0);
    const C w_f = kF ? w_at(wf_ptr, wf, b) : C(1), rest_f = kF ? rest_at(wf_ptr, wf, b) : C(0);
    const T* xr = x.row(b) + o;
    const T* rr = r.row(b) + o;
    const T* rur = kR ? ru.row(b) + o : rr;
    const T* fr = f.row(b) + o;
    const T* fur = kF ? fu.row(b) + o : fr;
    alignas(64) C tgx[kTile], tgr[kTile], tgf[kTile], tmp[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t m = std::min(kTile, n - t);
      if constexpr (simd::kInlineLoad<T>) {
        g_tile<kR, kF>(xr + t, rr + t, rur + t, w_r, fr + t, fur + t, w_f, np, p, q, m, tgx, tgr);
      } else {
        alignas(64) float bx[kTile], br[kTile], bru[kTile], bf[kTile], bfu[kTile];
        simd::widen(xr + t, m, bx);
        simd::widen(rr + t, m, br);
        if (kR) simd::widen(rur + t, m, bru);
        simd::widen(fr + t, m, bf);
        if (kF) simd::widen(fur + t, m, bfu);
        g_tile<kR, kF>(bx, br, kR ? bru : br, w_r, bf, kF ? bfu : bf, w_f, np, p, q, m, tgx, tgr);
      }
      const int64_t at = base + t;
      if (gx) emit<false>(tgx, C(1), m, gx + at, tmp, nt);
      if (gr) emit<kR>(tgr, w_r, m, gr + at, tmp, nt);
      if (kR && gru) emit<true>(tgr, rest_r, m, gru + at, tmp, nt);
      if (gf || (kF && gfu)) {
        for (int64_t i = 0; i < m; ++i) tgf[i] = sid_grad_f(tgx[i], tgr[i]);
        if (gf) emit<kF>(tgf, w_f, m, gf + at, tmp, nt);
        if (kF && gfu) emit<true>(tgf, rest_f, m, gfu + at, tmp, nt);
      }
    }
  }
};

template <typename T>
Problem<T> make_problem(int64_t B, int64_t D, uintptr_t x, int64_t x_bs, uintptr_t r, int64_t r_bs,
                        uintptr_t r_u, int64_t r_u_bs, uintptr_t wr_ptr, double wr, uintptr_t f,
                        int64_t f_bs, uintptr_t f_u, int64_t f_u_bs, uintptr_t wf_ptr, double wf) {
  using C = typename Compute<T>::type;
  return Problem<T>{B, D, sched::rows<T>(x, x_bs), sched::rows<T>(r, r_bs), sched::rows<T>(r_u, r_u_bs),
                    sched::rows<T>(f, f_bs), sched::rows<T>(f_u, f_u_bs), reinterpret_cast<const C*>(wr_ptr),
                    wr, reinterpret_cast<const C*>(wf_ptr), wf};
}

}  // namespace

void score_identity_forward(int64_t dtype, int64_t B, int64_t D,
                            uintptr_t x, int64_t x_bs,
                            uintptr_t r, int64_t r_bs, uintptr_t r_u, int64_t r_u_bs, uintptr_t wr_ptr, double wr,
                            uintptr_t f, int64_t f_bs, uintptr_t f_u, int64_t f_u_bs, uintptr_t wf_ptr, double wf,
                            uintptr_t sums, uintptr_t /*workspace*/, int64_t /*workspace_bytes*/,
                            uintptr_t /*stream*/) {
  sched::dispatch_dtype(dtype, "score_identity_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    const Problem<T> P = make_problem<T>(B, D, x, x_bs, r, r_bs, r_u, r_u_bs, wr_ptr, wr, f, f_bs, f_u,
                                         f_u_bs, wf_ptr, wf);
    sched::dispatch_bool(P.ru.p != nullptr, [&](auto kr) {
      sched::dispatch_bool(P.fu.p != nullptr, [&](auto kf) {
        sched::reduce<3>(B, D, reinterpret_cast<C*>(sums), [&](const Item& it, double* out) {
          P.template forward_item<decltype(kr)::value, decltype(kf)::value>(it, out);
        });
      });
    });
  });
}

int64_t score_identity_workspace_bytes(int64_t dtype, int64_t /*B*/, int64_t /*D*/) {
  sched::dispatch_dtype(dtype, "score_identity_workspace_bytes", [](auto) {});
  return 0;
}

void score_identity_backward(int64_t dtype, int64_t B, int64_t D,
                             uintptr_t x, int64_t x_bs,
                             uintptr_t r, int64_t r_bs, uintptr_t r_u, int64_t r_u_bs, uintptr_t wr_ptr, double wr,
                             uintptr_t f, int64_t f_bs, uintptr_t f_u, int64_t f_u_bs, uintptr_t wf_ptr, double wf,
                             uintptr_t coef, uintptr_t gx, uintptr_t gr, uintptr_t gr_u, uintptr_t gf, uintptr_t gf_u,
                             uintptr_t /*stream*/) {
  sched::dispatch_dtype(dtype, "score_identity_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    if (!(gx || gr || gf || (r_u && gr_u) || (f_u && gf_u))) return;
    const Problem<T> P = make_problem<T>(B, D, x, x_bs, r, r_bs, r_u, r_u_bs, wr_ptr, wr, f, f_bs, f_u,
                                         f_u_bs, wf_ptr, wf);
    const C* cf = reinterpret_cast<const C*>(coef);
    T* o[5] = {reinterpret_cast<T*>(gx), reinterpret_cast<T*>(gr), reinterpret_cast<T*>(r_u ? gr_u : 0),
               reinterpret_cast<T*>(gf), reinterpret_cast<T*>(f_u ? gf_u : 0)};
    const int64_t rows_moved = 3 + (r_u ? 1 : 0) + (f_u ? 1 : 0) + std::count_if(o, o + 5, [](T* p) { return p; });
    const bool nt = simd::stream_outputs(rows_moved * B * D * int64_t(sizeof(T)));
    sched::dispatch_bool(r_u != 0, [&](auto kr) {
      sched::dispatch_bool(f_u != 0, [&](auto kf) {
        sched::for_elementwise_items(B, D, [&](const Item& it) {
          P.template backward_item<decltype(kr)::value, decltype(kf)::value>(it, cf, nt, o[0], o[1], o[2], o[3], o[4]);
        });
      });
    });
  });
}

}  // namespace cpu
}  // namespace flashdistill
