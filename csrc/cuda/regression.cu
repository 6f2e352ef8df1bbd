// K3/K5 regression_forward / _backward, CUDA backend: consistency losses (LCM, CM, iCT, ECT) and
// denoising score matching (the fake-score critics of DMD / SiD / VSD). ABI and math:
// csrc/README.md, "K3/K5"; float64 spec: kernels/regression/reference.py::sums / ::grad.
//
// Math, per element of sample b, in the compute type C (float; double for float64):
//   τ = t1, or c1_b t1 (+ c2_b t2 when t2 is given) with coef[b] = (c1_b, c2_b);   d = pred - τ
// Forward:  sums[b] = sum_i d_i^2 (kind 0 "l2", 2 "pseudo_huber"), or
//                     sum_i (sqrt(d_i^2 + c^2) - c) (kind 1, elementwise "huber")          [B] of C
// Backward: gpred_i = k_b d_i (kind 0, 2), or k_b d_i / sqrt(d_i^2 + c^2) (kind 1), rounded to dtype.
// The Python side folds the reduction, the per-sample weights and grad_loss into k (and for kind 2
// the per-sample sqrt(S_b + c^2)). c^2 is formed in double and rounded to C once, as the reference's
// Python scalar; sqrt and the division are IEEE (no fast math).
//
// Forward kernels (no atomics; sums in an order fixed by (dtype, B, D); grid and split of rowwise.cuh):
//   1. regression_partials  block (b, c): the sum over its chunk -> part[b, c]
//   2. rows_final<C, 1>     one warp per sample: sums[b] = sum_c part[b, c]
//   With one chunk per row kernel 1 writes sums directly, kernel 2 is skipped, the workspace is 0.
// Backward: one elementwise kernel, regression_grad, on the same grid.
//
// Traffic per element, e = bytes of the dtype (4 f32, 2 f16/bf16, 8 f64):
//   forward   reads pred, t1 (+t2): 2e .. 3e; writes nothing per element: the minimum.
//   backward  reads pred, t1 (+t2), writes gpred: 3e .. 4e: the minimum (bf16: 6-8 bytes/element).
// Flops per element: τ 0-2 (mul, fma), d 1, the square and add as 1 fma (kind 1: + IEEE sqrt, ~8
// instructions in f32, and a sub); backward 1 mul (kind 1: + sqrt and an IEEE division, ~20 in f32).
// Kind 1's backward in f32 is the heaviest: ~25 instructions per 12 bytes (f32), still ~5x under
// the ~128 instr/cycle/SM an H100/H200 SM issues against its ~18 bytes/cycle share of DRAM
// bandwidth: bandwidth-bound throughout.
//
// Launch configuration (H100 / H200; goal >= 85% of DRAM bandwidth): 256 threads, ~1024 blocks
// (rowwise.cuh::make_plan; the arithmetic is in score_diff.cu's header: ~8 blocks per SM, one
// 16-byte pack per thread per operand per trip, 2-4 operands -> 8-16 KiB in flight per resident
// block, >= 32 KiB per SM at 4 resident blocks against the ~25 KiB Little's law asks). The
// backward is elementwise; it takes the forward's grid so chunk boundaries match (tuning only).
// Loads are evict-first (each input is read once per kernel; forward and backward run at
// different times of the step); gpred is stored with the default write-back policy (the network's
// backward reads it next).
//
// Vectorization: 128-bit accesses when every operand's rows start on 16-byte boundaries, else
// element by element; the same per-element code in both paths.
//
// The per-element math is include/flashdistill/regression.h, shared with the CPU backend (nvcc
// contracts a * b + c into fma where the CPU keeps two roundings: agreement to rounding, not bits).

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/regression.h"  // per-element math shared with the CPU backend
#include "ops.h"
#include "rowwise.cuh"

namespace flashdistill {
namespace gpu {
namespace {

using namespace rowwise;

constexpr const char* kOpF = "regression_forward";
constexpr const char* kOpB = "regression_backward";

// ---- kernels -------------------------------------------------------------------------------------------

template <typename T>
struct Args {
  using C = typename Compute<T>::type;
  // data: row b at ptr + b * *_bs
  const T* pred; int64_t pred_bs;
  const T* t1; int64_t t1_bs;
  const T* t2; int64_t t2_bs;      // read only with coef
  const C* coef;                   // [B, 2] (c1_b, c2_b) or null
  C c, cc;                         // kind 1: c and c^2
  const C* k;                      // backward: [B] per-sample factor
  T* gpred;                        // backward out: contiguous [B, D]
  // shapes
  int64_t B, D, chunk, n_chunks;
  bool vec;
  C* part;                         // forward out: [B * n_chunks] (sums itself when n_chunks == 1)
};

template <typename T, bool kHuber, int kTarget>
__global__ void __launch_bounds__(kThreads) regression_partials(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  const int64_t blk = blockIdx.x;
  const Chunk k = chunk_of<V>(blk, a.n_chunks, a.chunk, a.D);
  const T* __restrict__ pred = a.pred + k.b * a.pred_bs;
  const T* __restrict__ t1 = a.t1 + k.b * a.t1_bs;
  const T* __restrict__ t2 = kTarget == kRegC1T1C2T2 ? a.t2 + k.b * a.t2_bs : nullptr;
  const C c1 = kTarget != kRegT1 ? a.coef[2 * k.b] : C(1);
  const C c2 = kTarget == kRegC1T1C2T2 ? a.coef[2 * k.b + 1] : C(0);

  C acc = C(0);
  for (int64_t q = threadIdx.x; q < k.n_groups; q += blockDim.x) {
    const int64_t i = k.i0 + q * V;
    const int valid = int(min64(V, k.i1 - i));
    Pack<T> pp{}, p1{}, p2{};
    load_group<Cache::kStream>(pp, pred, i, valid, a.vec);
    load_group<Cache::kStream>(p1, t1, i, valid, a.vec);
    if constexpr (kTarget == kRegC1T1C2T2) load_group<Cache::kStream>(p2, t2, i, valid, a.vec);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C d = reg_diff<kTarget>(to_c(pp.v[j]), to_c(p1.v[j]), to_c(p2.v[j]), c1, c2);
        acc += reg_term<kHuber>(d, a.cc, a.c);
      }
    }
  }
  const C s = block_sum(acc);
  if (threadIdx.x == 0) a.part[blk] = s;
}

template <typename T, bool kHuber, int kTarget>
__global__ void __launch_bounds__(kThreads) regression_grad(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  const Chunk k = chunk_of<V>(blockIdx.x, a.n_chunks, a.chunk, a.D);
  const T* __restrict__ pred = a.pred + k.b * a.pred_bs;
  const T* __restrict__ t1 = a.t1 + k.b * a.t1_bs;
  const T* __restrict__ t2 = kTarget == kRegC1T1C2T2 ? a.t2 + k.b * a.t2_bs : nullptr;
  T* __restrict__ g = a.gpred + k.b * a.D;
  const C c1 = kTarget != kRegT1 ? a.coef[2 * k.b] : C(1);
  const C c2 = kTarget == kRegC1T1C2T2 ? a.coef[2 * k.b + 1] : C(0);
  const C kb = a.k[k.b];

  for (int64_t q = threadIdx.x; q < k.n_groups; q += blockDim.x) {
    const int64_t i = k.i0 + q * V;
    const int valid = int(min64(V, k.i1 - i));
    Pack<T> pp{}, p1{}, p2{}, pg{};
    load_group<Cache::kStream>(pp, pred, i, valid, a.vec);
    load_group<Cache::kStream>(p1, t1, i, valid, a.vec);
    if constexpr (kTarget == kRegC1T1C2T2) load_group<Cache::kStream>(p2, t2, i, valid, a.vec);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C d = reg_diff<kTarget>(to_c(pp.v[j]), to_c(p1.v[j]), to_c(p2.v[j]), c1, c2);
        pg.v[j] = FromC<T>::cvt(reg_grad<kHuber>(d, kb, a.cc));
      }
    }
    store_group(g, i, pg, valid, a.vec);
  }
}

// ---- host side ------------------------------------------------------------------------------------------

struct Params {  // the ABI's arguments, untyped
  int64_t B, D;
  const void *pred, *t1, *t2, *coef, *k;
  int64_t pred_bs, t1_bs, t2_bs;
  int64_t kind;
  double c;
  void *gpred, *sums, *workspace;
};

int target_of(const Params& p) {
  if (p.coef == nullptr) return kRegT1;
  return p.t2 != nullptr ? kRegC1T1C2T2 : kRegC1T1;
}

template <typename T>
Args<T> make_args(const Params& p, const Plan& plan) {
  using C = typename Compute<T>::type;
  const int target = target_of(p);
  Args<T> a;
  a.pred = static_cast<const T*>(p.pred); a.pred_bs = p.pred_bs;
  a.t1 = static_cast<const T*>(p.t1); a.t1_bs = p.t1_bs;
  a.t2 = target == kRegC1T1C2T2 ? static_cast<const T*>(p.t2) : nullptr; a.t2_bs = p.t2_bs;
  a.coef = static_cast<const C*>(p.coef);
  a.c = C(p.c);
  a.cc = C(p.c * p.c);
  a.k = static_cast<const C*>(p.k);
  a.gpred = static_cast<T*>(p.gpred);
  a.B = p.B; a.D = p.D; a.chunk = plan.chunk; a.n_chunks = plan.n_chunks;
  const int64_t eb = sizeof(T);
  a.vec = rows_aligned(p.pred, p.pred_bs, p.B, eb) && rows_aligned(p.t1, p.t1_bs, p.B, eb) &&
          rows_aligned(a.t2, p.t2_bs, p.B, eb) && rows_aligned(p.gpred, p.D, p.B, eb);
  a.part = nullptr;
  return a;
}

// Calls f(integral_constant<bool, kind == 1>, integral_constant<int, target>).
template <typename F>
void with_kind_target(int64_t kind, int target, F&& f) {
  with_flag(kind == kRegHuber, [&](auto H) {
    switch (target) {
      case kRegT1: f(H, std::integral_constant<int, kRegT1>{}); break;
      case kRegC1T1: f(H, std::integral_constant<int, kRegC1T1>{}); break;
      default: f(H, std::integral_constant<int, kRegC1T1C2T2>{}); break;
    }
  });
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
      rows_final<C, 1><<<static_cast<unsigned>(ceil_div(p.B, per_block)), kFinalThreads, 0, stream>>>(
          nullptr, p.B, 0, static_cast<C*>(p.sums));
      check_launch(kOpF, "rows_final<1>");
    }
    return;
  }
  const bool direct = plan.n_chunks == 1;
  a.part = direct ? static_cast<C*>(p.sums) : static_cast<C*>(p.workspace);
  with_kind_target(p.kind, target_of(p), [&](auto H, auto TG) {
    regression_partials<T, decltype(H)::value, decltype(TG)::value>
        <<<static_cast<unsigned>(n_parts), kThreads, 0, stream>>>(a);
  });
  check_launch(kOpF, "regression_partials");
  if (!direct) {
    rows_final<C, 1><<<static_cast<unsigned>(ceil_div(p.B, per_block)), kFinalThreads, 0, stream>>>(
        a.part, p.B, plan.n_chunks, static_cast<C*>(p.sums));
    check_launch(kOpF, "rows_final<1>");
  }
}

template <typename T>
void launch_backward(const Params& p, cudaStream_t stream) {
  const Plan plan = make_plan(sizeof(T), p.B, p.D);
  const int64_t n_blocks = grid_blocks(kOpB, p.B, plan);
  if (n_blocks == 0) return;
  const Args<T> a = make_args<T>(p, plan);
  with_kind_target(p.kind, target_of(p), [&](auto H, auto TG) {
    regression_grad<T, decltype(H)::value, decltype(TG)::value>
        <<<static_cast<unsigned>(n_blocks), kThreads, 0, stream>>>(a);
  });
  check_launch(kOpB, "regression_grad");
}

void check_common(const char* op, int64_t dtype, int64_t B, int64_t D, const void* pred, const void* t1,
                  int64_t kind) {
  (void)elem_bytes_of(dtype, op);
  if (B < 0 || D < 0) bad_arg(op, "negative size B=" + std::to_string(B) + ", D=" + std::to_string(D));
  if (kind < 0 || kind > 2) bad_arg(op, "kind must be 0, 1 or 2, got " + std::to_string(kind));
  if (B > 0 && D > 0 && (pred == nullptr || t1 == nullptr)) bad_arg(op, "null data pointer among pred, t1");
}

}  // namespace

int64_t regression_workspace_bytes(int64_t dtype, int64_t B, int64_t D) {
  const int64_t eb = elem_bytes_of(dtype, kOpF);
  if (B < 0 || D < 0) bad_arg(kOpF, "negative size B=" + std::to_string(B) + ", D=" + std::to_string(D));
  const Plan plan = make_plan(eb, B, D);
  const int64_t n_parts = grid_blocks(kOpF, B, plan);
  return plan.n_chunks > 1 ? n_parts * compute_bytes_of(dtype) : 0;  // one chunk: written to sums
}

void regression_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                             const void* pred, int64_t pred_bs, const void* t1, int64_t t1_bs,
                             const void* t2, int64_t t2_bs, const void* coef, int64_t kind, double c,
                             void* sums, void* workspace, int64_t workspace_bytes, CUstream_st* stream) {
  check_common(kOpF, dtype, B, D, pred, t1, kind);
  const int64_t need = regression_workspace_bytes(dtype, B, D);
  if (workspace_bytes < need)
    bad_arg(kOpF, "workspace of " + std::to_string(workspace_bytes) + " bytes, need regression_workspace_bytes = " +
                      std::to_string(need));
  if (need > 0 && workspace == nullptr) bad_arg(kOpF, "workspace is null");
  if (reinterpret_cast<uintptr_t>(workspace) % uintptr_t(compute_bytes_of(dtype)) != 0)
    bad_arg(kOpF, "workspace is not aligned to the compute type");
  if (B > 0 && sums == nullptr) bad_arg(kOpF, "sums is null");

  Params p{};
  p.B = B; p.D = D;
  p.pred = pred; p.pred_bs = pred_bs; p.t1 = t1; p.t1_bs = t1_bs; p.t2 = t2; p.t2_bs = t2_bs;
  p.coef = coef; p.kind = kind; p.c = c;
  p.sums = sums; p.workspace = workspace;
  with_dtype(dtype, kOpF, [&](auto tag) { launch_forward<decltype(tag)>(p, stream); });
}

void regression_backward_cuda(int64_t dtype, int64_t B, int64_t D,
                              const void* pred, int64_t pred_bs, const void* t1, int64_t t1_bs,
                              const void* t2, int64_t t2_bs, const void* coef, int64_t kind, double c,
                              const void* k, void* gpred, CUstream_st* stream) {
  check_common(kOpB, dtype, B, D, pred, t1, kind);
  if (B > 0 && D > 0 && (k == nullptr || gpred == nullptr)) bad_arg(kOpB, "null pointer among k, gpred");

  Params p{};
  p.B = B; p.D = D;
  p.pred = pred; p.pred_bs = pred_bs; p.t1 = t1; p.t1_bs = t1_bs; p.t2 = t2; p.t2_bs = t2_bs;
  p.coef = coef; p.kind = kind; p.c = c; p.k = k; p.gpred = gpred;
  with_dtype(dtype, kOpB, [&](auto tag) { launch_backward<decltype(tag)>(p, stream); });
}

}  // namespace gpu
}  // namespace flashdistill
