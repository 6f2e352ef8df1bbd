// Attention forward / backward and the streaming attention-map KL (issue #6) on the GPU. The ABI and
// the semantics are csrc/README.md, "Attention (issue #6)"; the float64 spec is
// kernels/attention/reference.py; the algorithms are FlashAttention-2 (Dao 2023, Algorithms 1-2) and
// the one-pass KL of shared/research/attn_sampler.md Sec. 3.2.
//
// Math, per (batch b, query head h, query row i), kv head h / (Hq / Hk), keys j visible iff
// !causal or j <= i (top-left, as SDPA):
//   S_ij = scale q_i . k_j,  lse_i = log sum_j e^{S_ij},  P_ij = e^{S_ij - lse_i},  out_i = sum_j P_ij v_j
//   backward:  Delta_i = dO_i . O_i,  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - Delta_i),
//              dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_{h in group, i} dS_ij q_i,
//              dv_j = sum_{h in group, i} P_ij dO_i
//   KD:  t_ij = scale_t qt_i . kt_j,  s_ij = scale_s qs_i . ks_j (their own kv-head maps),
//        KL_i = sum_j P^t_ij (t_ij - s_ij) - lse^t_i + lse^s_i,  dS_ij = g_i (P^s_ij - P^t_ij),
//        dqs_i = scale_s sum_j dS_ij ks_j,  dks_j = scale_s sum_{h in group, i} dS_ij qs_i
//
// Kernels (n = B Hq Lq Lk visible pairs, halved by causal when Lq = Lk):
//   float16 / bfloat16, D in {32, 64, 96, 128} (template instances): tensor cores, mma.sync m16n8k16
//     with fp32 accumulation, operands through ldmatrix from padded shared-memory tiles, K/V (or Q/dO)
//     tiles double-buffered with cp.async (attention_mma.cuh has the fragment layouts):
//     attn_fwd_mma      one CTA per (64/128 query rows, b Hq), 16 rows per warp, 64-key tiles
//     attn_bwd_delta    Delta = rowsum(dO o O) into the workspace
//     attn_bwd_dkdv_mma one CTA per (64 keys, b Hk), 16 keys per warp, over the group's query heads
//     attn_bwd_dq_mma   one CTA per (64 query rows, b Hq), recomputes P (no atomics: deterministic)
//     attn_kd_fwd_mma, attn_kd_bwd_dq_mma, attn_kd_bwd_dk_mma: the same three shapes for the KD loss
//     (float16 / bfloat16 with Ds, Dt in {32, 64, 96, 128}; tiles of width 32, 64, 128, 96 zero-padded)
//   float32 / float64 (and KD at other head dims, any dtype), any D <= 256: the generic kernels, plain
//     FMA in the compute type (16-bit inputs widened to fp32), one warp per query (or key) row, lanes
//     over the 32 keys (queries) of a tile staged in shared memory for the logits, lanes over the head
//     dim for the accumulators. Correct and deterministic, not fast.
// Every reduction has a fixed order (register accumulation in key order, fixed shuffle trees), so the
// results are bitwise reproducible run to run. Compile-checked for sm_80 / sm_90; the GPU tests of
// issue #6 are the first to run it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention_mma.cuh"
#include "flashdistill/common.h"
#include "ops.h"
#include "rowwise.cuh"

namespace flashdistill {
namespace gpu {

// One dynamic shared-memory buffer for every kernel of this file (each carves its own layout).
extern __shared__ __align__(16) unsigned char fd_attn_smem[];

namespace {

using rowwise::FromC;
using rowwise::to_c;

constexpr unsigned kFull = 0xffffffffu;
constexpr double kLog2eD = 1.4426950408889634;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename C> __device__ __forceinline__ C neg_inf() { return -C(INFINITY); }

template <typename C>
__device__ __forceinline__ C warp_allmax(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Butterfly sum: every lane ends with the same bits (each step adds the same two values).
template <typename C>
__device__ __forceinline__ C warp_allsum(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Everything a kernel of the attention op needs; unused fields are null / 0.
struct AttnArgs {
  // data
  const void* q;
  const void* k;
  const void* v;
  const void* out;     // backward: the forward's output [B, Hq, Lq, D], contiguous
  const void* dout;    // backward: [B, Hq, Lq, D], contiguous
  const void* lse_in;  // backward: [B, Hq, Lq] of C
  void* o;             // forward out [B, Hq, Lq, D]
  void* lse;           // forward lse [B, Hq, Lq] of C
  void* dq;            // [B, Hq, Lq, D]
  void* dk;            // [B, Hk, Lk, D]
  void* dv;            // [B, Hk, Lk, D]
  void* delta;         // workspace: Delta [B, Hq, Lq] of C
  // strides, in elements (the head dim is contiguous)
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
  // shapes
  int B, Hq, Hk, G, Lq, Lk, D;
  int nblk;  // blocks per (batch, head) along the kernel's row dimension; grid = B H nblk
  double scale;
  bool causal;
  bool vec_q, vec_k, vec_v, vec_o;  // 16-byte cp.async allowed for q / k / v / (out, dout)
};

// =====================================================================================================
// float16 / bfloat16: tensor-core kernels
// =====================================================================================================

constexpr int kBN = 64;  // keys per K/V tile (forward, dQ at D <= 64) and per dK/dV CTA

// Launch bounds: the MMA and generic kernels name a minimum of blocks per SM that still allows 255
// registers per thread ((128, 2), (256, 1)). Without it, sm_90's ptxas aims at 128 registers and spilled 4-8 bytes
// in three kernels (one inside attn_kd_bwd_dq_mma's key loop); with it none of the kernels spills on
// sm_80 or sm_90 (nvcc 13.0, -Xptxas -v), except attn_kd_bwd_dk_mma<128, 128>, which spilled 60 bytes
// with (128, 2) and none with plain (128): that kernel keeps the plain bound. Register allocation only;
// no effect on results.

// Forward configuration: 16 query rows per warp; 8 warps (BM = 128) at D <= 64, 4 warps (BM = 64) at
// D = 96, 128 where the fp32 output accumulator (D / 2 registers per thread) and the Q fragments (D / 4)
// leave no room for a second 16-row block. Tuning only: any NW in 1..8 is correct.
template <int D> struct FwdCfg {
  static constexpr int kWarps = D <= 64 ? 8 : 4;
  static constexpr int kBM = 16 * kWarps;
  static constexpr size_t smem() { return size_t(kBM + 4 * kBN) * attn_mma::Tile<D>::kLds * 2; }
};

// attn_fwd_mma: out = softmax(scale Q K^T) V and lse, FlashAttention-2 forward.
// Grid: B Hq ceil(Lq / BM) CTAs of NW warps, query blocks in reverse order (causal: heaviest first).
// Each warp owns 16 query rows: Q fragments in registers for the whole key loop, S = Q K^T (16 x 64
// fp32) and O (16 x D fp32) in registers; online softmax in base 2 (log2 e folded into the scale),
// P packed to the input type in registers as the A operand of O += P V. K/V tiles of 64 keys,
// double-buffered through cp.async: tile j + 1 loads while tile j is used. Causal: tiles above the
// block's diagonal are not loaded; a warp skips a tile above its own 16 rows; only tiles that cross the
// diagonal or the Lk tail are masked.
// FLOPs: 4 n D (S and PV) on the tensor cores, n exp2. Bytes (s = 2): read Q and write O once
// (2 B Hq Lq D s), write lse (4 B Hq Lq), read K and V once per query block (2 B Hq Lk D s Lq / BM,
// from L2 after the first block of a head: the floor is 2 B Hk Lk D s from HBM).
template <typename T, int D, int NW>
__global__ void __launch_bounds__(NW * 32, 8 / NW) attn_fwd_mma(AttnArgs a) {
  using namespace attn_mma;
  constexpr int BM = 16 * NW, BN = kBN, NT = NW * 32, LDS = Tile<D>::kLds;
  constexpr int KD = D / 16, NDT = D / 8, NST = BN / 8;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(fd_attn_smem);  // [BM][LDS]
  uint16_t* sK = sQ + BM * LDS;                               // [2][BN][LDS]
  uint16_t* sV = sK + 2 * BN * LDS;                           // [2][BN][LDS]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.Hq, h = bh - b * a.Hq, hk = h / a.G;
  const int m0 = qb * BM;
  const int Lq = a.Lq, Lk = a.Lk;
  const bool causal = a.causal;

  const uint16_t* qg = static_cast<const uint16_t*>(a.q) + b * a.q_sb + h * a.q_sh + int64_t(m0) * a.q_sl;
  const uint16_t* kg = static_cast<const uint16_t*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const uint16_t* vg = static_cast<const uint16_t*>(a.v) + b * a.v_sb + hk * a.v_sh;

  int n_kb = (Lk + BN - 1) / BN;
  if (causal) n_kb = min(n_kb, (min(m0 + BM, Lq) - 1) / BN + 1);  // keys <= the block's last row

  load_tile<D, BM, NT>(sQ, qg, a.q_sl, Lq - m0, a.vec_q, tid);
  if (n_kb > 0) {
    load_tile<D, BN, NT>(sK, kg, a.k_sl, Lk, a.vec_k, tid);
    load_tile<D, BN, NT>(sV, vg, a.v_sl, Lk, a.vec_v, tid);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t qf[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) load_a<LDS>(qf[kk], sQ, warp * 16, kk * 16, lane);

  float o[NDT][4];
#pragma unroll
  for (int i = 0; i < NDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g, g + 8 (base 2); l: this thread's columns
  const float sl2 = float(a.scale * kLog2eD);
  const int row0 = m0 + warp * 16;

  for (int j = 0; j < n_kb; ++j) {
    const int buf = j & 1, n0 = j * BN;
    if (j + 1 < n_kb) {
      const int n1 = n0 + BN;
      load_tile<D, BN, NT>(sK + (buf ^ 1) * BN * LDS, kg + int64_t(n1) * a.k_sl, a.k_sl, Lk - n1, a.vec_k, tid);
      load_tile<D, BN, NT>(sV + (buf ^ 1) * BN * LDS, vg + int64_t(n1) * a.v_sl, a.v_sl, Lk - n1, a.vec_v, tid);
      cp_async_commit();
      cp_async_wait<1>();  // tile j has landed; tile j + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* ks = sK + buf * BN * LDS;
    const uint16_t* vs = sV + buf * BN * LDS;

    if (!(causal && n0 > row0 + 15)) {  // else every key of the tile is above this warp's rows
      float s[NST][4];
#pragma unroll
      for (int i = 0; i < NST; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t kb[4];
          load_b_nk<LDS>(kb, ks, np * 16, kk * 16, lane);
          mma_pair<T>(s[2 * np], s[2 * np + 1], qf[kk], kb);
        }
      }
      // scale (base 2) and mask; element (nt, e) is row row0 + g + 8 (e / 2), key n0 + 8 nt + 2 tq + e % 2
      const bool mask = n0 + BN > Lk || (causal && n0 + BN - 1 > row0);
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < NST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nt][e] * sl2;
          if (mask) {
            const int col = n0 + nt * 8 + 2 * tq + (e & 1), row = row0 + g + (e >> 1) * 8;
            if (col >= Lk || (causal && col > row)) x = -INFINITY;
          }
          s[nt][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      }
      float mu[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        // the 4 lanes of a quad hold the 64 columns of one row
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], 2));
        const float mn = fmaxf(m[r], mx[r]);
        mu[r] = mn == -INFINITY ? 0.f : mn;  // a row with no visible key yet: keep exp2 finite
        const float alpha = exp2f(m[r] - mu[r]);
        m[r] = mn;
        l[r] *= alpha;
#pragma unroll
        for (int dt = 0; dt < NDT; ++dt) {
          o[dt][2 * r] *= alpha;
          o[dt][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < NST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[nt][e] - mu[e >> 1]);
          s[nt][e] = p;
          l[e >> 1] += p;
        }
      }
      // O += P V: P's accumulators are the A fragments (attention_mma.cuh), V through ldmatrix.trans
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t pa[4];
        pack_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vb[4];
          load_b_kn<LDS>(vb, vs, kk * 16, dp * 16, lane);
          mma_pair<T>(o[2 * dp], o[2 * dp + 1], pa, vb);
        }
      }
    }
    __syncthreads();  // every warp is done with buffer buf before iteration j + 1 refills it
  }

  float* lse = static_cast<float*>(a.lse);
  uint16_t* og = static_cast<uint16_t*>(a.o);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
    const int row = row0 + g + 8 * r;
    if (row < Lq) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // l = 0 only when Lk = 0: out = 0, lse = -inf
      uint16_t* orow = og + (int64_t(bh) * Lq + row) * D + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < NDT; ++dt)
        *reinterpret_cast<uint32_t*>(orow + dt * 8) = pack2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv, T{});
      if (tq == 0) lse[int64_t(bh) * Lq + row] = l[r] > 0.f ? m[r] * kLn2 + logf(l[r]) : -INFINITY;
    }
  }
}

// attn_bwd_delta: Delta_i = sum_d dO_id O_id in the compute type, one warp per row (any dtype, any D).
// Bytes: read 2 B Hq Lq D s, write B Hq Lq c. FLOPs: 2 B Hq Lq D.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_delta(const T* __restrict__ out, const T* __restrict__ dout,
                                                       typename Compute<T>::type* __restrict__ delta, int64_t rows,
                                                       int D) {
  using C = typename Compute<T>::type;
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together
  const T* o = out + row * D;
  const T* d = dout + row * D;
  C s = C(0);
  for (int i = lane; i < D; i += 32) s += C(to_c(o[i])) * C(to_c(d[i]));
  s = warp_allsum(s);
  if (lane == 0) delta[row] = s;
}

// dK/dV configuration: 4 warps x 16 keys = 64 keys per CTA; query tiles of BQ rows (64 at D <= 64,
// 32 at D = 96, 128 so that dK, dV (D registers) plus S^T and dP^T (BQ / 2 each) fit in 255
// registers without spilling). Tuning only.
template <int D> struct DkdvCfg {
  static constexpr int kBQ = D <= 64 ? 64 : 32;
  static constexpr size_t smem() {
    return size_t(2 * kBN + 4 * kBQ) * attn_mma::Tile<D>::kLds * 2 + size_t(4 * kBQ) * sizeof(float);
  }
};

// attn_bwd_dkdv_mma: dV_j = sum P_ij dO_i, dK_j = scale sum dS_ij q_i over the query heads of the kv
// head's group and all query blocks (FlashAttention-2 backward, outer loop over keys).
// Grid: B Hk ceil(Lk / 64) CTAs of 4 warps; each warp owns 16 keys and keeps their dK, dV (16 x D fp32)
// in registers. Per (head, query tile of BQ rows), Q, dO, lse and Delta are double-buffered in shared
// memory (cp.async) and each warp computes, all in its registers:
//   S^T = K_w Q^T (16 x BQ),  P^T = exp2(S^T scale log2e - lse_i log2e),  dV += P^T dO,
//   dP^T = V_w dO^T,  dS^T = P^T o (dP^T - Delta_i),  dK += dS^T Q
// with P^T and dS^T packed to the input type as A operands (the transposed products let every operand
// come straight from a [row][d] tile: K_w, V_w by ldmatrix, Q, dO by ldmatrix / ldmatrix.trans).
// Causal: query tiles that end before the CTA's first key are skipped, a warp skips a tile that ends
// before its own first key. Keys past Lk are computed on zero rows and not stored.
// FLOPs: 8 n D (S, dV, dP, dK). Bytes: read K, V once (2 B Hk Lk D s), Q and dO once per key block
// (2 B Hq Lq D s Lk / 64, mostly L2), lse and Delta as often (8 B Hq Lq Lk / 64); write dK, dV once.
template <typename T, int D, int BQ>
__global__ void __launch_bounds__(128, 2) attn_bwd_dkdv_mma(AttnArgs a) {
  using namespace attn_mma;
  constexpr int BN = kBN, NT = 128, LDS = Tile<D>::kLds, KD = D / 16, NDT = D / 8, NQT = BQ / 8;
  uint16_t* sK = reinterpret_cast<uint16_t*>(fd_attn_smem);  // [BN][LDS]
  uint16_t* sV = sK + BN * LDS;                               // [BN][LDS]
  uint16_t* sQ = sV + BN * LDS;                               // [2][BQ][LDS]
  uint16_t* sO = sQ + 2 * BQ * LDS;                           // [2][BQ][LDS] (dO)
  float* sL = reinterpret_cast<float*>(sO + 2 * BQ * LDS);    // [2][BQ]: lse log2e (0 past Lq)
  float* sD = sL + 2 * BQ;                                    // [2][BQ]: Delta (0 past Lq)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int nkb = a.nblk;
  const int bhk = int(blockIdx.x / unsigned(nkb));
  const int kb = int(blockIdx.x - unsigned(bhk) * unsigned(nkb));
  const int b = bhk / a.Hk, hk = bhk - b * a.Hk;
  const int n0 = kb * BN;
  const int Lq = a.Lq, Lk = a.Lk, G = a.G;
  const bool causal = a.causal;

  const uint16_t* kg = static_cast<const uint16_t*>(a.k) + b * a.k_sb + hk * a.k_sh + int64_t(n0) * a.k_sl;
  const uint16_t* vg = static_cast<const uint16_t*>(a.v) + b * a.v_sb + hk * a.v_sh + int64_t(n0) * a.v_sl;
  const uint16_t* qbase = static_cast<const uint16_t*>(a.q) + b * a.q_sb;
  const uint16_t* obase = static_cast<const uint16_t*>(a.dout);
  const float* lse = static_cast<const float*>(a.lse_in);
  const float* delta = static_cast<const float*>(a.delta);

  const int qb_start = causal ? n0 / BQ : 0;  // queries i >= n0 only
  const int n_q = max(0, (Lq + BQ - 1) / BQ - qb_start);
  const int total = G * n_q;  // (head, query tile) iterations, head-major

  auto issue = [&](int it, int buf) {
    const int hh = it / n_q, h = hk * G + hh, q0 = (qb_start + (it - hh * n_q)) * BQ;
    const int64_t bh = int64_t(b) * a.Hq + h;
    load_tile<D, BQ, NT>(sQ + buf * BQ * LDS, qbase + h * a.q_sh + int64_t(q0) * a.q_sl, a.q_sl, Lq - q0,
                         a.vec_q, tid);
    load_tile<D, BQ, NT>(sO + buf * BQ * LDS, obase + (bh * Lq + q0) * D, D, Lq - q0, a.vec_o, tid);
    for (int r = tid; r < BQ; r += NT) {
      const bool ok = q0 + r < Lq;
      sL[buf * BQ + r] = ok ? lse[bh * Lq + q0 + r] * kLog2e : 0.f;
      sD[buf * BQ + r] = ok ? delta[bh * Lq + q0 + r] : 0.f;
    }
  };

  load_tile<D, BN, NT>(sK, kg, a.k_sl, Lk - n0, a.vec_k, tid);
  load_tile<D, BN, NT>(sV, vg, a.v_sl, Lk - n0, a.vec_v, tid);
  if (total > 0) issue(0, 0);
  cp_async_commit();

  float dk[NDT][4], dv[NDT][4];
#pragma unroll
  for (int i = 0; i < NDT; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
  const float sl2 = float(a.scale * kLog2eD);
  const int kw0 = n0 + warp * 16;  // this warp's first key

  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) {
      issue(it + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int q0 = (qb_start + it % n_q) * BQ;
    const uint16_t* qs = sQ + buf * BQ * LDS;
    const uint16_t* os = sO + buf * BQ * LDS;
    const float* ls = sL + buf * BQ;
    const float* ds_ = sD + buf * BQ;

    if (kw0 < Lk && !(causal && q0 + BQ - 1 < kw0)) {
      // S^T = K_w Q^T: element (nt, e) is key kw0 + g + 8 (e / 2), query q0 + 8 nt + 2 tq + e % 2
      float s[NQT][4];
#pragma unroll
      for (int i = 0; i < NQT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t ka[4];
        load_a<LDS>(ka, sK, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BQ / 16; ++np) {
          uint32_t qb4[4];
          load_b_nk<LDS>(qb4, qs, np * 16, kk * 16, lane);
          mma_pair<T>(s[2 * np], s[2 * np + 1], ka, qb4);
        }
      }
      const bool mask = q0 + BQ > Lq || kw0 + 16 > Lk || (causal && q0 < kw0 + 15);
#pragma unroll
      for (int nt = 0; nt < NQT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + 2 * tq + (e & 1);
          float p = exp2f(s[nt][e] * sl2 - ls[qi]);
          if (mask) {
            const int key = kw0 + g + (e >> 1) * 8, qrow = q0 + qi;
            if (qrow >= Lq || key >= Lk || (causal && key > qrow)) p = 0.f;
          }
          s[nt][e] = p;
        }
      }
      // dV += P^T dO
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        uint32_t pa[4];
        pack_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t ob[4];
          load_b_kn<LDS>(ob, os, kk * 16, dp * 16, lane);
          mma_pair<T>(dv[2 * dp], dv[2 * dp + 1], pa, ob);
        }
      }
      // dP^T = V_w dO^T
      float dpt[NQT][4];
#pragma unroll
      for (int i = 0; i < NQT; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t va[4];
        load_a<LDS>(va, sV, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BQ / 16; ++np) {
          uint32_t ob[4];
          load_b_nk<LDS>(ob, os, np * 16, kk * 16, lane);
          mma_pair<T>(dpt[2 * np], dpt[2 * np + 1], va, ob);
        }
      }
      // dS^T = P^T o (dP^T - Delta_i)  (P^T = 0 where masked, Delta = 0 past Lq)
#pragma unroll
      for (int nt = 0; nt < NQT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nt][e] = s[nt][e] * (dpt[nt][e] - ds_[nt * 8 + 2 * tq + (e & 1)]);
      }
      // dK += dS^T Q
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        uint32_t da[4];
        pack_a<T>(da, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t qb4[4];
          load_b_kn<LDS>(qb4, qs, kk * 16, dp * 16, lane);
          mma_pair<T>(dk[2 * dp], dk[2 * dp + 1], da, qb4);
        }
      }
    }
    __syncthreads();  // buffer buf is refilled by iteration it + 1's issue
  }
  cp_async_wait<0>();  // total = 0: the K/V group is still pending

  const float sc = float(a.scale);
  uint16_t* dkg = static_cast<uint16_t*>(a.dk);
  uint16_t* dvg = static_cast<uint16_t*>(a.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = kw0 + g + 8 * r;
    if (key < Lk) {
      const int64_t off = (int64_t(bhk) * Lk + key) * D + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < NDT; ++dt) {
        *reinterpret_cast<uint32_t*>(dkg + off + dt * 8) = pack2(dk[dt][2 * r] * sc, dk[dt][2 * r + 1] * sc, T{});
        *reinterpret_cast<uint32_t*>(dvg + off + dt * 8) = pack2(dv[dt][2 * r], dv[dt][2 * r + 1], T{});
      }
    }
  }
}

// dQ configuration: 4 warps x 16 query rows; key tiles of BN (64 at D <= 64, 32 at D = 96, 128 for the
// registers, as in DkdvCfg). Q and dO stay in shared memory (ldmatrix per use) rather than registers.
template <int D> struct DqCfg {
  static constexpr int kBN = D <= 64 ? 64 : 32;
  static constexpr int kBM = 64;
  static constexpr size_t smem() { return size_t(2 * kBM + 4 * kBN) * attn_mma::Tile<D>::kLds * 2; }
};

// attn_bwd_dq_mma: dq_i = scale sum_j dS_ij k_j with P recomputed from lse (the Triton tutorial's
// separate dQ pass: two more GEMMs than FA2, no atomics, deterministic).
// Grid: B Hq ceil(Lq / 64) CTAs of 4 warps; per warp 16 rows, dQ (16 x D fp32) in registers; K/V tiles
// double-buffered (cp.async). Per tile: S = Q_w K^T, P = exp2(S scale log2e - lse log2e),
// dP = dO_w V^T, dS = P o (dP - Delta), dQ += dS K (K through ldmatrix.trans).
// FLOPs: 8 n D. Bytes: read Q, dO once (2 B Hq Lq D s), K and V once per query block (mostly L2), write dQ.
template <typename T, int D, int BN>
__global__ void __launch_bounds__(128, 2) attn_bwd_dq_mma(AttnArgs a) {
  using namespace attn_mma;
  constexpr int BM = 64, NT = 128, LDS = Tile<D>::kLds, KD = D / 16, NDT = D / 8, NST = BN / 8;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(fd_attn_smem);  // [BM][LDS]
  uint16_t* sO = sQ + BM * LDS;                               // [BM][LDS] (dO)
  uint16_t* sK = sO + BM * LDS;                               // [2][BN][LDS]
  uint16_t* sV = sK + 2 * BN * LDS;                           // [2][BN][LDS]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.Hq, h = bh - b * a.Hq, hk = h / a.G;
  const int m0 = qb * BM;
  const int Lq = a.Lq, Lk = a.Lk;
  const bool causal = a.causal;

  const uint16_t* qg = static_cast<const uint16_t*>(a.q) + b * a.q_sb + h * a.q_sh + int64_t(m0) * a.q_sl;
  const uint16_t* og = static_cast<const uint16_t*>(a.dout) + (int64_t(bh) * Lq + m0) * D;
  const uint16_t* kg = static_cast<const uint16_t*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const uint16_t* vg = static_cast<const uint16_t*>(a.v) + b * a.v_sb + hk * a.v_sh;

  int n_kb = (Lk + BN - 1) / BN;
  if (causal) n_kb = min(n_kb, (min(m0 + BM, Lq) - 1) / BN + 1);

  load_tile<D, BM, NT>(sQ, qg, a.q_sl, Lq - m0, a.vec_q, tid);
  load_tile<D, BM, NT>(sO, og, D, Lq - m0, a.vec_o, tid);
  if (n_kb > 0) {
    load_tile<D, BN, NT>(sK, kg, a.k_sl, Lk, a.vec_k, tid);
    load_tile<D, BN, NT>(sV, vg, a.v_sl, Lk, a.vec_v, tid);
  }
  cp_async_commit();

  const int row0 = m0 + warp * 16;
  float l2[2], dl[2];  // lse log2e and Delta of rows g, g + 8 (0 past Lq: those rows are not stored)
  {
    const float* lse = static_cast<const float*>(a.lse_in) + int64_t(bh) * Lq + row0 + g;
    const float* delta = static_cast<const float*>(a.delta) + int64_t(bh) * Lq + row0 + g;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = row0 + g + 8 * r < Lq;
      l2[r] = ok ? lse[8 * r] * kLog2e : 0.f;
      dl[r] = ok ? delta[8 * r] : 0.f;
    }
  }
  float dq[NDT][4];
#pragma unroll
  for (int i = 0; i < NDT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  const float sl2 = float(a.scale * kLog2eD);

  for (int j = 0; j < n_kb; ++j) {
    const int buf = j & 1, n0 = j * BN;
    if (j + 1 < n_kb) {
      const int n1 = n0 + BN;
      load_tile<D, BN, NT>(sK + (buf ^ 1) * BN * LDS, kg + int64_t(n1) * a.k_sl, a.k_sl, Lk - n1, a.vec_k, tid);
      load_tile<D, BN, NT>(sV + (buf ^ 1) * BN * LDS, vg + int64_t(n1) * a.v_sl, a.v_sl, Lk - n1, a.vec_v, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* ks = sK + buf * BN * LDS;
    const uint16_t* vs = sV + buf * BN * LDS;

    if (!(causal && n0 > row0 + 15)) {
      float s[NST][4], dp[NST][4];
#pragma unroll
      for (int i = 0; i < NST; ++i) {
        s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t qa[4];
        load_a<LDS>(qa, sQ, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t kb[4];
          load_b_nk<LDS>(kb, ks, np * 16, kk * 16, lane);
          mma_pair<T>(s[2 * np], s[2 * np + 1], qa, kb);
        }
      }
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t oa[4];
        load_a<LDS>(oa, sO, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t vb[4];
          load_b_nk<LDS>(vb, vs, np * 16, kk * 16, lane);
          mma_pair<T>(dp[2 * np], dp[2 * np + 1], oa, vb);
        }
      }
      const bool mask = n0 + BN > Lk || (causal && n0 + BN - 1 > row0);
#pragma unroll
      for (int nt = 0; nt < NST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float p = exp2f(s[nt][e] * sl2 - l2[r]);
          if (mask) {
            const int col = n0 + nt * 8 + 2 * tq + (e & 1), row = row0 + g + 8 * r;
            if (col >= Lk || (causal && col > row)) p = 0.f;
          }
          dp[nt][e] = p * (dp[nt][e] - dl[r]);  // dS
        }
      }
      // dQ += dS K (unscaled; scale applied once at the store)
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t da[4];
        pack_a<T>(da, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
        for (int dt2 = 0; dt2 < D / 16; ++dt2) {
          uint32_t kb[4];
          load_b_kn<LDS>(kb, ks, kk * 16, dt2 * 16, lane);
          mma_pair<T>(dq[2 * dt2], dq[2 * dt2 + 1], da, kb);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // n_kb = 0: the Q/dO group is still pending

  const float sc = float(a.scale);
  uint16_t* dqg = static_cast<uint16_t*>(a.dq) + (int64_t(bh) * Lq + m0) * D;  // the block's first row
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = warp * 16 + g + 8 * r;  // row within the block
    if (m0 + rr < Lq) {
      uint16_t* drow = dqg + rr * D + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < NDT; ++dt)
        *reinterpret_cast<uint32_t*>(drow + dt * 8) = pack2(dq[dt][2 * r] * sc, dq[dt][2 * r + 1] * sc, T{});
    }
  }
}

// =====================================================================================================
// Generic kernels (any dtype, any head dim <= 256): plain FMA in the compute type
// =====================================================================================================
// A CTA of kGW warps owns kGW consecutive rows (queries, or keys for the dK/dV-type kernels), one warp
// per row, the row's own vectors in shared memory (read as broadcasts). The other side streams through
// a shared tile of kGT = 32 rows: lane t computes the dot product of its tile row with the warp's row
// (a logit), and for the accumulators (out, dq, dk, dv) lane t owns head-dim elements t, t + 32, ...
// (kGR = 8 slots: D <= 256) and walks the tile's rows in order, the tile's weights broadcast by
// shuffle. Tiles are stored in the compute type with an odd row stride (D | 1) so that the 32 lanes'
// row reads fall in distinct banks. Shared memory: (rows kept + 32) (D | 1) c bytes, over 48 KiB only
// for float64 with D > ~150 (the launcher raises the limit; <= 99 KiB for D <= 256).

constexpr int kGW = 8, kGT = 32, kGR = 8, kGThreads = kGW * 32;
constexpr int kMaxGenericD = kGR * 32;

__host__ __device__ constexpr int odd_ld(int D) { return D | 1; }

// rows x D elements of src (row r at src + r * sl) into dst (row stride ld) in the compute type; rows
// >= nvalid are zero. Every thread of the block calls it; the caller synchronizes.
template <typename T, typename C>
__device__ __forceinline__ void g_load_rows(C* dst, int ld, const T* src, int64_t sl, int rows, int nvalid, int D) {
  const int n = rows * D;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const int r = idx / D, d = idx - r * D;
    dst[r * ld + d] = r < nvalid ? C(to_c(src[r * sl + d])) : C(0);
  }
}

template <typename C>
__device__ __forceinline__ C g_dot(const C* x, const C* y, int D) {
  C s = C(0);
  for (int d = 0; d < D; ++d) s += x[d] * y[d];
  return s;
}

// acc[r] += sum_{jj < kGT} w_{lane jj} tile[jj][lane + 32 r], in jj order (w broadcast from lane jj).
template <typename C>
__device__ __forceinline__ void g_accumulate(C (&acc)[kGR], C w, const C* tile, int ld, int D, int lane) {
  for (int jj = 0; jj < kGT; ++jj) {
    const C wj = __shfl_sync(kFull, w, jj);
    const C* row = tile + jj * ld;
#pragma unroll
    for (int r = 0; r < kGR; ++r) {
      const int d = lane + 32 * r;
      if (d < D) acc[r] += wj * row[d];
    }
  }
}

template <typename T, typename C>
__device__ __forceinline__ void g_store_row(T* dst, const C (&acc)[kGR], C factor, int D, int lane) {
#pragma unroll
  for (int r = 0; r < kGR; ++r) {
    const int d = lane + 32 * r;
    if (d < D) dst[d] = FromC<T>::cvt(acc[r] * factor);
  }
}

// attn_fwd_generic: out and lse, one warp per query row, online softmax per 32-key tile (natural exp
// in the compute type). Grid: B Hq ceil(Lq / 8). FLOPs 4 n D (FMA pipe), n exp. Bytes: Q, O once;
// K, V once per 8 query rows (L1/L2).
template <typename T>
__global__ void __launch_bounds__(kGThreads, 1) attn_fwd_generic(AttnArgs a) {
  using C = typename Compute<T>::type;
  const int D = a.D, ld = odd_ld(D);
  C* sq = reinterpret_cast<C*>(fd_attn_smem);  // [kGW][ld]
  C* st = sq + kGW * ld;                        // [kGT][ld]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.Hq, h = bh - b * a.Hq, hk = h / a.G;
  const int i0 = qb * kGW, i = i0 + warp, Lq = a.Lq, Lk = a.Lk;
  const T* qg = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + int64_t(i0) * a.q_sl;
  const T* kg = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* vg = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  g_load_rows(sq, ld, qg, a.q_sl, kGW, Lq - i0, D);

  int n_keys = Lk;
  if (a.causal) n_keys = min(n_keys, min(i0 + kGW, Lq));  // keys <= the block's last row
  const C scale = C(a.scale);
  C m = neg_inf<C>(), l = C(0), o[kGR];
#pragma unroll
  for (int r = 0; r < kGR; ++r) o[r] = C(0);
  const C* qrow = sq + warp * ld;
  const C* trow = st + lane * ld;

  for (int t0 = 0; t0 < n_keys; t0 += kGT) {
    __syncthreads();
    g_load_rows(st, ld, kg + int64_t(t0) * a.k_sl, a.k_sl, kGT, Lk - t0, D);
    __syncthreads();
    const int j = t0 + lane;
    const bool valid = j < Lk && (!a.causal || j <= i);
    const C s = valid ? g_dot(qrow, trow, D) * scale : neg_inf<C>();
    const C mn = fmax(m, warp_allmax(s));
    const C mu = mn == neg_inf<C>() ? C(0) : mn;
    const C alpha = exp(m - mu);
    const C p = valid ? exp(s - mu) : C(0);
    l = l * alpha + warp_allsum(p);
    m = mn;
    __syncthreads();
    g_load_rows(st, ld, vg + int64_t(t0) * a.v_sl, a.v_sl, kGT, Lk - t0, D);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kGR; ++r) o[r] *= alpha;
    g_accumulate(o, p, st, ld, D, lane);
  }
  if (i < Lq) {
    const int64_t row = int64_t(bh) * Lq + i;
    g_store_row(static_cast<T*>(a.o) + row * D, o, l > C(0) ? C(1) / l : C(0), D, lane);
    if (lane == 0) static_cast<C*>(a.lse)[row] = l > C(0) ? m + log(l) : neg_inf<C>();
  }
}

// attn_bwd_dkdv_generic: dk, dv, one warp per key row over the group's query heads and 32-query tiles:
// per tile P (Q tile), dP and dV (dO tile), dK (Q tile again). Grid: B Hk ceil(Lk / 8).
// FLOPs 8 n D (FMA pipe), n exp. Bytes: K, V once; Q, dO once per 8 keys (Q twice), lse, Delta as often.
template <typename T>
__global__ void __launch_bounds__(kGThreads, 1) attn_bwd_dkdv_generic(AttnArgs a) {
  using C = typename Compute<T>::type;
  const int D = a.D, ld = odd_ld(D);
  C* sk = reinterpret_cast<C*>(fd_attn_smem);  // [kGW][ld]
  C* sv = sk + kGW * ld;                        // [kGW][ld]
  C* st = sv + kGW * ld;                        // [kGT][ld]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nkb = a.nblk;
  const int bhk = int(blockIdx.x / unsigned(nkb));
  const int kb = int(blockIdx.x - unsigned(bhk) * unsigned(nkb));
  const int b = bhk / a.Hk, hk = bhk - b * a.Hk;
  const int j0 = kb * kGW, j = j0 + warp, Lq = a.Lq, Lk = a.Lk;
  g_load_rows(sk, ld, static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh + int64_t(j0) * a.k_sl, a.k_sl, kGW,
              Lk - j0, D);
  g_load_rows(sv, ld, static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh + int64_t(j0) * a.v_sl, a.v_sl, kGW,
              Lk - j0, D);
  const C* lse = static_cast<const C*>(a.lse_in);
  const C* delta = static_cast<const C*>(a.delta);
  const C scale = C(a.scale);
  C dk[kGR], dv[kGR];
#pragma unroll
  for (int r = 0; r < kGR; ++r) dk[r] = dv[r] = C(0);
  const C* krow = sk + warp * ld;
  const C* vrow = sv + warp * ld;
  const C* trow = st + lane * ld;
  const int q_start = a.causal ? (j0 / kGT) * kGT : 0;  // queries i >= j0 only

  for (int hh = 0; hh < a.G; ++hh) {
    const int h = hk * a.G + hh;
    const int64_t bh = int64_t(b) * a.Hq + h;
    const T* qg = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
    const T* og = static_cast<const T*>(a.dout) + bh * Lq * D;
    for (int t0 = q_start; t0 < Lq; t0 += kGT) {
      const int i = t0 + lane;
      const bool valid = i < Lq && j < Lk && (!a.causal || j <= i);
      const C li = valid ? lse[bh * Lq + i] : C(0);
      const C di = valid ? delta[bh * Lq + i] : C(0);
      __syncthreads();
      g_load_rows(st, ld, qg + int64_t(t0) * a.q_sl, a.q_sl, kGT, Lq - t0, D);
      __syncthreads();
      const C p = valid ? exp(g_dot(krow, trow, D) * scale - li) : C(0);
      __syncthreads();
      g_load_rows(st, ld, og + int64_t(t0) * D, int64_t(D), kGT, Lq - t0, D);
      __syncthreads();
      const C ds = valid ? p * (g_dot(vrow, trow, D) - di) : C(0);
      g_accumulate(dv, p, st, ld, D, lane);
      __syncthreads();
      g_load_rows(st, ld, qg + int64_t(t0) * a.q_sl, a.q_sl, kGT, Lq - t0, D);
      __syncthreads();
      g_accumulate(dk, ds, st, ld, D, lane);
    }
  }
  if (j < Lk) {
    const int64_t row = int64_t(bhk) * Lk + j;
    g_store_row(static_cast<T*>(a.dk) + row * D, dk, scale, D, lane);
    g_store_row(static_cast<T*>(a.dv) + row * D, dv, C(1), D, lane);
  }
}

// attn_bwd_dq_generic: dq, one warp per query row over 32-key tiles: dP (V tile), then P, dS and
// dQ += dS K (K tile). Grid: B Hq ceil(Lq / 8). FLOPs 6 n D, n exp. Bytes: Q, dO once, K, V per 8 rows.
template <typename T>
__global__ void __launch_bounds__(kGThreads, 1) attn_bwd_dq_generic(AttnArgs a) {
  using C = typename Compute<T>::type;
  const int D = a.D, ld = odd_ld(D);
  C* sq = reinterpret_cast<C*>(fd_attn_smem);  // [kGW][ld]
  C* so = sq + kGW * ld;                        // [kGW][ld] (dO)
  C* st = so + kGW * ld;                        // [kGT][ld]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.Hq, h = bh - b * a.Hq, hk = h / a.G;
  const int i0 = qb * kGW, i = i0 + warp, Lq = a.Lq, Lk = a.Lk;
  g_load_rows(sq, ld, static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + int64_t(i0) * a.q_sl, a.q_sl, kGW,
              Lq - i0, D);
  g_load_rows(so, ld, static_cast<const T*>(a.dout) + (int64_t(bh) * Lq + i0) * D, int64_t(D), kGW, Lq - i0, D);
  const T* kg = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* vg = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  const C li = i < Lq ? static_cast<const C*>(a.lse_in)[int64_t(bh) * Lq + i] : C(0);
  const C di = i < Lq ? static_cast<const C*>(a.delta)[int64_t(bh) * Lq + i] : C(0);
  const C scale = C(a.scale);
  int n_keys = Lk;
  if (a.causal) n_keys = min(n_keys, min(i0 + kGW, Lq));
  C dq[kGR];
#pragma unroll
  for (int r = 0; r < kGR; ++r) dq[r] = C(0);
  const C* qrow = sq + warp * ld;
  const C* orow = so + warp * ld;
  const C* trow = st + lane * ld;

  for (int t0 = 0; t0 < n_keys; t0 += kGT) {
    const int j = t0 + lane;
    const bool valid = i < Lq && j < Lk && (!a.causal || j <= i);
    __syncthreads();
    g_load_rows(st, ld, vg + int64_t(t0) * a.v_sl, a.v_sl, kGT, Lk - t0, D);
    __syncthreads();
    const C dp = valid ? g_dot(orow, trow, D) : C(0);
    __syncthreads();
    g_load_rows(st, ld, kg + int64_t(t0) * a.k_sl, a.k_sl, kGT, Lk - t0, D);
    __syncthreads();
    const C p = valid ? exp(g_dot(qrow, trow, D) * scale - li) : C(0);
    const C ds = valid ? p * (dp - di) : C(0);
    g_accumulate(dq, ds, st, ld, D, lane);
  }
  if (i < Lq) g_store_row(static_cast<T*>(a.dq) + (int64_t(bh) * Lq + i) * D, dq, scale, D, lane);
}

// ---- attention-map KL (generic) --------------------------------------------------------------------

struct KdAttnArgs {
  // data
  const void* qs;
  const void* ks;
  const void* qt;
  const void* kt;
  const void* lse_s_in;  // backward: [B, H, Lq] of C
  const void* lse_t_in;
  const void* g;         // backward: [B, H, Lq] of C
  void* kl;              // forward: [B, H, Lq] of C
  void* lse_s;
  void* lse_t;
  void* dqs;             // [B, H, Lq, Ds]
  void* dks;             // [B, Hks, Lk, Ds]
  // strides, in elements
  int64_t qs_sb, qs_sh, qs_sl, ks_sb, ks_sh, ks_sl, qt_sb, qt_sh, qt_sl, kt_sb, kt_sh, kt_sl;
  // shapes
  int B, H, Hks, Hkt, Gs, Gt, Lq, Lk, Ds, Dt;
  int nblk;
  double scale_s, scale_t;
  bool causal;
  bool vec_qs, vec_ks, vec_qt, vec_kt;  // 16-byte cp.async allowed (MMA kernels)
};

// attn_kd_fwd_generic: KL_i, lse^s_i, lse^t_i, one pass (Sec. 3.2's online form): per 32-key tile the
// teacher logits (kt tile) and the student logits (ks tile), running (m_t, l_t), (m_s, l_s) and
// u = sum_j e^{t_j - m_t} (t_j - s_j), rescaled with l_t when m_t rises; KL = u / l_t - lse_t + lse_s.
// A row without a visible key (Lk = 0) gets KL = 0 and lse = -inf. Grid: B H ceil(Lq / 8).
// FLOPs 2 n (Ds + Dt), 2 n exp. Bytes: qs, qt once; ks, kt once per 8 query rows; write 3 B H Lq c.
template <typename T>
__global__ void __launch_bounds__(kGThreads, 1) attn_kd_fwd_generic(KdAttnArgs a) {
  using C = typename Compute<T>::type;
  const int Ds = a.Ds, Dt = a.Dt, lds = odd_ld(Ds), ldt = odd_ld(Dt), ldm = max(lds, ldt);
  C* sqs = reinterpret_cast<C*>(fd_attn_smem);  // [kGW][lds]
  C* sqt = sqs + kGW * lds;                      // [kGW][ldt]
  C* st = sqt + kGW * ldt;                       // [kGT][ldm]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.H, h = bh - b * a.H, hks = h / a.Gs, hkt = h / a.Gt;
  const int i0 = qb * kGW, i = i0 + warp, Lq = a.Lq, Lk = a.Lk;
  g_load_rows(sqs, lds, static_cast<const T*>(a.qs) + b * a.qs_sb + h * a.qs_sh + int64_t(i0) * a.qs_sl, a.qs_sl,
              kGW, Lq - i0, Ds);
  g_load_rows(sqt, ldt, static_cast<const T*>(a.qt) + b * a.qt_sb + h * a.qt_sh + int64_t(i0) * a.qt_sl, a.qt_sl,
              kGW, Lq - i0, Dt);
  const T* ksg = static_cast<const T*>(a.ks) + b * a.ks_sb + hks * a.ks_sh;
  const T* ktg = static_cast<const T*>(a.kt) + b * a.kt_sb + hkt * a.kt_sh;
  const C ss = C(a.scale_s), stc = C(a.scale_t);
  int n_keys = Lk;
  if (a.causal) n_keys = min(n_keys, min(i0 + kGW, Lq));
  C mt = neg_inf<C>(), lt = C(0), u = C(0), ms = neg_inf<C>(), ls = C(0);
  const C* qsrow = sqs + warp * lds;
  const C* qtrow = sqt + warp * ldt;
  const C* trow = st + lane * ldm;

  for (int t0 = 0; t0 < n_keys; t0 += kGT) {
    const int j = t0 + lane;
    const bool valid = j < Lk && (!a.causal || j <= i);
    __syncthreads();
    g_load_rows(st, ldm, ktg + int64_t(t0) * a.kt_sl, a.kt_sl, kGT, Lk - t0, Dt);
    __syncthreads();
    const C tv = valid ? g_dot(qtrow, trow, Dt) * stc : neg_inf<C>();
    __syncthreads();
    g_load_rows(st, ldm, ksg + int64_t(t0) * a.ks_sl, a.ks_sl, kGT, Lk - t0, Ds);
    __syncthreads();
    const C sv = valid ? g_dot(qsrow, trow, Ds) * ss : neg_inf<C>();
    // teacher: (m_t, l_t) and u share e^{t - m_t}
    const C mtn = fmax(mt, warp_allmax(tv));
    const C mtu = mtn == neg_inf<C>() ? C(0) : mtn;
    const C at = exp(mt - mtu);
    const C e = valid ? exp(tv - mtu) : C(0);
    lt = lt * at + warp_allsum(e);
    u = u * at + warp_allsum(valid ? e * (tv - sv) : C(0));  // masked: 0, not 0 (-inf + inf)
    mt = mtn;
    // student
    const C msn = fmax(ms, warp_allmax(sv));
    const C msu = msn == neg_inf<C>() ? C(0) : msn;
    const C es = valid ? exp(sv - msu) : C(0);
    ls = ls * exp(ms - msu) + warp_allsum(es);
    ms = msn;
  }
  if (i < Lq && lane == 0) {
    const int64_t row = int64_t(bh) * Lq + i;
    // in double, as the CPU: the KL is a difference of O(log Lk) terms (float cancels to ~1e-6)
    const double lse_t = lt > C(0) ? double(mt) + log(double(lt)) : -INFINITY;
    const double lse_s = ls > C(0) ? double(ms) + log(double(ls)) : -INFINITY;
    static_cast<C*>(a.lse_t)[row] = C(lse_t);
    static_cast<C*>(a.lse_s)[row] = C(lse_s);
    static_cast<C*>(a.kl)[row] = lt > C(0) ? C(double(u) / double(lt) - lse_t + lse_s) : C(0);
  }
}

// attn_kd_bwd_dq_generic: dqs_i = scale_s sum_j g_i (P^s_ij - P^t_ij) ks_j, one warp per query row:
// per 32-key tile P^t (kt tile), then P^s and dqs (ks tile). Grid: B H ceil(Lq / 8).
// FLOPs 2 n (Dt + 2 Ds), 2 n exp. Bytes: qs, qt once, ks, kt once per 8 rows; write dqs.
template <typename T>
__global__ void __launch_bounds__(kGThreads, 1) attn_kd_bwd_dq_generic(KdAttnArgs a) {
  using C = typename Compute<T>::type;
  const int Ds = a.Ds, Dt = a.Dt, lds = odd_ld(Ds), ldt = odd_ld(Dt), ldm = max(lds, ldt);
  C* sqs = reinterpret_cast<C*>(fd_attn_smem);
  C* sqt = sqs + kGW * lds;
  C* st = sqt + kGW * ldt;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.H, h = bh - b * a.H, hks = h / a.Gs, hkt = h / a.Gt;
  const int i0 = qb * kGW, i = i0 + warp, Lq = a.Lq, Lk = a.Lk;
  g_load_rows(sqs, lds, static_cast<const T*>(a.qs) + b * a.qs_sb + h * a.qs_sh + int64_t(i0) * a.qs_sl, a.qs_sl,
              kGW, Lq - i0, Ds);
  g_load_rows(sqt, ldt, static_cast<const T*>(a.qt) + b * a.qt_sb + h * a.qt_sh + int64_t(i0) * a.qt_sl, a.qt_sl,
              kGW, Lq - i0, Dt);
  const T* ksg = static_cast<const T*>(a.ks) + b * a.ks_sb + hks * a.ks_sh;
  const T* ktg = static_cast<const T*>(a.kt) + b * a.kt_sb + hkt * a.kt_sh;
  const int64_t row = int64_t(bh) * Lq + i;
  const C lsi = i < Lq ? static_cast<const C*>(a.lse_s_in)[row] : C(0);
  const C lti = i < Lq ? static_cast<const C*>(a.lse_t_in)[row] : C(0);
  const C gi = i < Lq ? static_cast<const C*>(a.g)[row] : C(0);
  const C ss = C(a.scale_s), stc = C(a.scale_t);
  int n_keys = Lk;
  if (a.causal) n_keys = min(n_keys, min(i0 + kGW, Lq));
  C dq[kGR];
#pragma unroll
  for (int r = 0; r < kGR; ++r) dq[r] = C(0);
  const C* qsrow = sqs + warp * lds;
  const C* qtrow = sqt + warp * ldt;
  const C* trow = st + lane * ldm;

  for (int t0 = 0; t0 < n_keys; t0 += kGT) {
    const int j = t0 + lane;
    const bool valid = i < Lq && j < Lk && (!a.causal || j <= i);
    __syncthreads();
    g_load_rows(st, ldm, ktg + int64_t(t0) * a.kt_sl, a.kt_sl, kGT, Lk - t0, Dt);
    __syncthreads();
    const C pt = valid ? exp(g_dot(qtrow, trow, Dt) * stc - lti) : C(0);
    __syncthreads();
    g_load_rows(st, ldm, ksg + int64_t(t0) * a.ks_sl, a.ks_sl, kGT, Lk - t0, Ds);
    __syncthreads();
    const C ps = valid ? exp(g_dot(qsrow, trow, Ds) * ss - lsi) : C(0);
    const C ds = valid ? gi * (ps - pt) : C(0);
    g_accumulate(dq, ds, st, ldm, Ds, lane);
  }
  if (i < Lq) g_store_row(static_cast<T*>(a.dqs) + row * Ds, dq, ss, Ds, lane);
}

// attn_kd_bwd_dk_generic: dks_j = scale_s sum_{h in group, i} g_i (P^s_ij - P^t_ij) qs_i, one warp per
// student key row over the student group's query heads (each with its own teacher kv head) and
// 32-query tiles: P^t (qt tile), then P^s and dks (qs tile). Grid: B Hks ceil(Lk / 8).
// FLOPs 2 n (Dt + 2 Ds), 2 n exp. Bytes: ks, kt once; qs, qt once per 8 keys; write dks.
template <typename T>
__global__ void __launch_bounds__(kGThreads, 1) attn_kd_bwd_dk_generic(KdAttnArgs a) {
  using C = typename Compute<T>::type;
  const int Ds = a.Ds, Dt = a.Dt, lds = odd_ld(Ds), ldt = odd_ld(Dt), ldm = max(lds, ldt);
  C* sks = reinterpret_cast<C*>(fd_attn_smem);  // [kGW][lds]
  C* skt = sks + kGW * lds;                      // [kGW][ldt]: the current teacher kv head's rows
  C* st = skt + kGW * ldt;                       // [kGT][ldm]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nkb = a.nblk;
  const int bhk = int(blockIdx.x / unsigned(nkb));
  const int kb = int(blockIdx.x - unsigned(bhk) * unsigned(nkb));
  const int b = bhk / a.Hks, hks = bhk - b * a.Hks;
  const int j0 = kb * kGW, j = j0 + warp, Lq = a.Lq, Lk = a.Lk;
  g_load_rows(sks, lds, static_cast<const T*>(a.ks) + b * a.ks_sb + hks * a.ks_sh + int64_t(j0) * a.ks_sl, a.ks_sl,
              kGW, Lk - j0, Ds);
  const C* lse_s = static_cast<const C*>(a.lse_s_in);
  const C* lse_t = static_cast<const C*>(a.lse_t_in);
  const C* gv = static_cast<const C*>(a.g);
  const C ss = C(a.scale_s), stc = C(a.scale_t);
  C dk[kGR];
#pragma unroll
  for (int r = 0; r < kGR; ++r) dk[r] = C(0);
  const C* ksrow = sks + warp * lds;
  const C* ktrow = skt + warp * ldt;
  const C* trow = st + lane * ldm;
  const int q_start = a.causal ? (j0 / kGT) * kGT : 0;
  int cur_hkt = -1;

  for (int hh = 0; hh < a.Gs; ++hh) {
    const int h = hks * a.Gs + hh, hkt = h / a.Gt;
    const int64_t bh = int64_t(b) * a.H + h;
    if (hkt != cur_hkt) {  // uniform over the block
      __syncthreads();     // the previous teacher rows are no longer read
      g_load_rows(skt, ldt, static_cast<const T*>(a.kt) + b * a.kt_sb + hkt * a.kt_sh + int64_t(j0) * a.kt_sl,
                  a.kt_sl, kGW, Lk - j0, Dt);
      cur_hkt = hkt;  // visible after the next __syncthreads (the first of the tile loop)
    }
    const T* qsg = static_cast<const T*>(a.qs) + b * a.qs_sb + h * a.qs_sh;
    const T* qtg = static_cast<const T*>(a.qt) + b * a.qt_sb + h * a.qt_sh;
    for (int t0 = q_start; t0 < Lq; t0 += kGT) {
      const int i = t0 + lane;
      const bool valid = i < Lq && j < Lk && (!a.causal || j <= i);
      const C lsi = valid ? lse_s[bh * Lq + i] : C(0);
      const C lti = valid ? lse_t[bh * Lq + i] : C(0);
      const C gi = valid ? gv[bh * Lq + i] : C(0);
      __syncthreads();
      g_load_rows(st, ldm, qtg + int64_t(t0) * a.qt_sl, a.qt_sl, kGT, Lq - t0, Dt);
      __syncthreads();
      const C pt = valid ? exp(g_dot(ktrow, trow, Dt) * stc - lti) : C(0);
      __syncthreads();
      g_load_rows(st, ldm, qsg + int64_t(t0) * a.qs_sl, a.qs_sl, kGT, Lq - t0, Ds);
      __syncthreads();
      const C ps = valid ? exp(g_dot(ksrow, trow, Ds) * ss - lsi) : C(0);
      const C ds = valid ? gi * (ps - pt) : C(0);
      g_accumulate(dk, ds, st, ldm, Ds, lane);
    }
  }
  if (j < Lk) g_store_row(static_cast<T*>(a.dks) + (int64_t(bhk) * Lk + j) * Ds, dk, ss, Ds, lane);
}

// ---- attention-map KL, float16 / bfloat16 with Ds, Dt in {32, 64, 96, 128}: tensor cores -------------
// The same loop structure as the attention kernels above (attn_fwd_mma, attn_bwd_dq_mma,
// attn_bwd_dkdv_mma), with two logit GEMMs per tile (teacher width Dt, student width Ds) and no PV.
// Templates on both tile widths DS, DT in {32, 64, 128}: 9 pairs per dtype and kernel (16 with 96 took
// this file from 17 s to 80 s of nvcc per architecture). A head dim of 96 runs in the 128-wide
// instance: load_tile zero-fills columns a.Ds / a.Dt .. 127, which leaves every dot product unchanged,
// and only the a.Ds real columns of dqs / dks are stored (25% wasted MMA on that side).

// Tile sizes (DS, DT: the tile widths): BM = 64 query rows (4 warps x 16) per CTA; key tiles (fwd, dq)
// and query tiles (dk) of 64 rows while DS + DT <= 160, else 32, which keeps every kernel under 99 KiB of shared memory (the
// sm_86/89 per-block limit) and its accumulators in registers. Tuning only.
template <int DS, int DT> struct KdCfg {
  static constexpr int kBM = 64;
  static constexpr int kBN = DS + DT <= 160 ? 64 : 32;
  static constexpr int kBQ = kBN;
  static constexpr int kLS = attn_mma::Tile<DS>::kLds, kLT = attn_mma::Tile<DT>::kLds;
  static constexpr size_t smem_rows() {  // fwd and dq: Qs, Qt [BM] + double-buffered Ks, Kt [BN]
    return (size_t(kBM) * (kLS + kLT) + size_t(2 * kBN) * (kLS + kLT)) * 2;
  }
  static constexpr size_t smem_dk() {  // Ks [64] + double-buffered Kt [64], Qt, Qs [BQ] + 3 [BQ] floats
    return size_t(kBN_dk) * kLS * 2 + size_t(2) * (size_t(kBN_dk) * kLT + size_t(kBQ) * (kLT + kLS)) * 2 +
           size_t(6 * kBQ) * sizeof(float);
  }
  static constexpr int kBN_dk = 64;  // keys per dK CTA (4 warps x 16)
};

// attn_kd_fwd_mma: KL_i, lse^s_i, lse^t_i, the one-pass online form of attn_kd_fwd_generic in base 2
// (t2 = t log2 e, s2 = s log2 e): per row (m_t, l_t), (m_s, l_s) and u = sum_j 2^{t2 - m_t}
// (t2 - s2), all rescaled by 2^{m_old - m_new}; KL = ln2 u / l_t - lse_t + lse_s,
// lse = ln2 m + ln l. Grid: B H ceil(Lq / 64) CTAs of 4 warps; Qs, Qt fragments in registers; Ks, Kt
// tiles double-buffered (cp.async); S_t = Qt Kt^T and S_s = Qs Ks^T per warp (16 x BN fp32 each).
// FLOPs: 2 n (Ds + Dt) tensor-core, 2 n exp2. Bytes (s = 2): read qs, qt once (B H Lq (Ds + Dt) s), ks,
// kt once per query block (mostly L2; floor B (Hks Ds + Hkt Dt) Lk s), write 3 B H Lq 4.
template <typename T, int DS, int DT>
__global__ void __launch_bounds__(128, 2) attn_kd_fwd_mma(KdAttnArgs a) {
  using namespace attn_mma;
  using Cfg = KdCfg<DS, DT>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = 128, LS = Cfg::kLS, LT = Cfg::kLT;
  constexpr int KS = DS / 16, KT = DT / 16, NST = BN / 8;
  uint16_t* sQs = reinterpret_cast<uint16_t*>(fd_attn_smem);  // [BM][LS]
  uint16_t* sQt = sQs + BM * LS;                               // [BM][LT]
  uint16_t* sKs = sQt + BM * LT;                               // [2][BN][LS]
  uint16_t* sKt = sKs + 2 * BN * LS;                           // [2][BN][LT]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.H, h = bh - b * a.H, hks = h / a.Gs, hkt = h / a.Gt;
  const int m0 = qb * BM;
  const int Lq = a.Lq, Lk = a.Lk;
  const bool causal = a.causal;

  const uint16_t* qsg = static_cast<const uint16_t*>(a.qs) + b * a.qs_sb + h * a.qs_sh + int64_t(m0) * a.qs_sl;
  const uint16_t* qtg = static_cast<const uint16_t*>(a.qt) + b * a.qt_sb + h * a.qt_sh + int64_t(m0) * a.qt_sl;
  const uint16_t* ksg = static_cast<const uint16_t*>(a.ks) + b * a.ks_sb + hks * a.ks_sh;
  const uint16_t* ktg = static_cast<const uint16_t*>(a.kt) + b * a.kt_sb + hkt * a.kt_sh;

  int n_kb = (Lk + BN - 1) / BN;
  if (causal) n_kb = min(n_kb, (min(m0 + BM, Lq) - 1) / BN + 1);

  load_tile<DS, BM, NT>(sQs, qsg, a.qs_sl, Lq - m0, a.vec_qs, tid, a.Ds);
  load_tile<DT, BM, NT>(sQt, qtg, a.qt_sl, Lq - m0, a.vec_qt, tid, a.Dt);
  if (n_kb > 0) {
    load_tile<DS, BN, NT>(sKs, ksg, a.ks_sl, Lk, a.vec_ks, tid, a.Ds);
    load_tile<DT, BN, NT>(sKt, ktg, a.kt_sl, Lk, a.vec_kt, tid, a.Dt);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t qsf[KS][4], qtf[KT][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) load_a<LS>(qsf[kk], sQs, warp * 16, kk * 16, lane);
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) load_a<LT>(qtf[kk], sQt, warp * 16, kk * 16, lane);

  // rows g, g + 8; l_t, u, l_s over this thread's columns (quad-reduced at the end)
  float mt[2] = {-INFINITY, -INFINITY}, lt[2] = {0.f, 0.f}, u[2] = {0.f, 0.f};
  float ms[2] = {-INFINITY, -INFINITY}, ls[2] = {0.f, 0.f};
  const float sl2s = float(a.scale_s * kLog2eD), sl2t = float(a.scale_t * kLog2eD);
  const int row0 = m0 + warp * 16;

  for (int j = 0; j < n_kb; ++j) {
    const int buf = j & 1, n0 = j * BN;
    if (j + 1 < n_kb) {
      const int n1 = n0 + BN;
      load_tile<DS, BN, NT>(sKs + (buf ^ 1) * BN * LS, ksg + int64_t(n1) * a.ks_sl, a.ks_sl, Lk - n1, a.vec_ks, tid,
                            a.Ds);
      load_tile<DT, BN, NT>(sKt + (buf ^ 1) * BN * LT, ktg + int64_t(n1) * a.kt_sl, a.kt_sl, Lk - n1, a.vec_kt, tid,
                            a.Dt);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* kss = sKs + buf * BN * LS;
    const uint16_t* kts = sKt + buf * BN * LT;

    if (!(causal && n0 > row0 + 15)) {
      float st[NST][4], ss[NST][4];
#pragma unroll
      for (int i = 0; i < NST; ++i) {
        st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
        ss[i][0] = ss[i][1] = ss[i][2] = ss[i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t kb[4];
          load_b_nk<LT>(kb, kts, np * 16, kk * 16, lane);
          mma_pair<T>(st[2 * np], st[2 * np + 1], qtf[kk], kb);
        }
      }
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t kb[4];
          load_b_nk<LS>(kb, kss, np * 16, kk * 16, lane);
          mma_pair<T>(ss[2 * np], ss[2 * np + 1], qsf[kk], kb);
        }
      }
      // base-2 logits, -inf where masked (the same mask on both)
      const bool mask = n0 + BN > Lk || (causal && n0 + BN - 1 > row0);
      float mxt[2] = {-INFINITY, -INFINITY}, mxs[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < NST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float xt = st[nt][e] * sl2t, xs = ss[nt][e] * sl2s;
          if (mask) {
            const int col = n0 + nt * 8 + 2 * tq + (e & 1), row = row0 + g + (e >> 1) * 8;
            if (col >= Lk || (causal && col > row)) xt = xs = -INFINITY;
          }
          st[nt][e] = xt;
          ss[nt][e] = xs;
          mxt[e >> 1] = fmaxf(mxt[e >> 1], xt);
          mxs[e >> 1] = fmaxf(mxs[e >> 1], xs);
        }
      }
      float mut[2], mus[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mxt[r] = fmaxf(mxt[r], __shfl_xor_sync(kFull, mxt[r], 1));
        mxt[r] = fmaxf(mxt[r], __shfl_xor_sync(kFull, mxt[r], 2));
        mxs[r] = fmaxf(mxs[r], __shfl_xor_sync(kFull, mxs[r], 1));
        mxs[r] = fmaxf(mxs[r], __shfl_xor_sync(kFull, mxs[r], 2));
        const float mtn = fmaxf(mt[r], mxt[r]), msn = fmaxf(ms[r], mxs[r]);
        mut[r] = mtn == -INFINITY ? 0.f : mtn;
        mus[r] = msn == -INFINITY ? 0.f : msn;
        const float at = exp2f(mt[r] - mut[r]), as = exp2f(ms[r] - mus[r]);
        mt[r] = mtn;
        ms[r] = msn;
        lt[r] *= at;
        u[r] *= at;
        ls[r] *= as;
      }
#pragma unroll
      for (int nt = 0; nt < NST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const float xt = st[nt][e], xs = ss[nt][e];
          const float et = exp2f(xt - mut[r]);
          lt[r] += et;
          u[r] += xt == -INFINITY ? 0.f : et * (xt - xs);  // masked: 0, not 0 * (-inf + inf)
          ls[r] += exp2f(xs - mus[r]);
        }
      }
    }
    __syncthreads();
  }

  float* klg = static_cast<float*>(a.kl);
  float* lsg = static_cast<float*>(a.lse_s);
  float* ltg = static_cast<float*>(a.lse_t);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lt[r] += __shfl_xor_sync(kFull, lt[r], 1);
    lt[r] += __shfl_xor_sync(kFull, lt[r], 2);
    u[r] += __shfl_xor_sync(kFull, u[r], 1);
    u[r] += __shfl_xor_sync(kFull, u[r], 2);
    ls[r] += __shfl_xor_sync(kFull, ls[r], 1);
    ls[r] += __shfl_xor_sync(kFull, ls[r], 2);
    const int row = row0 + g + 8 * r;
    if (row < Lq && tq == 0) {
      const int64_t o = int64_t(bh) * Lq + row;
      // in double, as the CPU: the KL is a difference of O(log Lk) terms (float cancels to ~1e-6)
      constexpr double kLn2d = 0.69314718055994530942;
      const double lse_t = lt[r] > 0.f ? double(mt[r]) * kLn2d + log(double(lt[r])) : -INFINITY;
      const double lse_s = ls[r] > 0.f ? double(ms[r]) * kLn2d + log(double(ls[r])) : -INFINITY;
      ltg[o] = float(lse_t);
      lsg[o] = float(lse_s);
      klg[o] = lt[r] > 0.f ? float(kLn2d * (double(u[r]) / double(lt[r])) - lse_t + lse_s) : 0.f;
    }
  }
}

// attn_kd_bwd_dq_mma: dqs_i = scale_s sum_j g_i (P^s_ij - P^t_ij) ks_j, P recomputed from the saved
// lse (base 2). Grid: B H ceil(Lq / 64) CTAs of 4 warps, 16 rows per warp, dqs (16 x Ds fp32) in
// registers, Qs / Qt read by ldmatrix per use, Ks / Kt double-buffered; dqs += dS Ks via ldmatrix.trans.
// FLOPs: 2 n (Dt + 2 Ds), 2 n exp2. Bytes: qs, qt once, ks, kt once per query block (L2), write dqs.
template <typename T, int DS, int DT>
__global__ void __launch_bounds__(128, 2) attn_kd_bwd_dq_mma(KdAttnArgs a) {
  using namespace attn_mma;
  using Cfg = KdCfg<DS, DT>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, NT = 128, LS = Cfg::kLS, LT = Cfg::kLT;
  constexpr int KS = DS / 16, KT = DT / 16, NST = BN / 8, NDS = DS / 8;
  uint16_t* sQs = reinterpret_cast<uint16_t*>(fd_attn_smem);  // [BM][LS]
  uint16_t* sQt = sQs + BM * LS;                               // [BM][LT]
  uint16_t* sKs = sQt + BM * LT;                               // [2][BN][LS]
  uint16_t* sKt = sKs + 2 * BN * LS;                           // [2][BN][LT]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int nqb = a.nblk;
  const int bh = int(blockIdx.x / unsigned(nqb));
  const int qb = nqb - 1 - int(blockIdx.x - unsigned(bh) * unsigned(nqb));
  const int b = bh / a.H, h = bh - b * a.H, hks = h / a.Gs, hkt = h / a.Gt;
  const int m0 = qb * BM;
  const int Lq = a.Lq, Lk = a.Lk;
  const bool causal = a.causal;

  const uint16_t* qsg = static_cast<const uint16_t*>(a.qs) + b * a.qs_sb + h * a.qs_sh + int64_t(m0) * a.qs_sl;
  const uint16_t* qtg = static_cast<const uint16_t*>(a.qt) + b * a.qt_sb + h * a.qt_sh + int64_t(m0) * a.qt_sl;
  const uint16_t* ksg = static_cast<const uint16_t*>(a.ks) + b * a.ks_sb + hks * a.ks_sh;
  const uint16_t* ktg = static_cast<const uint16_t*>(a.kt) + b * a.kt_sb + hkt * a.kt_sh;

  int n_kb = (Lk + BN - 1) / BN;
  if (causal) n_kb = min(n_kb, (min(m0 + BM, Lq) - 1) / BN + 1);

  load_tile<DS, BM, NT>(sQs, qsg, a.qs_sl, Lq - m0, a.vec_qs, tid, a.Ds);
  load_tile<DT, BM, NT>(sQt, qtg, a.qt_sl, Lq - m0, a.vec_qt, tid, a.Dt);
  if (n_kb > 0) {
    load_tile<DS, BN, NT>(sKs, ksg, a.ks_sl, Lk, a.vec_ks, tid, a.Ds);
    load_tile<DT, BN, NT>(sKt, ktg, a.kt_sl, Lk, a.vec_kt, tid, a.Dt);
  }
  cp_async_commit();

  const int row0 = m0 + warp * 16;
  float ls2[2], lt2[2], gr[2];  // rows g, g + 8: lse log2e and g (0 past Lq: not stored)
  {
    const int64_t o = int64_t(bh) * Lq + row0 + g;
    const float* lsp = static_cast<const float*>(a.lse_s_in) + o;
    const float* ltp = static_cast<const float*>(a.lse_t_in) + o;
    const float* gp = static_cast<const float*>(a.g) + o;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = row0 + g + 8 * r < Lq;
      ls2[r] = ok ? lsp[8 * r] * kLog2e : 0.f;
      lt2[r] = ok ? ltp[8 * r] * kLog2e : 0.f;
      gr[r] = ok ? gp[8 * r] : 0.f;
    }
  }
  float dq[NDS][4];
#pragma unroll
  for (int i = 0; i < NDS; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  const float sl2s = float(a.scale_s * kLog2eD), sl2t = float(a.scale_t * kLog2eD);

  for (int j = 0; j < n_kb; ++j) {
    const int buf = j & 1, n0 = j * BN;
    if (j + 1 < n_kb) {
      const int n1 = n0 + BN;
      load_tile<DS, BN, NT>(sKs + (buf ^ 1) * BN * LS, ksg + int64_t(n1) * a.ks_sl, a.ks_sl, Lk - n1, a.vec_ks, tid,
                            a.Ds);
      load_tile<DT, BN, NT>(sKt + (buf ^ 1) * BN * LT, ktg + int64_t(n1) * a.kt_sl, a.kt_sl, Lk - n1, a.vec_kt, tid,
                            a.Dt);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* kss = sKs + buf * BN * LS;
    const uint16_t* kts = sKt + buf * BN * LT;

    if (!(causal && n0 > row0 + 15)) {
      float st[NST][4], ss[NST][4];
#pragma unroll
      for (int i = 0; i < NST; ++i) {
        st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
        ss[i][0] = ss[i][1] = ss[i][2] = ss[i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t qa[4];
        load_a<LT>(qa, sQt, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t kb[4];
          load_b_nk<LT>(kb, kts, np * 16, kk * 16, lane);
          mma_pair<T>(st[2 * np], st[2 * np + 1], qa, kb);
        }
      }
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t qa[4];
        load_a<LS>(qa, sQs, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t kb[4];
          load_b_nk<LS>(kb, kss, np * 16, kk * 16, lane);
          mma_pair<T>(ss[2 * np], ss[2 * np + 1], qa, kb);
        }
      }
      const bool mask = n0 + BN > Lk || (causal && n0 + BN - 1 > row0);
#pragma unroll
      for (int nt = 0; nt < NST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float ds = gr[r] * (exp2f(ss[nt][e] * sl2s - ls2[r]) - exp2f(st[nt][e] * sl2t - lt2[r]));
          if (mask) {
            const int col = n0 + nt * 8 + 2 * tq + (e & 1), row = row0 + g + 8 * r;
            if (col >= Lk || (causal && col > row)) ds = 0.f;
          }
          ss[nt][e] = ds;
        }
      }
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t da[4];
        pack_a<T>(da, ss[2 * kk], ss[2 * kk + 1]);
#pragma unroll
        for (int dt2 = 0; dt2 < DS / 16; ++dt2) {
          uint32_t kb[4];
          load_b_kn<LS>(kb, kss, kk * 16, dt2 * 16, lane);
          mma_pair<T>(dq[2 * dt2], dq[2 * dt2 + 1], da, kb);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  const float sc = float(a.scale_s);
  const int Ds = a.Ds;  // the real width (<= DS): rows of dqs are Ds apart, columns >= Ds are padding
  uint16_t* dqg = static_cast<uint16_t*>(a.dqs) + (int64_t(bh) * Lq + m0) * Ds;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = warp * 16 + g + 8 * r;
    if (m0 + rr < Lq) {
      uint16_t* drow = dqg + rr * Ds + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < NDS; ++dt)
        if (dt * 8 < Ds)
          *reinterpret_cast<uint32_t*>(drow + dt * 8) = pack2(dq[dt][2 * r] * sc, dq[dt][2 * r + 1] * sc, T{});
    }
  }
}

// attn_kd_bwd_dk_mma: dks_j = scale_s sum_{h in group, i} g_i (P^s_ij - P^t_ij) qs_i. Grid: B Hks
// ceil(Lk / 64) CTAs of 4 warps, 16 student keys per warp, dks (16 x Ds fp32) in registers. Per (query
// head h of the student group, query tile of BQ rows), double-buffered: the teacher key rows of this
// block for h's teacher kv head (h / (H / Hkt): it changes within a student group when Hkt > Hks, so
// it is reloaded per iteration, from L2), Qt, Qs, and lse_s, lse_t, g. Per warp:
// S_t^T = Kt_w Qt^T, S_s^T = Ks_w Qs^T, dS^T = g (P^s - P^t)^T, dks += dS^T Qs (ldmatrix.trans).
// FLOPs: 2 n (Dt + 2 Ds), 2 n exp2. Bytes: ks once, qs, qt (+ kt) once per key block (L2), write dks.
template <typename T, int DS, int DT>
__global__ void __launch_bounds__(128) attn_kd_bwd_dk_mma(KdAttnArgs a) {  // no minimum: see kBN
  using namespace attn_mma;
  using Cfg = KdCfg<DS, DT>;
  constexpr int BN = Cfg::kBN_dk, BQ = Cfg::kBQ, NT = 128, LS = Cfg::kLS, LT = Cfg::kLT;
  constexpr int KS = DS / 16, KT = DT / 16, NQT = BQ / 8, NDS = DS / 8;
  uint16_t* sKs = reinterpret_cast<uint16_t*>(fd_attn_smem);  // [BN][LS]
  uint16_t* sKt = sKs + BN * LS;                               // [2][BN][LT]
  uint16_t* sQt = sKt + 2 * BN * LT;                           // [2][BQ][LT]
  uint16_t* sQs = sQt + 2 * BQ * LT;                           // [2][BQ][LS]
  float* sLs = reinterpret_cast<float*>(sQs + 2 * BQ * LS);    // [2][BQ] lse_s log2e (0 past Lq)
  float* sLt = sLs + 2 * BQ;                                   // [2][BQ] lse_t log2e
  float* sG = sLt + 2 * BQ;                                    // [2][BQ] g (0 past Lq)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int nkb = a.nblk;
  const int bhk = int(blockIdx.x / unsigned(nkb));
  const int kb = int(blockIdx.x - unsigned(bhk) * unsigned(nkb));
  const int b = bhk / a.Hks, hks = bhk - b * a.Hks;
  const int n0 = kb * BN;
  const int Lq = a.Lq, Lk = a.Lk, Gs = a.Gs;
  const bool causal = a.causal;

  const uint16_t* ksg = static_cast<const uint16_t*>(a.ks) + b * a.ks_sb + hks * a.ks_sh + int64_t(n0) * a.ks_sl;
  const uint16_t* ktb = static_cast<const uint16_t*>(a.kt) + b * a.kt_sb + int64_t(n0) * a.kt_sl;
  const uint16_t* qsb = static_cast<const uint16_t*>(a.qs) + b * a.qs_sb;
  const uint16_t* qtb = static_cast<const uint16_t*>(a.qt) + b * a.qt_sb;
  const float* lse_s = static_cast<const float*>(a.lse_s_in);
  const float* lse_t = static_cast<const float*>(a.lse_t_in);
  const float* gv = static_cast<const float*>(a.g);

  const int qb_start = causal ? n0 / BQ : 0;
  const int n_q = max(0, (Lq + BQ - 1) / BQ - qb_start);
  const int total = Gs * n_q;

  auto issue = [&](int it, int buf) {
    const int hh = it / n_q, h = hks * Gs + hh, hkt = h / a.Gt, q0 = (qb_start + (it - hh * n_q)) * BQ;
    const int64_t bh = int64_t(b) * a.H + h;
    load_tile<DT, BN, NT>(sKt + buf * BN * LT, ktb + hkt * a.kt_sh, a.kt_sl, Lk - n0, a.vec_kt, tid, a.Dt);
    load_tile<DT, BQ, NT>(sQt + buf * BQ * LT, qtb + h * a.qt_sh + int64_t(q0) * a.qt_sl, a.qt_sl, Lq - q0,
                          a.vec_qt, tid, a.Dt);
    load_tile<DS, BQ, NT>(sQs + buf * BQ * LS, qsb + h * a.qs_sh + int64_t(q0) * a.qs_sl, a.qs_sl, Lq - q0,
                          a.vec_qs, tid, a.Ds);
    for (int r = tid; r < BQ; r += NT) {
      const bool ok = q0 + r < Lq;
      const int64_t o = bh * Lq + q0 + r;
      sLs[buf * BQ + r] = ok ? lse_s[o] * kLog2e : 0.f;
      sLt[buf * BQ + r] = ok ? lse_t[o] * kLog2e : 0.f;
      sG[buf * BQ + r] = ok ? gv[o] : 0.f;
    }
  };

  load_tile<DS, BN, NT>(sKs, ksg, a.ks_sl, Lk - n0, a.vec_ks, tid, a.Ds);
  if (total > 0) issue(0, 0);
  cp_async_commit();

  float dk[NDS][4];
#pragma unroll
  for (int i = 0; i < NDS; ++i) dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
  const float sl2s = float(a.scale_s * kLog2eD), sl2t = float(a.scale_t * kLog2eD);
  const int kw0 = n0 + warp * 16;

  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) {
      issue(it + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int q0 = (qb_start + it % n_q) * BQ;
    const uint16_t* kts = sKt + buf * BN * LT;
    const uint16_t* qts = sQt + buf * BQ * LT;
    const uint16_t* qss = sQs + buf * BQ * LS;
    const float* lsb = sLs + buf * BQ;
    const float* ltb = sLt + buf * BQ;
    const float* gb = sG + buf * BQ;

    if (kw0 < Lk && !(causal && q0 + BQ - 1 < kw0)) {
      // element (nt, e): key kw0 + g + 8 (e / 2), query q0 + 8 nt + 2 tq + e % 2
      float st[NQT][4], ss[NQT][4];
#pragma unroll
      for (int i = 0; i < NQT; ++i) {
        st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
        ss[i][0] = ss[i][1] = ss[i][2] = ss[i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t ka[4];
        load_a<LT>(ka, kts, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BQ / 16; ++np) {
          uint32_t qb4[4];
          load_b_nk<LT>(qb4, qts, np * 16, kk * 16, lane);
          mma_pair<T>(st[2 * np], st[2 * np + 1], ka, qb4);
        }
      }
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t ka[4];
        load_a<LS>(ka, sKs, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BQ / 16; ++np) {
          uint32_t qb4[4];
          load_b_nk<LS>(qb4, qss, np * 16, kk * 16, lane);
          mma_pair<T>(ss[2 * np], ss[2 * np + 1], ka, qb4);
        }
      }
      const bool mask = q0 + BQ > Lq || kw0 + 16 > Lk || (causal && q0 < kw0 + 15);
#pragma unroll
      for (int nt = 0; nt < NQT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + 2 * tq + (e & 1);
          float ds = gb[qi] * (exp2f(ss[nt][e] * sl2s - lsb[qi]) - exp2f(st[nt][e] * sl2t - ltb[qi]));
          if (mask) {
            const int key = kw0 + g + (e >> 1) * 8, qrow = q0 + qi;
            if (qrow >= Lq || key >= Lk || (causal && key > qrow)) ds = 0.f;
          }
          ss[nt][e] = ds;
        }
      }
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        uint32_t da[4];
        pack_a<T>(da, ss[2 * kk], ss[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < DS / 16; ++dp) {
          uint32_t qb4[4];
          load_b_kn<LS>(qb4, qss, kk * 16, dp * 16, lane);
          mma_pair<T>(dk[2 * dp], dk[2 * dp + 1], da, qb4);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  const float sc = float(a.scale_s);
  const int Ds = a.Ds;  // the real width (<= DS)
  uint16_t* dkg = static_cast<uint16_t*>(a.dks) + (int64_t(bhk) * Lk + n0) * Ds;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int kr = warp * 16 + g + 8 * r;  // key within the block
    if (n0 + kr < Lk) {
      uint16_t* drow = dkg + kr * Ds + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < NDS; ++dt)
        if (dt * 8 < Ds)
          *reinterpret_cast<uint32_t*>(drow + dt * 8) = pack2(dk[dt][2 * r] * sc, dk[dt][2 * r + 1] * sc, T{});
    }
  }
}

// =====================================================================================================
// Host side
// =====================================================================================================

constexpr const char* kOpF = "attention_forward";
constexpr const char* kOpB = "attention_backward";
constexpr const char* kOpKF = "attention_kd_forward";
constexpr const char* kOpKB = "attention_kd_backward";

using rowwise::bad_arg;
using rowwise::check_launch;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel (a host-side attribute,
// no synchronization); then the launch and its error check. Nothing is launched for 0 blocks.
template <typename Kernel, typename... Args>
void launch(const char* op, const char* name, Kernel kernel, int64_t blocks, int threads, size_t smem,
            cudaStream_t stream, const Args&... args) {
  if (blocks <= 0) return;
  if (blocks > INT32_MAX) bad_arg(op, std::string(name) + " would need more than 2^31 - 1 blocks");
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::runtime_error(std::string("flashdistill ") + op + " (cuda): raising the shared-memory limit of " +
                               name + " to " + std::to_string(smem) + " bytes failed: " + cudaGetErrorName(e) +
                               ": " + cudaGetErrorString(e));
    }
  }
  kernel<<<unsigned(blocks), unsigned(threads), smem, stream>>>(args...);
  check_launch(op, name);
}

// The tensor-core kernels use sm_80 instructions (mma.m16n8k16 bf16, cp.async): refuse older devices
// here rather than trap in the kernel. A failing query is left to the launch to report.
void require_sm80(const char* op) {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  if (major < 8)
    throw std::runtime_error(std::string("flashdistill ") + op +
                             " (cuda): float16/bfloat16 attention needs a GPU of compute capability 8.0 or newer");
}

bool is16(int64_t dtype) { return dtype == kFloat16 || dtype == kBFloat16; }

// D supported by the cuda backend (every dtype); the message is the ABI's (csrc/README.md).
void check_head_dim(const char* op, int64_t D) {
  if (D < 1 || D > kMaxGenericD)
    throw std::invalid_argument(std::string("attention: head dim D=") + std::to_string(D) +
                                " not supported by the cuda backend (1..256)");
  (void)op;
}

bool mma_head_dim(int64_t D) { return D == 32 || D == 64 || D == 96 || D == 128; }

// float16 / bfloat16 at a head dim the tensor-core kernels have an instance for; the rest (float32,
// float64, and 16-bit at any other D <= 256) runs the generic FMA kernels.
bool use_mma(int64_t dtype, int64_t D) { return is16(dtype) && mma_head_dim(D); }

// The KD kernels' tile width for a head dim: 96 runs in the 128-wide instance (zero-padded columns).
template <typename F>
void with_kd_tile_dim(int64_t D, F&& f) {
  switch (D) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 128>{}); break;  // 96, 128 (kd_use_mma ran first)
  }
}

template <typename F>
void with_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    default: f(std::integral_constant<int, 128>{}); break;  // use_mma ran first
  }
}

void check_shapes(const char* op, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk) {
  if (B < 0 || Hq < 0 || Hk < 1 || Lq < 0 || Lk < 0) bad_arg(op, "negative size (or Hk < 1)");
  if (Hq % Hk != 0) bad_arg(op, "Hq=" + std::to_string(Hq) + " is not a multiple of Hk=" + std::to_string(Hk));
  if (B * Hq > INT32_MAX || B * Hk > INT32_MAX || Lq > INT32_MAX - 256 || Lk > INT32_MAX - 256)
    bad_arg(op, "a size exceeds 2^31");
}

// 16-byte cp.async of every row: base 16-byte aligned, each stride (of a dim longer than 1) a multiple
// of 8 elements (D itself is a multiple of 8 on this path).
bool vec_ok(const void* p, int64_t sb, int64_t sh, int64_t sl, int64_t B, int64_t H, int64_t L) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return (B <= 1 || sb % 8 == 0) && (H <= 1 || sh % 8 == 0) && (L <= 1 || sl % 8 == 0);
}

void check_out_aligned(const char* op, const void* p, const char* name) {
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) bad_arg(op, std::string(name) + " is not 4-byte aligned");
}

AttnArgs make_args(int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D, const void* q,
                   int64_t q_sb, int64_t q_sh, int64_t q_sl, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                   const void* v, int64_t v_sb, int64_t v_sh, int64_t v_sl, bool causal, double scale) {
  AttnArgs a{};
  a.q = q; a.k = k; a.v = v;
  a.q_sb = q_sb; a.q_sh = q_sh; a.q_sl = q_sl;
  a.k_sb = k_sb; a.k_sh = k_sh; a.k_sl = k_sl;
  a.v_sb = v_sb; a.v_sh = v_sh; a.v_sl = v_sl;
  a.B = int(B); a.Hq = int(Hq); a.Hk = int(Hk); a.G = int(Hq / Hk);
  a.Lq = int(Lq); a.Lk = int(Lk); a.D = int(D);
  a.scale = scale;
  a.causal = causal;
  a.vec_q = vec_ok(q, q_sb, q_sh, q_sl, B, Hq, Lq);
  a.vec_k = vec_ok(k, k_sb, k_sh, k_sl, B, Hk, Lk);
  a.vec_v = vec_ok(v, v_sb, v_sh, v_sl, B, Hk, Lk);
  return a;
}

template <typename T>
void forward_impl(AttnArgs a, cudaStream_t stream) {
  const int64_t BH = int64_t(a.B) * a.Hq;
  if constexpr (std::is_same<T, f16_t>::value || std::is_same<T, bf16_t>::value) {
    if (mma_head_dim(a.D)) {
      with_head_dim(a.D, [&](auto dc) {
        constexpr int D = decltype(dc)::value;
        using Cfg = FwdCfg<D>;
        a.nblk = int(cdiv(a.Lq, Cfg::kBM));
        launch(kOpF, "attn_fwd_mma", attn_fwd_mma<T, D, Cfg::kWarps>, BH * a.nblk, 32 * Cfg::kWarps, Cfg::smem(),
               stream, a);
      });
      return;
    }
  }
  using C = typename Compute<T>::type;
  a.nblk = int(cdiv(a.Lq, kGW));
  const size_t smem = size_t(kGW + kGT) * odd_ld(a.D) * sizeof(C);
  launch(kOpF, "attn_fwd_generic", attn_fwd_generic<T>, BH * a.nblk, kGThreads, smem, stream, a);
}

template <typename T>
void backward_impl(AttnArgs a, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const int64_t BHq = int64_t(a.B) * a.Hq, BHk = int64_t(a.B) * a.Hk;
  const int64_t rows = BHq * a.Lq;
  launch(kOpB, "attn_bwd_delta", attn_bwd_delta<T>, cdiv(rows, 8), 256, 0, stream, static_cast<const T*>(a.out),
         static_cast<const T*>(a.dout), static_cast<C*>(a.delta), rows, a.D);
  if constexpr (std::is_same<T, f16_t>::value || std::is_same<T, bf16_t>::value) {
    if (mma_head_dim(a.D)) {
      with_head_dim(a.D, [&](auto dc) {
        constexpr int D = decltype(dc)::value;
        AttnArgs k = a;
        k.nblk = int(cdiv(a.Lk, kBN));
        launch(kOpB, "attn_bwd_dkdv_mma", attn_bwd_dkdv_mma<T, D, DkdvCfg<D>::kBQ>, BHk * k.nblk, 128,
               DkdvCfg<D>::smem(), stream, k);
        AttnArgs q = a;
        q.nblk = int(cdiv(a.Lq, DqCfg<D>::kBM));
        launch(kOpB, "attn_bwd_dq_mma", attn_bwd_dq_mma<T, D, DqCfg<D>::kBN>, BHq * q.nblk, 128, DqCfg<D>::smem(),
               stream, q);
      });
      return;
    }
  }
  const size_t smem = size_t(2 * kGW + kGT) * odd_ld(a.D) * sizeof(C);
  AttnArgs k = a;
  k.nblk = int(cdiv(a.Lk, kGW));
  launch(kOpB, "attn_bwd_dkdv_generic", attn_bwd_dkdv_generic<T>, BHk * k.nblk, kGThreads, smem, stream, k);
  AttnArgs q = a;
  q.nblk = int(cdiv(a.Lq, kGW));
  launch(kOpB, "attn_bwd_dq_generic", attn_bwd_dq_generic<T>, BHq * q.nblk, kGThreads, smem, stream, q);
}

void check_kd(const char* op, int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
              int64_t Ds, int64_t Dt) {
  (void)rowwise::elem_bytes_of(dtype, op);
  if (B < 0 || H < 0 || Hks < 1 || Hkt < 1 || Lq < 0 || Lk < 0) bad_arg(op, "negative size (or Hks, Hkt < 1)");
  if (H % Hks != 0 || H % Hkt != 0)
    bad_arg(op, "H=" + std::to_string(H) + " must be a multiple of Hks=" + std::to_string(Hks) + " and of Hkt=" +
                    std::to_string(Hkt));
  if (B * H > INT32_MAX || Lq > INT32_MAX - 256 || Lk > INT32_MAX - 256) bad_arg(op, "a size exceeds 2^31");
  if (Ds < 1 || Ds > kMaxGenericD || Dt < 1 || Dt > kMaxGenericD)
    throw std::invalid_argument("attention_kd: head dims Ds=" + std::to_string(Ds) + ", Dt=" + std::to_string(Dt) +
                                " not supported by the cuda backend (1..256)");
}

size_t kd_smem(const KdAttnArgs& a, size_t cbytes) {
  const int lds = odd_ld(a.Ds), ldt = odd_ld(a.Dt);
  return (size_t(kGW) * lds + size_t(kGW) * ldt + size_t(kGT) * std::max(lds, ldt)) * cbytes;
}

KdAttnArgs make_kd_args(int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk, int64_t Ds,
                        int64_t Dt, const void* qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl, const void* ks,
                        int64_t ks_sb, int64_t ks_sh, int64_t ks_sl, const void* qt, int64_t qt_sb, int64_t qt_sh,
                        int64_t qt_sl, const void* kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl, bool causal,
                        double scale_s, double scale_t) {
  KdAttnArgs a{};
  a.qs = qs; a.ks = ks; a.qt = qt; a.kt = kt;
  a.qs_sb = qs_sb; a.qs_sh = qs_sh; a.qs_sl = qs_sl;
  a.ks_sb = ks_sb; a.ks_sh = ks_sh; a.ks_sl = ks_sl;
  a.qt_sb = qt_sb; a.qt_sh = qt_sh; a.qt_sl = qt_sl;
  a.kt_sb = kt_sb; a.kt_sh = kt_sh; a.kt_sl = kt_sl;
  a.B = int(B); a.H = int(H); a.Hks = int(Hks); a.Hkt = int(Hkt);
  a.Gs = int(H / Hks); a.Gt = int(H / Hkt);
  a.Lq = int(Lq); a.Lk = int(Lk); a.Ds = int(Ds); a.Dt = int(Dt);
  a.scale_s = scale_s; a.scale_t = scale_t;
  a.causal = causal;
  a.vec_qs = vec_ok(qs, qs_sb, qs_sh, qs_sl, B, H, Lq);
  a.vec_ks = vec_ok(ks, ks_sb, ks_sh, ks_sl, B, Hks, Lk);
  a.vec_qt = vec_ok(qt, qt_sb, qt_sh, qt_sl, B, H, Lq);
  a.vec_kt = vec_ok(kt, kt_sb, kt_sh, kt_sl, B, Hkt, Lk);
  return a;
}

// float16 / bfloat16 with both head dims in {32, 64, 96, 128}: the tensor-core KD kernels; otherwise
// (any dtype, any Ds, Dt <= 256) the generic ones.
bool kd_use_mma(int64_t dtype, int64_t Ds, int64_t Dt) {
  return is16(dtype) && mma_head_dim(Ds) && mma_head_dim(Dt);
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace

// ---- entry points -----------------------------------------------------------------------------------

void attention_forward_cuda(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                            const void* q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                            const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                            const void* v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                            int64_t causal, double scale, void* out, void* lse, CUstream_st* stream) {
  (void)rowwise::elem_bytes_of(dtype, kOpF);
  check_shapes(kOpF, B, Hq, Hk, Lq, Lk);
  check_head_dim(kOpF, D);
  if (B * Hq * Lq == 0) return;
  if (q == nullptr || out == nullptr || lse == nullptr || (Lk > 0 && (k == nullptr || v == nullptr)))
    bad_arg(kOpF, "null data pointer among q, k, v, out, lse");
  AttnArgs a = make_args(B, Hq, Hk, Lq, Lk, D, q, q_sb, q_sh, q_sl, k, k_sb, k_sh, k_sl, v, v_sb, v_sh, v_sl,
                         causal != 0, scale);
  a.o = out;
  a.lse = lse;
  if (use_mma(dtype, D)) {
    check_out_aligned(kOpF, out, "out");
    require_sm80(kOpF);
  }
  rowwise::with_dtype(dtype, kOpF, [&](auto tag) { forward_impl<decltype(tag)>(a, stream); });
}

int64_t attention_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk,
                                           int64_t D) {
  (void)rowwise::elem_bytes_of(dtype, kOpB);
  check_shapes(kOpB, B, Hq, Hk, Lq, Lk);
  (void)D;
  return round_up(B * Hq * Lq * rowwise::compute_bytes_of(dtype), 256);  // Delta [B, Hq, Lq] of C
}

void attention_backward_cuda(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                             const void* q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                             const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                             const void* v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                             const void* out, const void* dout, const void* lse, int64_t causal, double scale,
                             void* dq, void* dk, void* dv, void* workspace, int64_t workspace_bytes,
                             CUstream_st* stream) {
  const int64_t need = attention_backward_workspace_bytes(dtype, B, Hq, Hk, Lq, Lk, D);
  check_head_dim(kOpB, D);
  if (workspace_bytes < need)
    bad_arg(kOpB, "workspace of " + std::to_string(workspace_bytes) +
                      " bytes, need attention_backward_workspace_bytes = " + std::to_string(need));
  if (need > 0 && workspace == nullptr) bad_arg(kOpB, "workspace is null");
  if (reinterpret_cast<uintptr_t>(workspace) % uintptr_t(rowwise::compute_bytes_of(dtype)) != 0)
    bad_arg(kOpB, "workspace is not aligned to the compute type");
  const bool any_q = B * Hq * Lq > 0, any_k = B * Hk * Lk > 0;
  if (!any_q && !any_k) return;
  if ((any_q && (q == nullptr || out == nullptr || dout == nullptr || lse == nullptr || dq == nullptr)) ||
      (any_k && (dk == nullptr || dv == nullptr)) || (any_q && any_k && (k == nullptr || v == nullptr)))
    bad_arg(kOpB, "null data pointer among q, k, v, out, dout, lse, dq, dk, dv");
  AttnArgs a = make_args(B, Hq, Hk, Lq, Lk, D, q, q_sb, q_sh, q_sl, k, k_sb, k_sh, k_sl, v, v_sb, v_sh, v_sl,
                         causal != 0, scale);
  a.out = out;
  a.dout = dout;
  a.lse_in = lse;
  a.dq = dq;
  a.dk = dk;
  a.dv = dv;
  a.delta = workspace;
  a.vec_o = reinterpret_cast<uintptr_t>(dout) % 16 == 0;  // contiguous rows of D (a multiple of 8)
  if (use_mma(dtype, D)) {
    if (any_q) check_out_aligned(kOpB, dq, "dq");
    if (any_k) {
      check_out_aligned(kOpB, dk, "dk");
      check_out_aligned(kOpB, dv, "dv");
    }
    require_sm80(kOpB);
  }
  rowwise::with_dtype(dtype, kOpB, [&](auto tag) { backward_impl<decltype(tag)>(a, stream); });
}

void attention_kd_forward_cuda(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                               int64_t Ds, int64_t Dt,
                               const void* qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                               const void* ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                               const void* qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                               const void* kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                               int64_t causal, double scale_s, double scale_t,
                               void* kl, void* lse_s, void* lse_t, CUstream_st* stream) {
  check_kd(kOpKF, dtype, B, H, Hks, Hkt, Lq, Lk, Ds, Dt);
  if (B * H * Lq == 0) return;
  if (qs == nullptr || qt == nullptr || kl == nullptr || lse_s == nullptr || lse_t == nullptr ||
      (Lk > 0 && (ks == nullptr || kt == nullptr)))
    bad_arg(kOpKF, "null data pointer among qs, ks, qt, kt, kl, lse_s, lse_t");
  KdAttnArgs a = make_kd_args(B, H, Hks, Hkt, Lq, Lk, Ds, Dt, qs, qs_sb, qs_sh, qs_sl, ks, ks_sb, ks_sh, ks_sl, qt,
                              qt_sb, qt_sh, qt_sl, kt, kt_sb, kt_sh, kt_sl, causal != 0, scale_s, scale_t);
  a.kl = kl;
  a.lse_s = lse_s;
  a.lse_t = lse_t;
  if (kd_use_mma(dtype, Ds, Dt)) {
    require_sm80(kOpKF);
    rowwise::with_dtype(dtype, kOpKF, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same<T, f16_t>::value || std::is_same<T, bf16_t>::value) {
        with_kd_tile_dim(Ds, [&](auto ds) {
          with_kd_tile_dim(Dt, [&](auto dt) {
            constexpr int DS = decltype(ds)::value, DT = decltype(dt)::value;
            using Cfg = KdCfg<DS, DT>;
            a.nblk = int(cdiv(Lq, Cfg::kBM));
            launch(kOpKF, "attn_kd_fwd_mma", attn_kd_fwd_mma<T, DS, DT>, B * H * a.nblk, 128, Cfg::smem_rows(),
                   stream, a);
          });
        });
      }
    });
    return;
  }
  a.nblk = int(cdiv(Lq, kGW));
  const int64_t blocks = B * H * a.nblk;
  const size_t smem = kd_smem(a, size_t(rowwise::compute_bytes_of(dtype)));
  rowwise::with_dtype(dtype, kOpKF, [&](auto tag) {
    launch(kOpKF, "attn_kd_fwd_generic", attn_kd_fwd_generic<decltype(tag)>, blocks, kGThreads, smem, stream, a);
  });
}

int64_t attention_kd_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt,
                                              int64_t Lq, int64_t Lk, int64_t Ds, int64_t Dt) {
  check_kd(kOpKB, dtype, B, H, Hks, Hkt, Lq, Lk, Ds, Dt);
  return 0;  // the two kernels read lse_s, lse_t and g directly
}

void attention_kd_backward_cuda(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                                int64_t Ds, int64_t Dt,
                                const void* qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                                const void* ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                                const void* qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                                const void* kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                                const void* lse_s, const void* lse_t, const void* g,
                                int64_t causal, double scale_s, double scale_t,
                                void* dqs, void* dks, void* workspace, int64_t workspace_bytes, CUstream_st* stream) {
  check_kd(kOpKB, dtype, B, H, Hks, Hkt, Lq, Lk, Ds, Dt);
  (void)workspace;
  (void)workspace_bytes;
  const bool any_q = B * H * Lq > 0, any_k = B * Hks * Lk > 0;
  if (!any_q && !any_k) return;
  if ((any_q && (qs == nullptr || qt == nullptr || lse_s == nullptr || lse_t == nullptr || g == nullptr ||
                 dqs == nullptr)) ||
      (any_k && dks == nullptr) || (any_q && any_k && (ks == nullptr || kt == nullptr)))
    bad_arg(kOpKB, "null data pointer among qs, ks, qt, kt, lse_s, lse_t, g, dqs, dks");
  KdAttnArgs a = make_kd_args(B, H, Hks, Hkt, Lq, Lk, Ds, Dt, qs, qs_sb, qs_sh, qs_sl, ks, ks_sb, ks_sh, ks_sl, qt,
                              qt_sb, qt_sh, qt_sl, kt, kt_sb, kt_sh, kt_sl, causal != 0, scale_s, scale_t);
  a.lse_s_in = lse_s;
  a.lse_t_in = lse_t;
  a.g = g;
  a.dqs = dqs;
  a.dks = dks;
  if (kd_use_mma(dtype, Ds, Dt)) {
    if (any_q) check_out_aligned(kOpKB, dqs, "dqs");
    if (any_k) check_out_aligned(kOpKB, dks, "dks");
    require_sm80(kOpKB);
    rowwise::with_dtype(dtype, kOpKB, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (std::is_same<T, f16_t>::value || std::is_same<T, bf16_t>::value) {
        with_kd_tile_dim(Ds, [&](auto ds) {
          with_kd_tile_dim(Dt, [&](auto dt) {
            constexpr int DS = decltype(ds)::value, DT = decltype(dt)::value;
            using Cfg = KdCfg<DS, DT>;
            KdAttnArgs kq = a;
            kq.nblk = int(cdiv(Lq, Cfg::kBM));
            launch(kOpKB, "attn_kd_bwd_dq_mma", attn_kd_bwd_dq_mma<T, DS, DT>, B * H * kq.nblk, 128,
                   Cfg::smem_rows(), stream, kq);
            KdAttnArgs kk = a;
            kk.nblk = int(cdiv(Lk, Cfg::kBN_dk));
            launch(kOpKB, "attn_kd_bwd_dk_mma", attn_kd_bwd_dk_mma<T, DS, DT>, B * Hks * kk.nblk, 128,
                   Cfg::smem_dk(), stream, kk);
          });
        });
      }
    });
    return;
  }
  const size_t smem = kd_smem(a, size_t(rowwise::compute_bytes_of(dtype)));
  rowwise::with_dtype(dtype, kOpKB, [&](auto tag) {
    using T = decltype(tag);
    KdAttnArgs kq = a;
    kq.nblk = int(cdiv(Lq, kGW));
    launch(kOpKB, "attn_kd_bwd_dq_generic", attn_kd_bwd_dq_generic<T>, B * H * kq.nblk, kGThreads, smem, stream, kq);
    KdAttnArgs kk = a;
    kk.nblk = int(cdiv(Lk, kGW));
    launch(kOpKB, "attn_kd_bwd_dk_generic", attn_kd_bwd_dk_generic<T>, B * Hks * kk.nblk, kGThreads, smem, stream,
           kk);
  });
}

}  // namespace gpu
}  // namespace flashdistill
