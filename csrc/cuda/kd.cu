// kd_forward on the GPU: the row kernel of kd_loss (kernels/kd/reference.py; the CPU twin is
// csrc/cpu/kd.cpp, the Triton one kernels/kd/triton_kernel.py, whose pass structure this follows).
//
// One thread block per row of V logits, three passes over the row:
//   A  per thread, the running maximum and sum of exp of u = z / T, v = t / T (TAID: v <- lam v +
//      (1 - lam) u) and of the untempered z for the hard CE; combined across the block;
//   B  the divergence's row sums with the exact log-probabilities (log m recomputed for jsd, skew);
//   C  the gradient (rw / T) dD/du + hw (softmax(z) - onehot(y)), written once.
// Traffic per row (s = element size): 3 x 2 V s read, V s written, 7 V s against a floor of 3 V s;
// with hundreds of rows in flight the re-reads miss the L2 at V = 128k, so ~2.3x the floor
// (prediction, unmeasured: no GPU has run this file yet). Loads are scalar and coalesced (a warp
// reads 32 consecutive elements); 16-byte packs are the next step.
//
// Deterministic: each thread walks a fixed set of columns in a fixed order and the block reductions
// have a fixed tree (rowwise::block_sum), so every bit depends only on the inputs and kThreads.
// Columns past a side's width read as -inf (kd_loss's vocab padding); a truncated student's columns
// past V get a zero gradient. 0 log 0 = 0: every p (.) and q (.) term is a select on p > 0 / q > 0.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/kd.h"
#include "ops.h"
#include "rowwise.cuh"

namespace flashdistill {
namespace gpu {
namespace {

using rowwise::block_sum;
using rowwise::FromC;
using rowwise::to_c;

constexpr int kThreads = 512;  // 16 warps per row: V = 32k-262k gives 64-512 columns per thread

template <typename C> __device__ __forceinline__ C neg_inf() { return -C(INFINITY); }

// Maximum of v over the block, returned to every thread (fixed tree; every thread must call it).
template <typename C>
__device__ __forceinline__ C block_max(C v) {
  __shared__ C warp_max[32];
  __shared__ C total;
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const unsigned n_warps = (blockDim.x + 31u) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    C s = lane < n_warps ? warp_max[lane] : neg_inf<C>();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s = fmax(s, __shfl_down_sync(0xffffffffu, s, o));
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// (max, sum exp(x - max)) of the block from each thread's running pair; log-sum-exp returned.
template <typename C>
__device__ __forceinline__ C block_lse(C m, C s) {
  const C M = block_max(m);
  const C part = m == neg_inf<C>() ? C(0) : s * exp(m - M);
  return M + log(block_sum(part));
}

template <typename C>
__device__ __forceinline__ void online(C& m, C& s, C x) {
  if (x == neg_inf<C>()) return;
  if (x > m) {
    s = s * exp(m - x) + C(1);  // exp(-inf) = 0 on the first element
    m = x;
  } else {
    s += exp(x - m);
  }
}

// A row with no weight: D = CE = 0 and a zero gradient row of `width` elements.
template <typename T, typename C>
__device__ __forceinline__ void masked_row(C* soft_rows, C* hard_rows, T* g_row, int64_t r, int64_t width) {
  if (threadIdx.x == 0) {
    soft_rows[r] = C(0);
    if (hard_rows) hard_rows[r] = C(0);
  }
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) g_row[i] = FromC<T>::cvt(C(0));
}

template <typename C>
__device__ __forceinline__ C logaddexp(C a, C b) {
  const C mx = a > b ? a : b, d = a > b ? b - a : a - b;
  return mx == neg_inf<C>() ? mx : mx + log1p(exp(d));
}

struct KdArgs {
  int64_t N, V, s_stride, s_lim, s_width, t_stride, t_lim, kind;
  double T, beta, alpha, lam;
  const void *student, *teacher, *row_weight, *labels, *hard_weight, *lam_ptr;
  void *grad, *soft_rows, *hard_rows;
};

template <typename T, int KIND, bool MIX>
__global__ void __launch_bounds__(kThreads) kd_rows_kernel(KdArgs a) {
  using C = typename Compute<T>::type;
  const int64_t r = blockIdx.x;
  const T* z_row = reinterpret_cast<const T*>(a.student) + r * a.s_stride;
  const T* t_row = reinterpret_cast<const T*>(a.teacher) + r * a.t_stride;
  T* g_row = reinterpret_cast<T*>(a.grad) + r * a.s_width;
  C* soft_rows = reinterpret_cast<C*>(a.soft_rows);
  C* hard_rows = reinterpret_cast<C*>(a.hard_rows);
  const RowWeights<C> rwt = row_weights<C>(a.row_weight, a.labels, a.hard_weight, r);
  const C rw = rwt.rw, hw = rwt.hw;
  const int64_t y = rwt.y;
  const bool hard_grad = rwt.hard_grad;
  const int64_t V = a.V;
  const C Tc = C(a.T);
  const bool t_one = a.T == 1.0;
  const C lam = a.lam_ptr ? *reinterpret_cast<const C*>(a.lam_ptr) : C(a.lam);

  if (rw == C(0) && !hard_grad) return masked_row(soft_rows, hard_rows, g_row, r, a.s_width);
  auto zt = [&](int64_t i) { return i < a.s_lim ? C(to_c(z_row[i])) : neg_inf<C>(); };
  auto tt = [&](int64_t i) { return i < a.t_lim ? C(to_c(t_row[i])) : neg_inf<C>(); };
  auto temper = [&](C x) { return t_one ? x : x / Tc; };
  auto teacher = [&](C u, int64_t i) {
    C v = temper(tt(i));
    if (MIX) v = lam == C(0) ? u : (lam == C(1) ? v : lam * v + (C(1) - lam) * u);
    return v;
  };

  // ---- A ----
  C mu = neg_inf<C>(), su = 0, mv = neg_inf<C>(), sv = 0, mz = neg_inf<C>(), sz = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const C z = zt(i), u = temper(z);
    online(mu, su, u);
    online(mv, sv, teacher(u, i));
    if (!t_one) online(mz, sz, z);
  }
  const C lse_u = block_lse(mu, su), lse_v = block_lse(mv, sv);
  const C lse_z = t_one ? lse_u : block_lse(mz, sz);
  if (threadIdx.x == 0 && hard_rows) hard_rows[r] = y >= 0 ? lse_z - C(to_c(z_row[y])) : C(0);

  // ---- B ----
  const C lb = C(a.beta > 0 ? log(a.beta) : -INFINITY), l1b = C(a.beta < 1 ? log1p(-a.beta) : -INFINITY);
  const C la = C(a.alpha > 0 ? log(a.alpha) : -INFINITY), l1a = C(log1p(-a.alpha));
  const C alpha = C(a.alpha), beta = C(a.beta), lamc = C(a.lam);
  C acc0 = 0, acc1 = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const C u = temper(zt(i)), v = teacher(u, i);
    const C lq = u - lse_u, lp = v - lse_v, q = exp(lq), p = exp(lp);
    if (KIND == kKdForwardKL || KIND == kKdTAID) {
      acc0 += p > C(0) ? p * (lp - lq) : C(0);
    } else if (KIND == kKdReverseKL) {
      acc0 += q > C(0) ? q * (lq - lp) : C(0);
    } else if (KIND == kKdJSD || KIND == kKdJSDNormalized) {
      const C lm = logaddexp(lp + lb, lq + l1b);
      acc0 += p > C(0) ? p * (lp - lm) : C(0);
      acc1 += q > C(0) ? q * (lq - lm) : C(0);
    } else if (KIND == kKdTVD) {
      const C sg = C(0.5) * (C(q > p) - C(q < p));
      acc0 += fabs(q - p);
      acc1 += q * sg;
    } else if (KIND == kKdSkewForwardKL) {
      const C lm = logaddexp(lp + la, lq + l1a);
      const C pm = p > C(0) ? exp(lp - lm) : C(0);
      acc0 += p > C(0) ? p * (lp - lm) : C(0);
      acc1 += q * pm;
    } else if (KIND == kKdSkewReverseKL) {
      const C x = lq - logaddexp(lp + l1a, lq + la);
      const C av = q > C(0) ? x - alpha * exp(x) : C(0);
      acc0 += q > C(0) ? q * x : C(0);
      acc1 += q * av;
    } else {  // mixed
      const C d = lq - lp;
      acc0 += p > C(0) ? -p * d : C(0);
      acc1 += q > C(0) ? q * d : C(0);
    }
  }
  const C s0 = block_sum(acc0), s1 = block_sum(acc1);
  C D;
  if (KIND == kKdJSD) D = beta * s0 + (C(1) - beta) * s1;
  else if (KIND == kKdJSDNormalized) D = (beta * s0 + (C(1) - beta) * s1) / (beta * (C(1) - beta));
  else if (KIND == kKdTVD) D = C(0.5) * s0;
  else if (KIND == kKdMixed) D = lamc * s0 + (C(1) - lamc) * s1;
  else D = s0;
  if (threadIdx.x == 0) soft_rows[r] = D;

  // ---- C ----
  const C cs = rw / Tc;
  const C f_jsd = KIND == kKdJSDNormalized ? C(1) / beta : C(1) - beta;
  for (int64_t i = threadIdx.x; i < a.s_width; i += blockDim.x) {
    C g = 0;
    if (i < V) {
      const C z = zt(i), u = temper(z), v = teacher(u, i);
      const C lq = u - lse_u, lp = v - lse_v, q = exp(lq), p = exp(lp);
      C gs;
      if (KIND == kKdForwardKL || KIND == kKdTAID) {
        gs = q - p;
      } else if (KIND == kKdReverseKL) {
        gs = q > C(0) ? q * ((lq - lp) - s0) : C(0);
      } else if (KIND == kKdJSD || KIND == kKdJSDNormalized) {
        const C lm = logaddexp(lp + lb, lq + l1b);
        gs = q > C(0) ? f_jsd * (q * ((lq - lm) - s1)) : C(0);
      } else if (KIND == kKdTVD) {
        const C sg = C(0.5) * (C(q > p) - C(q < p));
        gs = q * (sg - s1);
      } else if (KIND == kKdSkewForwardKL) {
        const C lm = logaddexp(lp + la, lq + l1a);
        const C pm = p > C(0) ? exp(lp - lm) : C(0);
        gs = (C(1) - alpha) * (q * (s1 - pm));
      } else if (KIND == kKdSkewReverseKL) {
        const C x = lq - logaddexp(lp + l1a, lq + la);
        const C av = q > C(0) ? x - alpha * exp(x) : C(0);
        gs = q * (av - s1);
      } else {
        const C r2 = q > C(0) ? q * ((lq - lp) - s1) : C(0);
        gs = lamc * (q - p) + (C(1) - lamc) * r2;
      }
      g = rw != C(0) ? cs * gs : C(0);
      if (hard_grad) g += hw * (exp(z - lse_z) - C(i == y));
    }
    g_row[i] = FromC<T>::cvt(g);
  }
}

template <typename T, int KIND>
void launch_kind(const KdArgs& a, bool mix, cudaStream_t stream) {
  rowwise::with_flag(mix, [&](auto m) {
    kd_rows_kernel<T, KIND, decltype(m)::value><<<unsigned(a.N), kThreads, 0, stream>>>(a);
  });
  rowwise::check_launch("kd_forward", "kd_rows_kernel");
}

template <typename T>
void launch(const KdArgs& a, cudaStream_t stream) {
  const bool mix = a.kind == kKdTAID && (a.lam_ptr != nullptr || a.lam != 1.0);
  switch (a.kind) {
    case kKdForwardKL: return launch_kind<T, kKdForwardKL>(a, false, stream);
    case kKdReverseKL: return launch_kind<T, kKdReverseKL>(a, false, stream);
    case kKdJSD: return launch_kind<T, kKdJSD>(a, false, stream);
    case kKdJSDNormalized: return launch_kind<T, kKdJSDNormalized>(a, false, stream);
    case kKdTVD: return launch_kind<T, kKdTVD>(a, false, stream);
    case kKdSkewForwardKL: return launch_kind<T, kKdSkewForwardKL>(a, false, stream);
    case kKdSkewReverseKL: return launch_kind<T, kKdSkewReverseKL>(a, false, stream);
    case kKdMixed: return launch_kind<T, kKdMixed>(a, false, stream);
    default: return launch_kind<T, kKdTAID>(a, mix, stream);
  }
}


// ---- top-k teacher (topk_kd_forward_cuda; the CPU twin is kd.cpp "top-k teacher") ----------------
// One block per row. The row's ids go into a shared-memory bitmap (V bits), so membership is one
// bit test: the tail LSE is summed over the complement (no cancellation), the dense gradient pass
// skips the ids, and their K values are written from the block's registers afterwards. Passes: A
// (LSEs of u, of u off the ids, of z for the hard CE), the K teacher terms (thread-strided over K,
// block sums), C (dense gradient off the ids), then the K on-id values. Traffic per row: 2 reads of
// V + 1 write of V + the K ids and log-probs. grad may alias the student logits (each on-id logit is
// re-read before its own write; off-id elements are read and written by the same thread in C).

struct TopkArgs {
  int64_t N, V, s_stride, K, mode;
  double T, ratio;
  const void *student, *ids, *logprobs, *row_weight, *labels, *hard_weight;
  void *grad, *soft_rows, *hard_rows;
};

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) topk_rows_kernel(TopkArgs a) {
  using C = typename Compute<T>::type;
  extern __shared__ uint32_t member[];  // ceil(V / 32) words
  const int64_t r = blockIdx.x, V = a.V, K = a.K;
  const T* z_row = reinterpret_cast<const T*>(a.student) + r * a.s_stride;
  T* g_row = reinterpret_cast<T*>(a.grad) + r * V;
  const int64_t* ids = reinterpret_cast<const int64_t*>(a.ids) + r * K;
  const C* lp = reinterpret_cast<const C*>(a.logprobs) + r * K;
  C* soft_rows = reinterpret_cast<C*>(a.soft_rows);
  C* hard_rows = reinterpret_cast<C*>(a.hard_rows);
  const RowWeights<C> rwt = row_weights<C>(a.row_weight, a.labels, a.hard_weight, r);
  const C rw = rwt.rw, hw = rwt.hw;
  const int64_t y = rwt.y;
  const bool hard_grad = rwt.hard_grad;
  const C Tc = C(a.T), ratio = C(a.ratio);
  const bool t_one = a.T == 1.0;

  if (rw == C(0) && !hard_grad) return masked_row(soft_rows, hard_rows, g_row, r, V);
  const int64_t words = (V + 31) / 32;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) member[w] = 0u;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) atomicOr(&member[ids[k] >> 5], 1u << (ids[k] & 31));
  __syncthreads();
  auto is_member = [&](int64_t i) { return (member[i >> 5] >> (i & 31)) & 1u; };
  auto temper = [&](C x) { return t_one ? x : x / Tc; };

  // ---- A ----
  C mu = neg_inf<C>(), su = 0, mt = neg_inf<C>(), st = 0, mz = neg_inf<C>(), sz = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const C z = C(to_c(z_row[i])), u = temper(z);
    online(mu, su, u);
    if (!is_member(i)) online(mt, st, u);
    if (!t_one) online(mz, sz, z);
  }
  const C lse_u = block_lse(mu, su), log_tail = block_lse(mt, st);  // -inf when the complement is empty
  const C lse_z = t_one ? lse_u : block_lse(mz, sz);
  if (threadIdx.x == 0 && hard_rows) hard_rows[r] = y >= 0 ? lse_z - C(to_c(z_row[y])) : C(0);

  // ---- the teacher's K terms ----
  C ps = 0, lmax = neg_inf<C>(), mS = neg_inf<C>();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    ps += exp(lp[k]);
    lmax = fmax(lmax, ratio * lp[k]);
    mS = fmax(mS, temper(C(to_c(z_row[ids[k]]))));
  }
  const C PS = block_sum(ps);
  const C ltp = (PS < C(1) ? log1p(-PS) : neg_inf<C>()) * ratio;
  lmax = block_max(lmax);
  mS = block_max(mS);
  if (MODE == 2) lmax = fmax(lmax, ltp);
  C zs = 0, es = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    zs += exp(ratio * lp[k] - lmax);
    es += exp(temper(C(to_c(z_row[ids[k]]))) - mS);
  }
  C zsum = block_sum(zs);
  const C lse_S = mS + log(block_sum(es));
  if (MODE == 2 && ltp > neg_inf<C>()) zsum += exp(ltp - lmax);
  const C lZ = lmax + log(zsum);
  const C p_tail = MODE == 2 && ltp > neg_inf<C>() ? exp(ltp - lZ) : C(0);
  C d = 0, psn = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const C lpk = ratio * lp[k] - lZ, pk = exp(lpk);
    const C lq = temper(C(to_c(z_row[ids[k]]))) - (MODE == 1 ? lse_S : lse_u);
    d += pk > C(0) ? pk * (lpk - lq) : C(0);
    psn += pk;
  }
  C D = block_sum(d);
  const C PSn = block_sum(psn);
  if (MODE == 2 && p_tail > C(0)) D += p_tail * ((ltp - lZ) - (log_tail - lse_u));
  if (threadIdx.x == 0) soft_rows[r] = D;

  // ---- C: off the ids, then on them ----
  C c_off = C(1);
  if (MODE == 1) c_off = C(0);
  if (MODE == 2) c_off = PSn - (log_tail > neg_inf<C>() ? p_tail * exp(lse_S - log_tail) : C(0));
  const C cs = rw / Tc;
  // the dense pass never writes an on-id element, so the K loop below still reads the logits there
  // when grad aliases them
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    if (is_member(i)) continue;
    const C z = C(to_c(z_row[i]));
    C g = rw != C(0) ? cs * (c_off * exp(temper(z) - lse_u)) : C(0);
    if (hard_grad) g += hw * (exp(z - lse_z) - C(i == y));
    g_row[i] = FromC<T>::cvt(g);
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = ids[k];
    const C z = C(to_c(z_row[id])), u = temper(z);
    const C pk = exp(ratio * lp[k] - lZ);
    const C q = exp(u - (MODE == 1 ? lse_S : lse_u));
    C g = rw != C(0) ? cs * (q - pk) : C(0);
    if (hard_grad) g += hw * (exp(z - lse_z) - C(id == y));
    g_row[id] = FromC<T>::cvt(g);
  }
}

template <typename T>
void launch_topk(const TopkArgs& a, cudaStream_t stream) {
  const size_t smem = size_t((a.V + 31) / 32) * 4;
  auto go = [&](auto kernel) {
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (e != cudaSuccess) {
        (void)cudaGetLastError();  // clear it: else the next launch check would report it as its own
        rowwise::bad_arg("topk_kd_forward", "V = " + std::to_string(a.V) + " needs " + std::to_string(smem) +
                                                " bytes of shared memory: " + cudaGetErrorString(e));
      }
    }
    kernel<<<unsigned(a.N), kThreads, smem, stream>>>(a);
    rowwise::check_launch("topk_kd_forward", "topk_rows_kernel");
  };
  switch (a.mode) {
    case 0: return go(topk_rows_kernel<T, 0>);
    case 1: return go(topk_rows_kernel<T, 1>);
    default: return go(topk_rows_kernel<T, 2>);
  }
}

}  // namespace

void kd_forward_cuda(int64_t dtype, int64_t N, int64_t V, const void* student, int64_t s_stride, int64_t s_width,
                     const void* teacher, int64_t t_stride, int64_t t_width, int64_t kind, double temperature,
                     double beta, double alpha, double lam, const void* lam_ptr, const void* row_weight,
                     const void* labels, const void* hard_weight, void* grad, void* soft_rows, void* hard_rows,
                     CUstream_st* stream) {
  if (kind < kKdForwardKL || kind > kKdTAID)
    rowwise::bad_arg("kd_forward", "unsupported kind code " + std::to_string(kind) + " (0..8)");
  if (s_width < 1 || t_width < 1 || V < std::min(s_width, t_width) || V > std::max(s_width, t_width))
    rowwise::bad_arg("kd_forward", "V must lie between the student's and the teacher's widths");
  if (N > INT32_MAX) rowwise::bad_arg("kd_forward", "more than 2^31 - 1 rows");
  if (N <= 0) return;
  // jsd at its ends is forward / reverse KL (the limits are 0 / 0), as the other backends do
  if ((kind == kKdJSD || kind == kKdJSDNormalized) && beta == 0.0) kind = kKdForwardKL;
  if ((kind == kKdJSD || kind == kKdJSDNormalized) && beta == 1.0) kind = kKdReverseKL;
  const KdArgs a{N, V, s_stride, std::min(s_width, V), s_width, t_stride, std::min(t_width, V), kind,
                 temperature, beta, alpha, lam, student, teacher, row_weight, labels, hard_weight, lam_ptr,
                 grad, soft_rows, hard_rows};
  rowwise::with_dtype(dtype, "kd_forward", [&](auto tag) { launch<decltype(tag)>(a, stream); });
}

void topk_kd_forward_cuda(int64_t dtype, int64_t N, int64_t V, const void* student, int64_t s_stride, int64_t K,
                          const void* ids, const void* logprobs, int64_t mode, double temperature, double ratio,
                          const void* row_weight, const void* labels, const void* hard_weight, void* grad,
                          void* soft_rows, void* hard_rows, CUstream_st* stream) {
  if (mode < 0 || mode > 2) rowwise::bad_arg("topk_kd_forward", "unsupported mode code " + std::to_string(mode));
  if (K < 1 || K > V) rowwise::bad_arg("topk_kd_forward", "K must be in [1, V]");
  if (N > INT32_MAX) rowwise::bad_arg("topk_kd_forward", "more than 2^31 - 1 rows");
  if (N <= 0) return;
  const TopkArgs a{N, V, s_stride, K, mode, temperature, ratio, student, ids, logprobs, row_weight, labels,
                   hard_weight, grad, soft_rows, hard_rows};
  rowwise::with_dtype(dtype, "topk_kd_forward", [&](auto tag) { launch_topk<decltype(tag)>(a, stream); });
}

}  // namespace gpu
}  // namespace flashdistill
