// K2 score_identity_forward / _backward, CUDA backend: the score-identity losses (SiD, SiD-LSG, SIM,
// score forgetting), whose gradient reaches x and both predictions. ABI and math: csrc/README.md,
// "K2"; float64 spec: kernels/score_identity/reference.py::sums / ::grads.
//
// Math, per sample b (row of D elements), in the compute type C (float; double for float64):
//   r̄ = cfg(r) = r_u + wr_b (r - r_u)  (r̄ = r without r_u)       f̄ = cfg(f) likewise with wf
//   y = r̄ - f̄,  u = f̄ - x
// Forward:  sums[b] = (sum_i |x_i - r̄_i|, sum_i y_i^2, sum_i y_i u_i)            [B, 3] of C
// Backward, per element, from coef[b] = (P_b, Q_b):
//   Gx = -P y,  Gr = P u + Q y,  Gf = -(Gx + Gr)
//   gx = Gx;  gr = Gr, or wr Gr and gr_u = (1 - wr) Gr with r_u;  the same for f (wf).
//   A sample with P_b = Q_b = 0 writes exact zeros without reading its inputs (a dropped sample,
//   whatever they hold, NaN included). Each output is optional (null: not computed, not written).
//
// Forward kernels (no atomics; sums in an order fixed by (dtype, B, D); grid and split of rowwise.cuh):
//   1. score_identity_partials  block (b, c): the three sums over its chunk -> part[(b, c), 0..2]
//   2. rows_final<C, 3>         one warp per sample: sums[b, k] = sum_c part[(b, c), k]
//   With one chunk per row (B >= 512 at typical D, or short rows) kernel 1 writes sums directly
//   and kernel 2 is not launched; the workspace is then 0 bytes.
// Backward: one elementwise kernel, score_identity_grads, on the same grid.
//
// Traffic per element, e = bytes of the dtype (4 f32, 2 f16/bf16, 8 f64):
//   forward   reads x, r (+r_u), f (+f_u): 3e .. 5e, writes nothing per element: the minimum.
//   backward  reads r (+r_u), f (+f_u), and x unless only gx is wanted; writes each wanted output:
//             SiD-LSG with all five outputs: 5e + 5e = 10e (bf16: 20 bytes/element); dropped samples
//             move only their zeros.
// Flops per element: forward cfg 2 per guided prediction, y, u, |x - r̄| 3 subs, the three sums
// (abs-add, 2 fma): ~6-10; backward ~6 (Gx, Gr as mul + fma, Gf) + 1 mul per split output. That
// is < 1.5 flop/byte, far below the ~20 of the H100 / H200 ridge: bandwidth-bound throughout.
//
// Launch configuration (H100 / H200; goal >= 85% of DRAM bandwidth): 256 threads, ~1024 blocks
// (rowwise.cuh::make_plan; see score_diff.cu for the arithmetic: ~8 blocks per SM, 16-byte pack per
// thread per operand, 3-5 operands -> 12-20 KiB in flight per resident block, >= 48 KiB per SM at
// 4 resident blocks against the ~25 KiB Little's law asks). The backward is elementwise and could
// use any grid; it takes the forward's so a row's chunk boundaries are the same in both (tuning
// only). Forward loads use the evict-first policy (every input is read once); the backward's
// stores use the default write-back policy (the gradients feed the networks' backward next).
//
// Vectorization: 128-bit accesses when every operand's rows (and every output's) start on 16-byte
// boundaries, else element by element; the same per-element code in both paths.
//
// The per-element math is include/flashdistill/score_identity.h, shared with the CPU backend (nvcc
// contracts a * b + c into fma where the CPU keeps two roundings: agreement to rounding, not bits).

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/score_identity.h"  // per-element math shared with the CPU backend
#include "ops.h"
#include "rowwise.cuh"

namespace flashdistill {
namespace gpu {
namespace {

using namespace rowwise;

constexpr const char* kOpF = "score_identity_forward";
constexpr const char* kOpB = "score_identity_backward";

// ---- kernels -------------------------------------------------------------------------------------------

template <typename T>
struct Args {
  using C = typename Compute<T>::type;
  // data: row b at ptr + b * *_bs; r_u / f_u null without guidance
  const T* x; int64_t x_bs;
  const T* r; int64_t r_bs;
  const T* r_u; int64_t r_u_bs;
  const T* f; int64_t f_bs;
  const T* f_u; int64_t f_u_bs;
  const C* wr_ptr; const C* wf_ptr;   // [B] or null (then the scalars)
  C wr, wf, one_minus_wr, one_minus_wf;
  // backward only
  const C* coef;                      // [B, 2] (P_b, Q_b)
  T *gx, *gr, *gr_u, *gf, *gf_u;      // contiguous [B, D] or null
  // shapes
  int64_t B, D, chunk, n_chunks;
  bool vec;
  C* part;                            // forward out: [B * n_chunks, 3] (sums itself when n_chunks == 1)
};

// Per-sample guidance scale and 1 - w: (1 - w) of the scalar is formed in double, as the
// reference's Python float; of a [B] tensor in C, as the reference's tensor op.
template <typename C>
__device__ __forceinline__ void weights(const C* w_ptr, C w, C one_minus_w, int64_t b, C& wb, C& omw) {
  if (w_ptr) {
    wb = w_ptr[b];
    omw = C(1) - wb;
  } else {
    wb = w;
    omw = one_minus_w;
  }
}

template <typename T, bool kCfgR, bool kCfgF>
__global__ void __launch_bounds__(kThreads) score_identity_partials(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  const int64_t blk = blockIdx.x;
  const Chunk k = chunk_of<V>(blk, a.n_chunks, a.chunk, a.D);
  const T* __restrict__ x = a.x + k.b * a.x_bs;
  const T* __restrict__ r = a.r + k.b * a.r_bs;
  const T* __restrict__ ru = kCfgR ? a.r_u + k.b * a.r_u_bs : nullptr;
  const T* __restrict__ f = a.f + k.b * a.f_bs;
  const T* __restrict__ fu = kCfgF ? a.f_u + k.b * a.f_u_bs : nullptr;
  const C wr = kCfgR ? (a.wr_ptr ? a.wr_ptr[k.b] : a.wr) : C(0);
  const C wf = kCfgF ? (a.wf_ptr ? a.wf_ptr[k.b] : a.wf) : C(0);

  C s[3] = {C(0), C(0), C(0)};
  for (int64_t q = threadIdx.x; q < k.n_groups; q += blockDim.x) {
    const int64_t i = k.i0 + q * V;
    const int valid = int(min64(V, k.i1 - i));
    Pack<T> px{}, pr{}, pru{}, pf{}, pfu{};
    load_group<Cache::kStream>(px, x, i, valid, a.vec);  // every input is read once
    load_group<Cache::kStream>(pr, r, i, valid, a.vec);
    if constexpr (kCfgR) load_group<Cache::kStream>(pru, ru, i, valid, a.vec);
    load_group<Cache::kStream>(pf, f, i, valid, a.vec);
    if constexpr (kCfgF) load_group<Cache::kStream>(pfu, fu, i, valid, a.vec);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C rbar = sid_guided<kCfgR>(to_c(pr.v[j]), to_c(pru.v[j]), wr);
        const C fbar = sid_guided<kCfgF>(to_c(pf.v[j]), to_c(pfu.v[j]), wf);
        const SidTerms<C> t = sid_terms(to_c(px.v[j]), rbar, fbar);
        s[0] += t.abs_xr;
        s[1] += t.yy;
        s[2] += t.yu;
      }
    }
  }
  const C s0 = block_sum(s[0]);
  const C s1 = block_sum(s[1]);
  const C s2 = block_sum(s[2]);
  if (threadIdx.x == 0) {
    a.part[blk * 3 + 0] = s0;
    a.part[blk * 3 + 1] = s1;
    a.part[blk * 3 + 2] = s2;
  }
}

template <typename T, bool kCfgR, bool kCfgF>
__global__ void __launch_bounds__(kThreads) score_identity_grads(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  const Chunk k = chunk_of<V>(blockIdx.x, a.n_chunks, a.chunk, a.D);
  const int64_t o = k.b * a.D;  // outputs are contiguous
  T* __restrict__ gx = a.gx ? a.gx + o : nullptr;
  T* __restrict__ gr = a.gr ? a.gr + o : nullptr;
  T* __restrict__ gru = kCfgR && a.gr_u ? a.gr_u + o : nullptr;
  T* __restrict__ gf = a.gf ? a.gf + o : nullptr;
  T* __restrict__ gfu = kCfgF && a.gf_u ? a.gf_u + o : nullptr;
  const C P = a.coef[2 * k.b], Q = a.coef[2 * k.b + 1];

  if (sid_dropped(P, Q)) {  // a dropped sample: exact zeros, inputs not read
    Pack<T> z{};
    for (int64_t q = threadIdx.x; q < k.n_groups; q += blockDim.x) {
      const int64_t i = k.i0 + q * V;
      const int valid = int(min64(V, k.i1 - i));
      if (gx) store_group(gx, i, z, valid, a.vec);
      if (gr) store_group(gr, i, z, valid, a.vec);
      if (gru) store_group(gru, i, z, valid, a.vec);
      if (gf) store_group(gf, i, z, valid, a.vec);
      if (gfu) store_group(gfu, i, z, valid, a.vec);
    }
    return;
  }

  const bool need_x = gr || gru || gf || gfu;  // Gx = -P y needs no x
  const T* __restrict__ x = need_x ? a.x + k.b * a.x_bs : nullptr;
  const T* __restrict__ r = a.r + k.b * a.r_bs;
  const T* __restrict__ ru = kCfgR ? a.r_u + k.b * a.r_u_bs : nullptr;
  const T* __restrict__ f = a.f + k.b * a.f_bs;
  const T* __restrict__ fu = kCfgF ? a.f_u + k.b * a.f_u_bs : nullptr;
  const C neg_p = -P;
  C wr = C(0), omwr = C(0), wf = C(0), omwf = C(0);
  if (kCfgR) weights(a.wr_ptr, a.wr, a.one_minus_wr, k.b, wr, omwr);
  if (kCfgF) weights(a.wf_ptr, a.wf, a.one_minus_wf, k.b, wf, omwf);

  for (int64_t q = threadIdx.x; q < k.n_groups; q += blockDim.x) {
    const int64_t i = k.i0 + q * V;
    const int valid = int(min64(V, k.i1 - i));
    Pack<T> px{}, pr{}, pru{}, pf{}, pfu{};
    if (need_x) load_group<Cache::kStream>(px, x, i, valid, a.vec);
    load_group<Cache::kStream>(pr, r, i, valid, a.vec);
    if constexpr (kCfgR) load_group<Cache::kStream>(pru, ru, i, valid, a.vec);
    load_group<Cache::kStream>(pf, f, i, valid, a.vec);
    if constexpr (kCfgF) load_group<Cache::kStream>(pfu, fu, i, valid, a.vec);
    Pack<T> ox{}, orr{}, oru{}, of{}, ofu{};
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C rbar = sid_guided<kCfgR>(to_c(pr.v[j]), to_c(pru.v[j]), wr);
        const C fbar = sid_guided<kCfgF>(to_c(pf.v[j]), to_c(pfu.v[j]), wf);
        const C y = sid_y(rbar, fbar), u = sid_u(fbar, to_c(px.v[j]));
        const C Gx = sid_grad_x(neg_p, y), Gr = sid_grad_r(P, Q, y, u), Gf = sid_grad_f(Gx, Gr);
        ox.v[j] = FromC<T>::cvt(Gx);
        orr.v[j] = FromC<T>::cvt(kCfgR ? wr * Gr : Gr);
        if constexpr (kCfgR) oru.v[j] = FromC<T>::cvt(omwr * Gr);
        of.v[j] = FromC<T>::cvt(kCfgF ? wf * Gf : Gf);
        if constexpr (kCfgF) ofu.v[j] = FromC<T>::cvt(omwf * Gf);
      }
    }
    if (gx) store_group(gx, i, ox, valid, a.vec);
    if (gr) store_group(gr, i, orr, valid, a.vec);
    if (gru) store_group(gru, i, oru, valid, a.vec);
    if (gf) store_group(gf, i, of, valid, a.vec);
    if (gfu) store_group(gfu, i, ofu, valid, a.vec);
  }
}

// ---- host side ------------------------------------------------------------------------------------------

struct Params {  // the ABI's arguments, untyped
  int64_t B, D;
  const void *x, *r, *r_u, *f, *f_u, *wr_ptr, *wf_ptr, *coef;
  int64_t x_bs, r_bs, r_u_bs, f_bs, f_u_bs;
  double wr, wf;
  void *gx, *gr, *gr_u, *gf, *gf_u;
  void *sums, *workspace;
};

template <typename T>
Args<T> make_args(const Params& p, const Plan& plan) {
  using C = typename Compute<T>::type;
  Args<T> a;
  a.x = static_cast<const T*>(p.x); a.x_bs = p.x_bs;
  a.r = static_cast<const T*>(p.r); a.r_bs = p.r_bs;
  a.r_u = static_cast<const T*>(p.r_u); a.r_u_bs = p.r_u_bs;
  a.f = static_cast<const T*>(p.f); a.f_bs = p.f_bs;
  a.f_u = static_cast<const T*>(p.f_u); a.f_u_bs = p.f_u_bs;
  a.wr_ptr = static_cast<const C*>(p.wr_ptr); a.wf_ptr = static_cast<const C*>(p.wf_ptr);
  a.wr = C(p.wr); a.wf = C(p.wf);
  a.one_minus_wr = C(1.0 - p.wr); a.one_minus_wf = C(1.0 - p.wf);
  a.coef = static_cast<const C*>(p.coef);
  a.gx = static_cast<T*>(p.gx); a.gr = static_cast<T*>(p.gr); a.gr_u = static_cast<T*>(p.gr_u);
  a.gf = static_cast<T*>(p.gf); a.gf_u = static_cast<T*>(p.gf_u);
  a.B = p.B; a.D = p.D; a.chunk = plan.chunk; a.n_chunks = plan.n_chunks;
  const int64_t eb = sizeof(T);
  a.vec = rows_aligned(p.x, p.x_bs, p.B, eb) && rows_aligned(p.r, p.r_bs, p.B, eb) &&
          rows_aligned(p.r_u, p.r_u_bs, p.B, eb) && rows_aligned(p.f, p.f_bs, p.B, eb) &&
          rows_aligned(p.f_u, p.f_u_bs, p.B, eb);
  for (void* out : {p.gx, p.gr, p.gr_u, p.gf, p.gf_u}) a.vec = a.vec && rows_aligned(out, p.D, p.B, eb);
  a.part = nullptr;
  return a;
}

template <typename T>
void launch_forward(const Params& p, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const Plan plan = make_plan(sizeof(T), p.B, p.D);
  const int64_t n_parts = grid_blocks(kOpF, p.B, plan);
  Args<T> a = make_args<T>(p, plan);
  const int64_t per_block = kFinalThreads / 32;
  if (n_parts == 0) {  // B * D == 0: rows_final over zero chunks writes the zero sums of empty rows
    if (p.B > 0) {
      rows_final<C, 3><<<static_cast<unsigned>(ceil_div(p.B, per_block)), kFinalThreads, 0, stream>>>(
          nullptr, p.B, 0, static_cast<C*>(p.sums));
      check_launch(kOpF, "rows_final<3>");
    }
    return;
  }
  const bool direct = plan.n_chunks == 1;
  a.part = direct ? static_cast<C*>(p.sums) : static_cast<C*>(p.workspace);
  with_flag(p.r_u != nullptr, [&](auto GR) {
    with_flag(p.f_u != nullptr, [&](auto GF) {
      score_identity_partials<T, decltype(GR)::value, decltype(GF)::value>
          <<<static_cast<unsigned>(n_parts), kThreads, 0, stream>>>(a);
    });
  });
  check_launch(kOpF, "score_identity_partials");
  if (!direct) {
    rows_final<C, 3><<<static_cast<unsigned>(ceil_div(p.B, per_block)), kFinalThreads, 0, stream>>>(
        a.part, p.B, plan.n_chunks, static_cast<C*>(p.sums));
    check_launch(kOpF, "rows_final<3>");
  }
}

template <typename T>
void launch_backward(const Params& p, cudaStream_t stream) {
  const Plan plan = make_plan(sizeof(T), p.B, p.D);
  const int64_t n_blocks = grid_blocks(kOpB, p.B, plan);
  if (n_blocks == 0) return;
  if (!(p.gx || p.gr || p.gr_u || p.gf || p.gf_u)) return;  // nothing wanted
  const Args<T> a = make_args<T>(p, plan);
  with_flag(p.r_u != nullptr, [&](auto GR) {
    with_flag(p.f_u != nullptr, [&](auto GF) {
      score_identity_grads<T, decltype(GR)::value, decltype(GF)::value>
          <<<static_cast<unsigned>(n_blocks), kThreads, 0, stream>>>(a);
    });
  });
  check_launch(kOpB, "score_identity_grads");
}

}  // namespace

int64_t score_identity_workspace_bytes(int64_t dtype, int64_t B, int64_t D) {
  const int64_t eb = elem_bytes_of(dtype, kOpF);
  if (B < 0 || D < 0) bad_arg(kOpF, "negative size B=" + std::to_string(B) + ", D=" + std::to_string(D));
  const Plan plan = make_plan(eb, B, D);
  const int64_t n_parts = grid_blocks(kOpF, B, plan);
  return plan.n_chunks > 1 ? 3 * n_parts * compute_bytes_of(dtype) : 0;  // one chunk: written to sums
}

void score_identity_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                                 const void* x, int64_t x_bs,
                                 const void* r, int64_t r_bs, const void* r_u, int64_t r_u_bs,
                                 const void* wr_ptr, double wr,
                                 const void* f, int64_t f_bs, const void* f_u, int64_t f_u_bs,
                                 const void* wf_ptr, double wf,
                                 void* sums, void* workspace, int64_t workspace_bytes,
                                 CUstream_st* stream) {
  const int64_t need = score_identity_workspace_bytes(dtype, B, D);  // validates dtype, B, D
  if (workspace_bytes < need)
    bad_arg(kOpF, "workspace of " + std::to_string(workspace_bytes) +
                      " bytes, need score_identity_workspace_bytes = " + std::to_string(need));
  if (need > 0 && workspace == nullptr) bad_arg(kOpF, "workspace is null");
  if (reinterpret_cast<uintptr_t>(workspace) % uintptr_t(compute_bytes_of(dtype)) != 0)
    bad_arg(kOpF, "workspace is not aligned to the compute type");
  if (B > 0 && sums == nullptr) bad_arg(kOpF, "sums is null");
  if (B > 0 && D > 0 && (x == nullptr || r == nullptr || f == nullptr))
    bad_arg(kOpF, "null data pointer among x, r, f");

  Params p{};
  p.B = B; p.D = D;
  p.x = x; p.x_bs = x_bs;
  p.r = r; p.r_bs = r_bs; p.r_u = r_u; p.r_u_bs = r_u_bs; p.wr_ptr = wr_ptr; p.wr = wr;
  p.f = f; p.f_bs = f_bs; p.f_u = f_u; p.f_u_bs = f_u_bs; p.wf_ptr = wf_ptr; p.wf = wf;
  p.sums = sums; p.workspace = workspace;
  with_dtype(dtype, kOpF, [&](auto tag) { launch_forward<decltype(tag)>(p, stream); });
}

void score_identity_backward_cuda(int64_t dtype, int64_t B, int64_t D,
                                  const void* x, int64_t x_bs,
                                  const void* r, int64_t r_bs, const void* r_u, int64_t r_u_bs,
                                  const void* wr_ptr, double wr,
                                  const void* f, int64_t f_bs, const void* f_u, int64_t f_u_bs,
                                  const void* wf_ptr, double wf,
                                  const void* coef, void* gx, void* gr, void* gr_u, void* gf, void* gf_u,
                                  CUstream_st* stream) {
  (void)elem_bytes_of(dtype, kOpB);
  if (B < 0 || D < 0) bad_arg(kOpB, "negative size B=" + std::to_string(B) + ", D=" + std::to_string(D));
  if (gr_u != nullptr && r_u == nullptr) bad_arg(kOpB, "gr_u is wanted but r_u is absent");
  if (gf_u != nullptr && f_u == nullptr) bad_arg(kOpB, "gf_u is wanted but f_u is absent");
  const bool any_out = gx || gr || gr_u || gf || gf_u;
  if (B > 0 && D > 0 && any_out) {
    if (r == nullptr || f == nullptr || coef == nullptr) bad_arg(kOpB, "null pointer among r, f, coef");
    if ((gr || gr_u || gf || gf_u) && x == nullptr) bad_arg(kOpB, "x is null (needed for gr, gf)");
  }

  Params p{};
  p.B = B; p.D = D;
  p.x = x; p.x_bs = x_bs;
  p.r = r; p.r_bs = r_bs; p.r_u = r_u; p.r_u_bs = r_u_bs; p.wr_ptr = wr_ptr; p.wr = wr;
  p.f = f; p.f_bs = f_bs; p.f_u = f_u; p.f_u_bs = f_u_bs; p.wf_ptr = wf_ptr; p.wf = wf;
  p.coef = coef;
  p.gx = gx; p.gr = gr; p.gr_u = gr_u; p.gf = gf; p.gf_u = gf_u;
  if (!(gr || gr_u || gf || gf_u)) { p.x = nullptr; p.x_bs = 0; }  // not read: keep it out of alignment
  with_dtype(dtype, kOpB, [&](auto tag) { launch_backward<decltype(tag)>(p, stream); });
}

}  // namespace gpu
}  // namespace flashdistill
