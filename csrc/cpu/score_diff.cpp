// CPU score-difference forward (K1): score_diff_forward of csrc/README.md, the math of
// include/flashdistill/score_diff.h. DMD/DMD2 is the case a = fake, b = real (+ real_uncond), norm = 1.
//
// Traffic, per element, with s = sizeof(dtype) (4 fp32, 2 fp16/bf16, 8 fp64); [p] is 1 where the
// input p is given, else 0:
//   norm = 1, two passes per sample:
//     pass 1  reads x, b (+ b_u) (+ xt) from memory                      (2 + [b_u] + [xt]) s
//     pass 2  reads b (+ b_u) again, from L2 (see below), and a (+ a_u) from memory; writes g
//             memory:                                                    (1 + [a_u]) s read + s written
//     total   (4 + [a_u] + [b_u] + [xt]) s bytes per element. DMD: 4s, 5s with CFG; B = 64,
//             D = 16*64*64 fp32: 4 x 16.8 = 67.1 MB (83.9 MB with CFG).
//   norm = 0 (SDS, VSD), one pass: reads a (+ a_u), b (+ b_u), writes g; x and xt are not read:
//             (3 + [a_u] + [b_u]) s bytes per element, 3s for plain SDS (67.1 MB at the shape above
//             with CFG on a).
//   Not counted: the read-for-ownership of g where the CPU does one (none when g is streamed, below);
//   per-sample arrays (B values);
//   partial sums (16 bytes per 2048 elements); the re-read of b (+ b_u) where a sample's rows do
//   not fit in L2.
// Work per element: pass 1 sub, abs, add (+ sub, mul, add for CFG on b; + 2 mul, add for xt);
// pass 2 sub, div (norm), mul, add and the 3 compares and 3 selects of nan_to_num (which also clip),
// + sub, mul, add per CFG, + 2 mul with xt or a scale. DMD: 7 arithmetic ops (13 with CFG), one a
// division, per 16 (20) bytes of fp32: memory-bound, with the division's throughput next (in L2,
// one core does ~3 elements per ns).
//
// Scheme. With norm, n_b needs all of sample b before any g of it: two passes per sample. Rows are
// cut into blocks of kBlock elements (the last block of a row is short); item it = b * nblk + k is
// block k of sample b and has two partial sums, p1 (of |x - r|) and p2 (of g^2).
//  - B >= kSamplesPerThread * threads (the usual case): a task is one sample (several when D is
//    small), running pass 1, n_b, pass 2; tasks go to threads dynamically. No barrier, and while a
//    sample's rows fit in L2 (2 MiB here: D up to ~128K fp32 for DMD without CFG) pass 2 re-reads
//    them from there, so memory sees the bytes above.
//  - fewer samples: their blocks are split evenly across the threads, in chunks of samples whose
//    pass-1 rows take ~kChunkBytesPerThread per thread; pass 1, one barrier, pass 2 on the same
//    blocks by the same thread (its L2 again).
// Without norm there is one pass: all items in dynamic chunks of >= kTaskElems elements.
// Within a block, sums run in Lanes<C>::n accumulators of the compute type (lane l takes the
// elements l mod n of the block), which gcc keeps in vector registers; the lanes, the blocks of a
// sample and the samples are then added in double in index order. So every rounding depends on
// (B, D) alone: g and loss are the same bits for any thread count, either scheme, and any
// instruction set (fp contraction is off below); tests check 1-4 threads, SSE2 and AVX-512 builds.
//
// Configurations. Every optional input is a template flag of the block loops (pass 1: CFG on b, xt;
// pass 2: CFG on a, CFG on b, a multiplier (xt's C_b and/or the scale), norm), so each of the 4 + 16
// loops per dtype is straight-line code and the DMD loops are what they were; a block calls its
// loop through a function pointer chosen once per call. clip costs nothing: it is the bound of
// nan_to_num's selects (score_diff.h).
//
// 16-bit rows: bf16 loads widen inline (a shift); fp16 rows are widened per tile of kTile elements
// (F16C, or integer code where the CPU lacks it), and 16-bit g goes through a float tile that is
// then rounded (F16C, or integer code): cpu_simd.h's conversions, which give the bits of common.h's
// to_float / to_bf16 / to_f16 (checked for all inputs), but NaN payloads, which nan_to_num erases.
// A large g (simd::stream_outputs) goes out with streaming stores, through a tile in L1 (B = 4,
// D = 16*16*60*104, DMD with CFG: fp32 0.9x the time of ordinary stores, bf16 1.0x).

// fp-contract=off: a + w * b stays two roundings, as torch computes it, rather than an FMA where
// -march allows one, so the bits do not depend on the instruction set. no-trapping-math: lets gcc
// if-convert the selects of nan_to_num and the conversions without AVX-512 masks (it only drops
// the promise to keep floating-point exception flags; every value is unchanged).
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/cpu_simd.h"
#include "flashdistill/score_diff.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

// Blocks, tiles, rows and thread counts as the other CPU kernels (cpu_sched.h): kBlock elements per
// partial sum (fixes the results), 16-bit rows widened and 16-bit g rounded in tiles of kTile.
using sched::kBlock;
using sched::kSamplesPerThread;
using sched::kTaskElems;
using sched::kTile;
using sched::Rows;
using simd::ld;
constexpr int64_t kChunkBytesPerThread = 768 << 10;  // few samples: pass-1 bytes per thread kept for pass 2

// Independent accumulators per sum: 4 AVX2 registers of float, 4 of double. K1's own, not
// simd::Lanes (16 floats): they fix the order of the additions, so changing them changes the bits.
template <typename C> struct Lanes;
template <> struct Lanes<float> { static constexpr int n = 32; };
template <> struct Lanes<double> { static constexpr int n = 16; };
static_assert(kTile % Lanes<float>::n == 0 && kTile % Lanes<double>::n == 0, "tiles must hold whole lane groups");

// ---- per-block kernels -----------------------------------------------------------------------
//
// The lane loops take their rows as __restrict__ parameters and the accumulators as a local array
// of the caller, so that gcc keeps the L lanes in vector registers. They load through simd::ld (bf16
// loads widen inline; see simd::kInlineLoad). An absent row is passed as an alias of a present one
// and never read (its loads are dead code in that configuration).

// The template flags of the block loops: pass 1 (the normaliser's teacher r) and pass 2 (g).
enum : int { kP1CfgB = 1, kP1Xt = 2, kP1Count = 4 };
enum : int { kP2CfgA = 1, kP2CfgB = 2, kP2Mul = 4, kP2Norm = 8, kP2Count = 16 };

// The per-sample constants of one block, in C; each configuration reads only its own.
template <typename C> struct Coef {
  C wa, wb;  // guidance of a and of b
  C A, Cc;   // xt's (A_b, C_b), for r
  C m1, m2;  // multipliers of d: (C_b, s_b), (C_b, 1) or (s_b, 1)
  C n;       // n_b
  C big;     // bound of g: sd_bound(clip)
  C gs;      // factor of the stored g (1, or the loss factor: the gradient itself; the sum uses g)
};

// r at element j (score_diff.h).
template <int F, typename T, typename C>
inline C r_at(const T* bs, const T* bus, const T* xts, int64_t j, C wb, C A, C Cc) {
  return sd_teacher<(F & kP1Xt) != 0>(sd_guided<(F & kP1CfgB) != 0>(ld(bs, j), ld(bus, j), wb), ld(xts, j), A, Cc);
}

// g at element j, unrounded (score_diff.h).
template <int F, typename T, typename C>
inline C g_at(const T* as, const T* aus, const T* bs, const T* bus, int64_t j, C wa, C wb, C m1, C m2, C n,
              C big) {
  const C abar = sd_guided<(F & kP2CfgA) != 0>(ld(as, j), ld(aus, j), wa);
  const C bbar = sd_guided<(F & kP2CfgB) != 0>(ld(bs, j), ld(bus, j), wb);
  return sd_g<(F & kP2Norm) != 0>(sd_diff<(F & kP2Mul) != 0>(abar, bbar, m1, m2), n, big);
}

// acc[j mod L] += |x_j - r_j| for j < m (m: a multiple of L except at the end of a block).
template <int F, typename T, typename C, int L>
inline void abs_lanes(const T* __restrict__ xs, const T* __restrict__ bs, const T* __restrict__ bus,
                      const T* __restrict__ xts, const Coef<C>& k, int64_t m, C (&acc)[L]) {
  const C wb = k.wb, A = k.A, Cc = k.Cc;
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l) acc[l] += sd_abs_term(ld(xs, i + l), r_at<F>(bs, bus, xts, i + l, wb, A, Cc));
  for (int l = 0; i + l < m; ++l) acc[l] += sd_abs_term(ld(xs, i + l), r_at<F>(bs, bus, xts, i + l, wb, A, Cc));
}

// g_j stored to gs and acc[j mod L] += g_j^2 (g_j unrounded) for j < m.
template <int F, typename T, typename G, typename C, int L>
inline void g_lanes(const T* __restrict__ as, const T* __restrict__ aus, const T* __restrict__ bs,
                    const T* __restrict__ bus, const Coef<C>& k, G* __restrict__ gs, int64_t m, C (&acc)[L]) {
  const C wa = k.wa, wb = k.wb, m1 = k.m1, m2 = k.m2, n = k.n, big = k.big, f = k.gs;
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l) {
      const C v = g_at<F>(as, aus, bs, bus, i + l, wa, wb, m1, m2, n, big);
      gs[i + l] = v * f;
      acc[l] += v * v;
    }
  for (int l = 0; i + l < m; ++l) {
    const C v = g_at<F>(as, aus, bs, bus, i + l, wa, wb, m1, m2, n, big);
    gs[i + l] = v * f;
    acc[l] += v * v;
  }
}

// Rows loaded inline by ld (simd::kInlineLoad) vectorize with the lane loop; fp16 rows are widened
// per tile (F16C, or the integer conversion, which gcc vectorizes alone but not fused into the lane
// loop). 16-bit g always goes through a float tile and simd::narrow, for the same reason.

// Sum over the block's n elements of |x - r|. Tiles keep lane l on the elements l mod L (kTile is
// a multiple of L), so tiled and untiled loops give the same bits.
template <int F, typename T, typename C = typename Compute<T>::type>
double pass1_block(const T* x, const T* b, const T* bu, const T* xt, const Coef<C> k, int64_t n) {
  constexpr bool kCfg = F & kP1CfgB, kXt = F & kP1Xt;
  constexpr int L = Lanes<C>::n;
  C acc[L] = {};
  if constexpr (simd::kInlineLoad<T>) {
    abs_lanes<F>(x, b, kCfg ? bu : b, kXt ? xt : b, k, n, acc);
  } else {
    alignas(64) float bx[kTile], bb[kTile], bbu[kTile], bxt[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t m = std::min(kTile, n - t);
      simd::widen(x + t, m, bx);
      simd::widen(b + t, m, bb);
      if (kCfg) simd::widen(bu + t, m, bbu);
      if (kXt) simd::widen(xt + t, m, bxt);
      abs_lanes<F>(bx, bb, kCfg ? bbu : bb, kXt ? bxt : bb, k, m, acc);
    }
  }
  return simd::lanes_total(acc);
}

// g over the block's n elements; returns the sum of g^2. nt: g goes through a tile in L1 and
// streaming stores (tiles keep the lanes on the same elements: the same bits).
template <int F, typename T, typename C = typename Compute<T>::type>
double pass2_block(const T* a, const T* au, const T* b, const T* bu, const Coef<C> k, T* g, int64_t n, bool nt) {
  constexpr bool kCfgA = F & kP2CfgA, kCfgB = F & kP2CfgB;
  constexpr int L = Lanes<C>::n;
  C acc[L] = {};
  if constexpr (std::is_same<T, C>::value) {
    if (!nt) {
      g_lanes<F>(a, kCfgA ? au : a, b, kCfgB ? bu : b, k, g, n, acc);
    } else {
      alignas(64) C bg[kTile];
      for (int64_t t = 0; t < n; t += kTile) {
        const int64_t m = std::min(kTile, n - t);
        g_lanes<F>(a + t, kCfgA ? au + t : a + t, b + t, kCfgB ? bu + t : b + t, k, bg, m, acc);
        simd::stream_copy(bg, m, g + t);
      }
    }
  } else {
    alignas(64) float ba[kTile], bau[kTile], bb[kTile], bbu[kTile], bg[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t m = std::min(kTile, n - t);
      if constexpr (simd::kInlineLoad<T>) {
        g_lanes<F>(a + t, kCfgA ? au + t : a + t, b + t, kCfgB ? bu + t : b + t, k, bg, m, acc);
      } else {
        simd::widen(a + t, m, ba);
        if (kCfgA) simd::widen(au + t, m, bau);
        simd::widen(b + t, m, bb);
        if (kCfgB) simd::widen(bu + t, m, bbu);
        g_lanes<F>(ba, kCfgA ? bau : ba, bb, kCfgB ? bbu : bb, k, bg, m, acc);
      }
      if (nt) {
        alignas(64) T line[kTile];
        simd::narrow(bg, m, line);
        simd::stream_copy(line, m, g + t);
      } else {
        simd::narrow(bg, m, g + t);
      }
    }
  }
  return simd::lanes_total(acc);
}

// ---- the op ----------------------------------------------------------------------------------

// score_diff_forward's arguments as they came (csrc/README.md); pointers of absent inputs are 0.
struct Args {
  int64_t B, D;
  uintptr_t x;
  int64_t x_bs;
  uintptr_t a;
  int64_t a_bs;
  uintptr_t a_u;
  int64_t a_u_bs;
  uintptr_t wa_ptr;
  double wa;
  uintptr_t b;
  int64_t b_bs;
  uintptr_t b_u;
  int64_t b_u_bs;
  uintptr_t wb_ptr;
  double wb;
  uintptr_t xt;
  int64_t xt_bs;
  uintptr_t coef, scale;
  bool norm;
  double eps, clip, loss_factor;
  uintptr_t g, loss;
  double g_scale;
};

// One call's inputs and its per-block partial sums: p1 of |x - r| and p2 of g^2, item
// it = smp * nblk + k for block k of sample smp. Every item is computed the same way whichever
// thread runs it and whenever, and the partials are added in index order, so the schedule never
// shows. pass1_fn / pass2_fn: the block loops of this call's configuration.
template <typename T> struct Problem {
  using C = typename Compute<T>::type;
  using Pass1Fn = double (*)(const Problem&, int64_t smp, int64_t off, int64_t n);
  using Pass2Fn = double (*)(const Problem&, int64_t smp, int64_t off, int64_t n, C nb);
  int64_t B, D, nblk;
  Rows<T> x, a, a_u, b, b_u, xt;  // p == nullptr: absent
  const C* wa_ptr;  // nullptr: wa for every sample (likewise wb_ptr)
  const C* wb_ptr;
  const C* coef;    // [B, 2] (A_b, C_b), with xt
  const C* scale;   // nullptr: s_b = 1
  C wa, wb, eps, big, gscale;
  T* g;
  double* p1;
  double* p2;
  Pass1Fn pass1_fn;
  Pass2Fn pass2_fn;
  bool nt;  // g with streaming stores (simd::stream_outputs)

  Coef<C> coefs(int64_t smp, C nb) const {
    Coef<C> k;
    k.wa = wa_ptr ? wa_ptr[smp] : wa;
    k.wb = wb_ptr ? wb_ptr[smp] : wb;
    const C s = scale ? scale[smp] : C(1);
    if (xt.p) {
      k.A = coef[2 * smp];
      k.Cc = coef[2 * smp + 1];
      k.m1 = k.Cc;
      k.m2 = s;
    } else {
      k.A = C(0);
      k.Cc = C(1);
      k.m1 = s;
      k.m2 = C(1);
    }
    k.n = nb;
    k.big = big;
    k.gs = gscale;
    return k;
  }

  void pass1(int64_t it) const {
    const int64_t smp = it / nblk, off = (it % nblk) * kBlock;
    p1[it] = pass1_fn(*this, smp, off, std::min(kBlock, D - off));
  }

  C norm(int64_t smp) const {  // n_b from the pass-1 partials of sample smp
    double S = 0.0;
    for (int64_t k = 0; k < nblk; ++k) S += p1[smp * nblk + k];
    return sd_norm(C(S / double(D)), eps);
  }

  void pass2(int64_t it, C nb) const {
    const int64_t smp = it / nblk, off = (it % nblk) * kBlock;
    p2[it] = pass2_fn(*this, smp, off, std::min(kBlock, D - off), nb);
  }

  void sample(int64_t smp) const {  // both passes of one sample
    for (int64_t it = smp * nblk; it < (smp + 1) * nblk; ++it) pass1(it);
    const C nb = norm(smp);
    for (int64_t it = smp * nblk; it < (smp + 1) * nblk; ++it) pass2(it, nb);
  }
};

template <int F, typename T>
double pass1_item(const Problem<T>& P, int64_t smp, int64_t off, int64_t n) {
  const T* br = P.b.row(smp) + off;
  return pass1_block<F>(P.x.row(smp) + off, br, (F & kP1CfgB) ? P.b_u.row(smp) + off : br,
                        (F & kP1Xt) ? P.xt.row(smp) + off : br, P.coefs(smp, 1), n);
}

template <int F, typename T>
double pass2_item(const Problem<T>& P, int64_t smp, int64_t off, int64_t n, typename Problem<T>::C nb) {
  const T* ar = P.a.row(smp) + off;
  const T* br = P.b.row(smp) + off;
  return pass2_block<F>(ar, (F & kP2CfgA) ? P.a_u.row(smp) + off : ar, br,
                        (F & kP2CfgB) ? P.b_u.row(smp) + off : br, P.coefs(smp, nb), P.g + smp * P.D + off, n,
                        P.nt);
}

template <typename T, int... F>
constexpr std::array<typename Problem<T>::Pass1Fn, sizeof...(F)> pass1_table(std::integer_sequence<int, F...>) {
  return {{&pass1_item<F, T>...}};
}
template <typename T, int... F>
constexpr std::array<typename Problem<T>::Pass2Fn, sizeof...(F)> pass2_table(std::integer_sequence<int, F...>) {
  return {{&pass2_item<F, T>...}};
}

inline int thread_num() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int num_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

template <typename T> void forward(const Args& q) {
  using C = typename Compute<T>::type;
  const int64_t B = q.B, D = q.D;
  C* loss = reinterpret_cast<C*>(q.loss);
  if (B <= 0 || D <= 0) {  // a sum over no elements
    *loss = C(q.loss_factor * 0.5 * 0.0);
    return;
  }
  const int64_t nblk = sched::num_blocks(D);
  std::vector<double> p1(q.norm ? static_cast<size_t>(B * nblk) : 0), p2(static_cast<size_t>(B * nblk));
  static constexpr auto kPass1 = pass1_table<T>(std::make_integer_sequence<int, kP1Count>());
  static constexpr auto kPass2 = pass2_table<T>(std::make_integer_sequence<int, kP2Count>());
  const int f1 = (q.b_u ? kP1CfgB : 0) | (q.xt ? kP1Xt : 0);
  const int f2 = (q.a_u ? kP2CfgA : 0) | (q.b_u ? kP2CfgB : 0) | (q.xt || q.scale ? kP2Mul : 0) |
                 (q.norm ? kP2Norm : 0);
  // rows read and written: a, b, g (+ a_u, b_u; + x, xt with norm)
  const int64_t rows_moved = 3 + (q.a_u ? 1 : 0) + (q.b_u ? 1 : 0) + (q.norm ? 1 + (q.xt ? 1 : 0) : 0);
  const Problem<T> P{B, D, nblk,
                     sched::rows<T>(q.x, q.x_bs), sched::rows<T>(q.a, q.a_bs), sched::rows<T>(q.a_u, q.a_u_bs),
                     sched::rows<T>(q.b, q.b_bs), sched::rows<T>(q.b_u, q.b_u_bs), sched::rows<T>(q.xt, q.xt_bs),
                     reinterpret_cast<const C*>(q.wa_ptr), reinterpret_cast<const C*>(q.wb_ptr),
                     reinterpret_cast<const C*>(q.coef), reinterpret_cast<const C*>(q.scale),
                     C(q.wa), C(q.wb), C(q.eps), sd_bound<C>(q.clip), C(q.g_scale),
                     reinterpret_cast<T*>(q.g), p1.data(), p2.data(), kPass1[f1], kPass2[f2],
                     simd::stream_outputs(rows_moved * B * D * int64_t(sizeof(T)))};

  const int nthr = sched::threads_for(B * D);
  if (!q.norm) {
    // One pass, no dependency between blocks: dynamic chunks of >= kTaskElems elements.
    const int64_t items = B * nblk, chunk = std::max<int64_t>(1, kTaskElems / std::min(D, kBlock));
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
#pragma omp for schedule(dynamic, chunk) nowait
      for (int64_t it = 0; it < items; ++it) P.pass2(it, C(1));
      simd::stream_fence();
    }
  } else if (B >= kSamplesPerThread * nthr) {
    // Whole samples per task, several when D is small: no barrier, and a task's rows are read
    // by pass 2 from the L2 that pass 1 filled (when they fit). Dynamic: a thread the OS
    // preempts holds up one task, not the others.
    const int64_t group = std::max<int64_t>(1, kTaskElems / D), ntasks = (B + group - 1) / group;
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < ntasks; ++task)
        for (int64_t smp = task * group; smp < std::min(B, (task + 1) * group); ++smp) P.sample(smp);
      simd::stream_fence();
    }
  } else {
    // Few samples: their blocks are split evenly across the threads, a chunk of samples at a
    // time, sized so that a thread's pass-1 rows stay in its L2 for pass 2 (same blocks, same
    // thread). One barrier per chunk, between its passes.
    const int64_t sample_bytes = (2 + (q.b_u ? 1 : 0) + (q.xt ? 1 : 0)) * int64_t(sizeof(T)) * D;
    const int64_t spc = std::max<int64_t>(1, std::min<int64_t>(B, nthr * kChunkBytesPerThread / sample_bytes));
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
      const int64_t t = thread_num(), nt = num_threads();
      for (int64_t c0 = 0; c0 < B; c0 += spc) {
        const int64_t first = c0 * nblk, items = std::min(spc, B - c0) * nblk;
        const int64_t lo = first + items * t / nt, hi = first + items * (t + 1) / nt;
        for (int64_t it = lo; it < hi; ++it) P.pass1(it);
#pragma omp barrier
        int64_t smp = -1;
        C nb = C(0);
        for (int64_t it = lo; it < hi; ++it) {
          if (it / nblk != smp) nb = P.norm(smp = it / nblk);
          P.pass2(it, nb);
        }
      }
      simd::stream_fence();
    }
  }

  double total = 0.0;
  for (int64_t smp = 0; smp < B; ++smp) {
    double S = 0.0;
    for (int64_t k = 0; k < nblk; ++k) S += p2[size_t(smp * nblk + k)];
    total += S;
  }
  *loss = C(q.loss_factor * 0.5 * total);
}

void check_dtype(int64_t dtype, const char* op) {
  if (dtype < kFloat32 || dtype > kFloat64)
    throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype) +
                                " (0 float32, 1 float16, 2 bfloat16, 3 float64)");
}

}  // namespace

void score_diff_forward(int64_t dtype, int64_t B, int64_t D,
                        uintptr_t x, int64_t x_bs,
                        uintptr_t a, int64_t a_bs, uintptr_t a_u, int64_t a_u_bs, uintptr_t wa_ptr, double wa,
                        uintptr_t b, int64_t b_bs, uintptr_t b_u, int64_t b_u_bs, uintptr_t wb_ptr, double wb,
                        uintptr_t xt, int64_t xt_bs, uintptr_t coef,
                        uintptr_t scale, int64_t norm, double eps, double clip, double loss_factor,
                        uintptr_t g, uintptr_t loss,
                        uintptr_t /*workspace*/, int64_t /*workspace_bytes*/, uintptr_t /*stream*/, double g_scale) {
  check_dtype(dtype, "score_diff_forward");
  const Args q{B, D, x, x_bs, a, a_bs, a_u, a_u_bs, wa_ptr, wa, b, b_bs, b_u, b_u_bs, wb_ptr, wb,
               xt, xt_bs, coef, scale, norm != 0, eps, clip, loss_factor, g, loss, g_scale};
  switch (dtype) {
    case kFloat32: return forward<float>(q);
    case kFloat16: return forward<f16_t>(q);
    case kBFloat16: return forward<bf16_t>(q);
    default: return forward<double>(q);
  }
}

int64_t score_diff_workspace_bytes(int64_t dtype, int64_t /*B*/, int64_t /*D*/) {
  check_dtype(dtype, "score_diff_workspace_bytes");
  return 0;
}

}  // namespace cpu
}  // namespace flashdistill
