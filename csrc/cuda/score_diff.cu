// K1 score_diff_forward, CUDA backend: the gradient to x of every score-difference loss (SDS, VSD,
// SwiftBrush, DMD / DMD2, f-distill). ABI and math: csrc/README.md, "K1"; float64 spec:
// kernels/score_diff/reference.py::score_diff_forward.
//
// Math, per sample b (row of D elements), in the compute type C (float; double for float64):
//   ā = cfg(a) = a_u + wa_b (a - a_u)   (ā = a without a_u)      b̄ = cfg(b) likewise with wb
//   d = ā - b̄, or C_b (ā - b̄) with xt        (coef[b] = (A_b, C_b); the A_b xt terms cancel)
//   r = b̄, or A_b xt + C_b b̄ with xt         (the normaliser's teacher, in x0 units)
//   n_b = max(sum_i |x_i - r_i| / D, eps) when norm = 1 (NaN passes through), else 1
//   g = nan_to_num(s_b d / n_b), then clamped to [-clip, clip] when clip > 0;  stored rounded to dtype
//   loss = loss_factor * 0.5 * sum_{b,i} g^2        g^2 of the unrounded g
// The operations run in the reference's order (C_b d, then s_b times that, then / n_b); s_b = 1 and
// C_b = 1 when absent, both exact, and without norm there is no division at all.
//
// Kernels (no atomics; every sum in an order fixed by (dtype, B, D); the grid and the workspace
// layout are rowwise.cuh's: B * n_chunks blocks, block = (row b, chunk c)):
//   1. score_diff_norm_partials   norm = 1 only: sum |x - r| over the chunk -> ws_abs[b, c]
//   2. score_diff_grad_partials   n_b from the row's n_chunks partials (every block of the row sums
//                                 them in the same order, so all agree bit for bit), then g over the
//                                 chunk, stored, and sum g^2 -> ws_sq[b, c]
//   3. score_diff_loss_final      one block: loss = (loss_factor * 0.5) * sum(ws_sq)
// norm = 1 needs the whole row's sum before the first g of the row can be formed (g is divided by
// the final n_b, not a running one), hence two passes; norm = 0 runs kernels 2 and 3 only.
//
// Traffic per element, e = bytes of the dtype (4 f32, 2 f16/bf16, 8 f64); "+u" = with a_u / b_u,
// "+xt" = with xt:
//   kernel 1  reads x, b (+b_u) (+xt)               2e .. 4e
//   kernel 2  reads a (+a_u), b (+b_u); writes g    3e .. 5e
//   norm = 0: 3e .. 5e = the minimum (every input once, g once).
//   norm = 1: 5e (no cfg, no xt) .. 9e (both cfg and xt) against a minimum of 4e .. 7e: the second
//   read of b (+b_u) is the price of the exact normaliser. Kernel 1 loads b, b_u with the default
//   cache policy and x, xt evict-first; kernel 2 walks its blocks in reverse, so its first blocks
//   re-read the chunks kernel 1 read last. When b (+b_u) of the whole batch fits in L2 (50 MB on
//   H100 / H200 less what x streams through: ~10 M f32 or ~20 M bf16 elements without b_u), the
//   second read comes from L2 and DRAM traffic is the minimum.
//   e.g. DMD (norm, cfg on b): bf16 14 bytes/element from DRAM (10 when b, b_u stay in L2).
// Flops per element: cfg 2 (sub + fma) per guided prediction; d: 1 sub (+1 mul with xt, +1 with
// scale); kernel 1: r (+1 fma with xt), |x - r| and the add: 2-3; kernel 2: one IEEE division when
// norm (~10 instructions in f32), nan_to_num and the clip as 3 selects, g^2 as one fma; + conversions.
// That is < 2 flop/byte against a ridge of ~20 (H100 f32: 67 TFLOP/s over 3.35 TB/s; H200: 4.8
// TB/s; f64 ~10): every path is bandwidth-bound, so the exact division and the 64-bit index
// arithmetic cost no time.
//
// Launch configuration (H100 / H200, memory-bound; goal >= 85% of DRAM bandwidth): 256 threads per
// block, ~1024 blocks (rowwise.cuh::make_plan): on 132 SMs that is ~8 blocks per SM, 2 full waves
// where occupancy allows 4 resident blocks, so the tail wave is under 1/8 of the work. Each thread
// moves 16 bytes per operand per loop trip (one 128-bit access), so a resident block has 4 KiB per
// operand in flight; with 2-4 operands and >= 4 blocks per SM that is 32-64 KiB per SM, above the
// ~25 KiB that Little's law asks of an H200 SM (4.8 TB/s x ~700 ns / 132 SMs). Tuning only: none of
// these constants changes a result bit except kThreads (the reduction tree), fixed in rowwise.cuh.
//
// Vectorization: 128-bit accesses when every row of every operand a kernel touches starts on a
// 16-byte boundary (rowwise.cuh::rows_aligned; g is contiguous, its rows aligned iff g is and
// D * e % 16 == 0); else, and for the last partial group of a row, element by element. Both paths
// run the same code per element in the same order: the sums do not depend on alignment.
//
// The per-element math is include/flashdistill/score_diff.h, shared with the CPU backend. One
// difference stays: nvcc contracts a * b + c into one fma (its default, -fmad=true) where the CPU
// build keeps two roundings, so the two backends agree to rounding, not bit for bit.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/score_diff.h"  // per-element math shared with the CPU backend
#include "ops.h"
#include "rowwise.cuh"

namespace flashdistill {
namespace gpu {
namespace {

using namespace rowwise;

constexpr const char* kOp = "score_diff_forward";

// ---- kernels -------------------------------------------------------------------------------------------

template <typename T>
struct Args {
  using C = typename Compute<T>::type;
  // data: row b of each input at ptr + b * *_bs; null = absent
  const T* x; int64_t x_bs;              // read only when norm = 1
  const T* a; int64_t a_bs;
  const T* a_u; int64_t a_u_bs;
  const T* b; int64_t b_bs;
  const T* b_u; int64_t b_u_bs;
  const T* xt; int64_t xt_bs;
  const C* wa_ptr; const C* wb_ptr;      // [B] or null (then the scalar wa / wb)
  const C* coef;                         // [B, 2] (A_b, C_b) when xt, else null
  const C* scale;                        // [B] or null
  C wa, wb, eps;
  C big;                                 // |g| bound: min(clip, max finite) with clip > 0, else max finite
  T* g;                                  // out: contiguous [B, D]
  // shapes
  int64_t B, D, chunk, n_chunks;
  bool vec1, vec2;                       // 128-bit accesses allowed in kernel 1 / kernel 2
  // workspace
  C* ws_abs;                             // [B * n_chunks] partial sums of |x - r|
  C* ws_sq;                              // [B * n_chunks] partial sums of g^2
};

template <typename T, bool kCfgB, bool kXt>
__global__ void __launch_bounds__(kThreads) score_diff_norm_partials(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  const int64_t blk = blockIdx.x;
  const Chunk k = chunk_of<V>(blk, a.n_chunks, a.chunk, a.D);
  const T* __restrict__ x = a.x + k.b * a.x_bs;
  const T* __restrict__ bp = a.b + k.b * a.b_bs;
  const T* __restrict__ bu = kCfgB ? a.b_u + k.b * a.b_u_bs : nullptr;
  const T* __restrict__ xt = kXt ? a.xt + k.b * a.xt_bs : nullptr;
  const C wb = kCfgB ? (a.wb_ptr ? a.wb_ptr[k.b] : a.wb) : C(0);
  const C A = kXt ? a.coef[2 * k.b] : C(0), Cc = kXt ? a.coef[2 * k.b + 1] : C(1);

  C acc = C(0);
  for (int64_t q = threadIdx.x; q < k.n_groups; q += blockDim.x) {
    const int64_t i = k.i0 + q * V;
    const int valid = int(min64(V, k.i1 - i));
    Pack<T> px{}, pb{}, pu{}, pt{};
    load_group<Cache::kStream>(px, x, i, valid, a.vec1);  // x, xt: read once
    load_group<Cache::kKeep>(pb, bp, i, valid, a.vec1);   // b, b_u: read again by kernel 2
    if constexpr (kCfgB) load_group<Cache::kKeep>(pu, bu, i, valid, a.vec1);
    if constexpr (kXt) load_group<Cache::kStream>(pt, xt, i, valid, a.vec1);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C bbar = sd_guided<kCfgB>(to_c(pb.v[j]), to_c(pu.v[j]), wb);
        const C r = sd_teacher<kXt>(bbar, to_c(pt.v[j]), A, Cc);
        acc += sd_abs_term(to_c(px.v[j]), r);
      }
    }
  }
  const C s = block_sum(acc);
  if (threadIdx.x == 0) a.ws_abs[blk] = s;
}

template <typename T, bool kCfgA, bool kCfgB, bool kNorm>
__global__ void __launch_bounds__(kThreads) score_diff_grad_partials(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  // Reverse block order: the first blocks to run re-read the chunks kernel 1 read last (in L2).
  const int64_t blk = int64_t(gridDim.x) - 1 - int64_t(blockIdx.x);
  const Chunk k = chunk_of<V>(blk, a.n_chunks, a.chunk, a.D);

  C n_b = C(1);
  if constexpr (kNorm) {
    // The row's n_chunks partials, thread-strided then a block tree: the same order in every block
    // of the row, so every block gets the same n_b.
    const C* __restrict__ part = a.ws_abs + k.b * a.n_chunks;
    C s1 = C(0);
    for (int64_t c = threadIdx.x; c < a.n_chunks; c += blockDim.x) s1 += part[c];
    s1 = block_sum(s1);
    n_b = sd_norm(s1 / C(a.D), a.eps);
  }

  const T* __restrict__ ap = a.a + k.b * a.a_bs;
  const T* __restrict__ au = kCfgA ? a.a_u + k.b * a.a_u_bs : nullptr;
  const T* __restrict__ bp = a.b + k.b * a.b_bs;
  const T* __restrict__ bu = kCfgB ? a.b_u + k.b * a.b_u_bs : nullptr;
  T* __restrict__ g = a.g + k.b * a.D;
  const C wa = kCfgA ? (a.wa_ptr ? a.wa_ptr[k.b] : a.wa) : C(0);
  const C wb = kCfgB ? (a.wb_ptr ? a.wb_ptr[k.b] : a.wb) : C(0);
  // d = s_b (C_b (ā - b̄)): a factor that is absent is 1, and a product with 1 is exact (the bits of
  // skipping it), so one code path serves all four cases for the price of two multiplies.
  const C Cc = a.coef ? a.coef[2 * k.b + 1] : C(1);
  const C s = a.scale ? a.scale[k.b] : C(1);

  C acc = C(0);
  for (int64_t q = threadIdx.x; q < k.n_groups; q += blockDim.x) {
    const int64_t i = k.i0 + q * V;
    const int valid = int(min64(V, k.i1 - i));
    Pack<T> pa{}, pau{}, pb{}, pbu{}, pg{};
    load_group<Cache::kStream>(pa, ap, i, valid, a.vec2);  // last use of every input
    if constexpr (kCfgA) load_group<Cache::kStream>(pau, au, i, valid, a.vec2);
    load_group<Cache::kStream>(pb, bp, i, valid, a.vec2);
    if constexpr (kCfgB) load_group<Cache::kStream>(pbu, bu, i, valid, a.vec2);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C abar = sd_guided<kCfgA>(to_c(pa.v[j]), to_c(pau.v[j]), wa);
        const C bbar = sd_guided<kCfgB>(to_c(pb.v[j]), to_c(pbu.v[j]), wb);
        const C gv = sd_g<kNorm>(sd_diff<true>(abar, bbar, Cc, s), n_b, a.big);
        acc += gv * gv;
        pg.v[j] = FromC<T>::cvt(gv);
      }
    }
    store_group(g, i, pg, valid, a.vec2);
  }
  const C s2 = block_sum(acc);
  if (threadIdx.x == 0) a.ws_sq[blk] = s2;
}

template <typename C>
__global__ void __launch_bounds__(kFinalThreads) score_diff_loss_final(const C* __restrict__ ws_sq, int64_t n,
                                                                       double loss_factor, C* __restrict__ loss) {
  C s = C(0);
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) s += ws_sq[k];
  s = block_sum(s);
  // (loss_factor * 0.5) first, in double, as the reference's Python scalar; B * D == 0 gives 0.
  if (threadIdx.x == 0) *loss = C(loss_factor * 0.5) * s;
}

// ---- host side ------------------------------------------------------------------------------------------

struct Params {  // the ABI's arguments, untyped
  int64_t B, D;
  const void *x, *a, *a_u, *b, *b_u, *xt, *wa_ptr, *wb_ptr, *coef, *scale;
  int64_t x_bs, a_bs, a_u_bs, b_bs, b_u_bs, xt_bs;
  double wa, wb, eps, clip, loss_factor;
  bool norm;
  void *g, *loss, *workspace;
};

template <typename T>
void launch(const Params& p, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const int64_t eb = sizeof(T);
  const Plan plan = make_plan(eb, p.B, p.D);
  const int64_t n_parts = grid_blocks(kOp, p.B, plan);
  const bool cfg_a = p.a_u != nullptr, cfg_b = p.b_u != nullptr, has_xt = p.xt != nullptr;

  Args<T> a;
  a.x = static_cast<const T*>(p.x); a.x_bs = p.x_bs;
  a.a = static_cast<const T*>(p.a); a.a_bs = p.a_bs;
  a.a_u = static_cast<const T*>(p.a_u); a.a_u_bs = p.a_u_bs;
  a.b = static_cast<const T*>(p.b); a.b_bs = p.b_bs;
  a.b_u = static_cast<const T*>(p.b_u); a.b_u_bs = p.b_u_bs;
  a.xt = static_cast<const T*>(p.xt); a.xt_bs = p.xt_bs;
  a.wa_ptr = static_cast<const C*>(p.wa_ptr);
  a.wb_ptr = static_cast<const C*>(p.wb_ptr);
  a.coef = has_xt ? static_cast<const C*>(p.coef) : nullptr;  // coef means nothing without xt
  a.scale = static_cast<const C*>(p.scale);
  a.wa = C(p.wa); a.wb = C(p.wb); a.eps = C(p.eps);
  a.big = sd_bound<C>(p.clip);
  a.g = static_cast<T*>(p.g);
  a.B = p.B; a.D = p.D; a.chunk = plan.chunk; a.n_chunks = plan.n_chunks;
  a.vec1 = rows_aligned(p.x, p.x_bs, p.B, eb) && rows_aligned(p.b, p.b_bs, p.B, eb) &&
           rows_aligned(p.b_u, p.b_u_bs, p.B, eb) && rows_aligned(p.xt, p.xt_bs, p.B, eb);
  a.vec2 = rows_aligned(p.a, p.a_bs, p.B, eb) && rows_aligned(p.a_u, p.a_u_bs, p.B, eb) &&
           rows_aligned(p.b, p.b_bs, p.B, eb) && rows_aligned(p.b_u, p.b_u_bs, p.B, eb) &&
           rows_aligned(p.g, p.D, p.B, eb);
  a.ws_abs = static_cast<C*>(p.workspace);
  a.ws_sq = a.ws_abs + n_parts;

  if (n_parts > 0) {
    const dim3 grid(static_cast<unsigned>(n_parts)), block(kThreads);
    if (p.norm) {
      with_flag(cfg_b, [&](auto GB) {
        with_flag(has_xt, [&](auto XT) {
          score_diff_norm_partials<T, decltype(GB)::value, decltype(XT)::value><<<grid, block, 0, stream>>>(a);
        });
      });
      check_launch(kOp, "score_diff_norm_partials");
    }
    with_flag(cfg_a, [&](auto GA) {
      with_flag(cfg_b, [&](auto GB) {
        with_flag(p.norm, [&](auto NORM) {
          score_diff_grad_partials<T, decltype(GA)::value, decltype(GB)::value, decltype(NORM)::value>
              <<<grid, block, 0, stream>>>(a);
        });
      });
    });
    check_launch(kOp, "score_diff_grad_partials");
  }
  score_diff_loss_final<C><<<1, kFinalThreads, 0, stream>>>(a.ws_sq, n_parts, p.loss_factor, static_cast<C*>(p.loss));
  check_launch(kOp, "score_diff_loss_final");
}

}  // namespace

int64_t score_diff_workspace_bytes(int64_t dtype, int64_t B, int64_t D) {
  const int64_t eb = elem_bytes_of(dtype, kOp);
  if (B < 0 || D < 0) bad_arg(kOp, "negative size B=" + std::to_string(B) + ", D=" + std::to_string(D));
  const int64_t n_parts = grid_blocks(kOp, B, make_plan(eb, B, D));
  return 2 * n_parts * compute_bytes_of(dtype);
}

void score_diff_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                             const void* x, int64_t x_bs,
                             const void* a, int64_t a_bs, const void* a_u, int64_t a_u_bs,
                             const void* wa_ptr, double wa,
                             const void* b, int64_t b_bs, const void* b_u, int64_t b_u_bs,
                             const void* wb_ptr, double wb,
                             const void* xt, int64_t xt_bs, const void* coef,
                             const void* scale, int64_t norm, double eps, double clip, double loss_factor,
                             void* g, void* loss,
                             void* workspace, int64_t workspace_bytes,
                             CUstream_st* stream) {
  const int64_t need = score_diff_workspace_bytes(dtype, B, D);  // validates dtype, B, D
  if (workspace_bytes < need)
    bad_arg(kOp, "workspace of " + std::to_string(workspace_bytes) + " bytes, need score_diff_workspace_bytes = " +
                     std::to_string(need));
  if (need > 0 && workspace == nullptr) bad_arg(kOp, "workspace is null");
  if (reinterpret_cast<uintptr_t>(workspace) % uintptr_t(compute_bytes_of(dtype)) != 0)
    bad_arg(kOp, "workspace is not aligned to the compute type");
  if (norm != 0 && norm != 1) bad_arg(kOp, "norm must be 0 or 1, got " + std::to_string(norm));
  if (loss == nullptr) bad_arg(kOp, "loss is null");
  if (B > 0 && D > 0) {
    if (a == nullptr || b == nullptr || g == nullptr) bad_arg(kOp, "null data pointer among a, b, g");
    if (norm == 1 && x == nullptr) bad_arg(kOp, "norm = 1 needs x");
    if (xt != nullptr && coef == nullptr) bad_arg(kOp, "xt needs coef [B, 2]");
  }

  Params p;
  p.B = B; p.D = D;
  p.x = x; p.x_bs = x_bs;
  p.a = a; p.a_bs = a_bs; p.a_u = a_u; p.a_u_bs = a_u_bs; p.wa_ptr = wa_ptr; p.wa = wa;
  p.b = b; p.b_bs = b_bs; p.b_u = b_u; p.b_u_bs = b_u_bs; p.wb_ptr = wb_ptr; p.wb = wb;
  p.xt = xt; p.xt_bs = xt_bs; p.coef = coef;
  p.scale = scale; p.norm = norm == 1; p.eps = eps; p.clip = clip; p.loss_factor = loss_factor;
  p.g = g; p.loss = loss; p.workspace = workspace;
  if (!p.norm) { p.x = nullptr; p.x_bs = 0; }  // x is not read without the normaliser

  with_dtype(dtype, kOp, [&](auto tag) { launch<decltype(tag)>(p, stream); });
}

}  // namespace gpu
}  // namespace flashdistill
