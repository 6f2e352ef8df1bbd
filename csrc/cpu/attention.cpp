// CPU attention (kernels/attention/reference.py; csrc/README.md "Attention (issue #6)"): a flash-style
// forward and backward (FlashAttention-2, Dao 2023, Alg. 1-2) and the streaming attention-map KL
// (MiniLM; ../shared/research/attn_sampler.md Sec. 3.2), with no [Lq, Lk] matrix anywhere: every
// thread holds tiles of at most 64 x 64 scores.
//
// Math (per batch b, query head h reading key/value head h / (Hq / Hk); causal: key j visible to
// query i iff j <= i):
//   forward   S = scale q k^T, m_i = max_j S_ij, l_i = sum_j e^(S_ij - m_i), out = (e^(S - m) v) / l,
//             lse_i = m_i + log l_i, m and l kept online over key blocks (FA2: O rescaled by
//             e^(m_old - m_new), divided by l once at the end);
//   backward  P = e^(S - lse), Delta_i = sum_d dO_id O_id, dV = P^T dO, dP = dO v^T,
//             dS = P (dP - Delta), dQ = scale dS k, dK = scale dS^T q (dK, dV summed over a group);
//   KD fwd    t = scale_t q_t k_t^T, s = scale_s q_s k_s^T, P = softmax t, Q = softmax s,
//             KL_i = sum_j P_ij (t_ij - s_ij) - lse_t_i + lse_s_i, with u_i = sum_j e^(t - m_t)(t - s)
//             online (rescaled with l_t when m_t grows): sum_j P (t - s) = u / l_t;
//   KD bwd    dS = g_i (Q - P), dq_s = scale_s dS k_s, dk_s = scale_s dS^T q_s.
// Exponentials in base 2: the scale times log2(e) is folded into the logits (into the packed Q
// tile in the forwards, into one FMA per score in the backwards), and vexp2 below is a Cody-Waite
// reduction 2^x = 2^n 2^r, |r| <= 1/2, with a degree-6 minimax (float, 1.6 ulp) / degree-13 Taylor
// (double, ~1 ulp) polynomial in r, on GCC vector types so that it runs in whole AVX-512 registers
// (std::exp in a loop stays a call). Masked scores are kNegBig (finite, so that masked t - s is 0,
// not NaN) and their exponential is exactly 0.
//
// Layouts and micro-kernel. One register-blocked kernel (mk) does every product:
// acc[r][v] += sum_k A[r, k] * B[k, v-th vector], A read as broadcast scalars with any strides, B as
// whole vectors of W = 64 bytes / sizeof(C) lanes (16 floats, 8 doubles). The forwards put queries in
// the vector lanes: S^T[j][i] = sum_d k[j][d] QT[d][i], so the online softmax is elementwise over
// vectors (no horizontal max or sum), the key and value rows are read in place (fp32/fp64) and the
// only transposes are of the Q tile and the O tile, once per query block. The backwards are
// key-stationary and put keys in the lanes: S[i][j] = sum_d q[i][d] KT[d][j], dP from VT,
// dV^T[d][j] += dO[i][d] P[i][j], dK^T[d][j] += q[i][d] dS[i][j] (q and dO rows read in place),
// dQ[i][d] += dS[i][j] k[j][d]; KT, VT and the k rows are packed once per key block per head.
// Register blocks: 6 rows x 4 vectors (24 accumulators, 10 loads per 24 FMAs; tails of 1-5 rows).
//
// Work and bytes (N = Lq = Lk, per (b, h); halve the flops with causal; W elements per vector):
//   attention_forward     4 N^2 D flops, N^2 exps. Reads q once, k and v once per query block of
//                         BQ = 4W rows (N / BQ times, from L2/L3 when a head fits, 2 N D s each),
//                         writes out and lse. fp32 N = 1024, D = 64: 268 MFLOP vs ~4 MB read.
//   attention_backward    10 N^2 D flops, N^2 exps (FA2's 5 matmuls, dQ in the same pass, no
//                         recomputation). Reads q, dO once per key block of BK = 4W keys (from
//                         L2/L3), k, v, out once; writes dq, dk, dv.
//   attention_kd_forward  2 N^2 (Ds + Dt) flops, 2 N^2 exps; reads q_s, q_t once, k_s, k_t once per
//                         query block; writes 3 floats per row.
//   attention_kd_backward 2 N^2 (3 Ds + Dt) flops, 2 N^2 exps; reads q_s, q_t once per key block,
//                         k_s, k_t once; writes dq_s, dk_s.
// All compute bound: at N = 1024 a (b, h) of fp32 D = 64 moves < 2 MB for 0.27-0.67 GFLOP.
//
// Parallelism and determinism. Forwards: one task per (b, h, query block), dynamic, largest first
// under causal. Backwards: one task per (b, kv head) pair when there are at least 8 pairs; with
// fewer, a pair's query heads are split into nsplit groups and then its keys into nseg segments
// (every nseg-th key block, so causal work stays balanced) until there are ~8 tasks, from the shape
// alone (bwd_plan). A task accumulates dK, dV of its keys over its heads and dQ of each of its heads
// over its keys, in per-thread scratch (O(L D): no [Lq, Lk] anything), and writes them out; split
// tasks write partial sums to a scratch instead ([B Hq, nseg, Lq, D] for dQ, [B Hk, nsplit, Lk, D]
// for dK, dV: at most ~8 heads' worth) that a last pass adds in index order. Every sum has a fixed
// order, so the results do not depend on the thread count (they do on the ISA: FMAs are contracted
// here, unlike the bit-reproducible elementwise kernels).
//
// Measured (Zen 4 VM, 2 cores, 115 GFLOP/s per core in a pure FMA loop, 180-230 on both; fp32,
// N = 1024, D = 64, median of 10 interleaved with the reference, torch 2.13 at 2 threads):
//   attention vs F.scaled_dot_product_attention (its CPU flash kernel), fwd / fwd + bwd, ms:
//     B=1 H=8   12.5 vs 16.0 (1.28x) / 43.9 vs 58.5 (1.33x); causal 7.0 vs 11.7 / 23.7 vs 44.2 (1.87x)
//     B=2 H=8   25.0 vs 30.0 (1.20x) / 85.5 vs 110.6 (1.29x); causal 15.2 vs 24.1 / 49.7 vs 90.9 (1.83x)
//     B=4 H=16  99.1 vs 117 (1.18x) / 336 vs 437 (1.30x); causal 57.3 vs 86.4 / 189 vs 334 (1.76x)
//     B=1 Hq=8 Hk=1 (enable_gqa)  12.1 vs 14.5 (1.20x) / 41.6 vs 77.6 (1.87x)
//   ~170-180 GFLOP/s non-causal (~75% of the FMA peak; 1 thread 90-95 GFLOP/s, ~80%).
//   attention KD (B=2 H=8, Ds = Dt = 64) vs the materialized reference.attention_kd (autograd for
//   the backward): fwd 29.7 vs 436 ms, fwd + bwd 83.9 vs 693 ms; causal 19.0 / 47.1 vs 619 / 867.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/cpu_simd.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

#define FD_ATT_INLINE inline __attribute__((always_inline))

// ---- vectors ------------------------------------------------------------------------------------

template <typename C> struct Vec;
template <> struct Vec<float> {
  typedef float v __attribute__((vector_size(64), __may_alias__));
  typedef int32_t iv __attribute__((vector_size(64), __may_alias__));
  static constexpr int W = 16;
};
template <> struct Vec<double> {
  typedef double v __attribute__((vector_size(64), __may_alias__));
  typedef int64_t iv __attribute__((vector_size(64), __may_alias__));
  static constexpr int W = 8;
};

template <typename C> using V = typename Vec<C>::v;
template <typename C> using IV = typename Vec<C>::iv;

// Every tile is 64-byte aligned and every vector access is at a multiple of W elements in it.
template <typename C> FD_ATT_INLINE V<C> vld(const C* p) { return *reinterpret_cast<const V<C>*>(p); }
template <typename C> FD_ATT_INLINE void vst(C* p, V<C> x) { *reinterpret_cast<V<C>*>(p) = x; }
template <typename C> FD_ATT_INLINE V<C> splat(C c) { return V<C>{} + c; }

// (base, base + 1, ..., base + W - 1) as lanes of the index type (row and key indices < 2^31).
template <typename C> FD_ATT_INLINE IV<C> lanes_from(int64_t base) {
  using I = std::remove_reference_t<decltype(IV<C>{}[0])>;
  IV<C> r{};
  for (int l = 0; l < Vec<C>::W; ++l) r[l] = I(base + l);
  return r;
}
template <typename C> FD_ATT_INLINE IV<C> isplat(int64_t x) {
  using I = std::remove_reference_t<decltype(IV<C>{}[0])>;
  return IV<C>{} + I(x);
}

// Masked scores: finite, so that e.g. t - s of two masked scores is 0; vexp2 of it minus any
// real maximum is 0.
template <typename C> constexpr C kNegBig = C(-1e30);

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// 2^x, elementwise (file comment), for x <= 127 (float) / 1023 (double); every caller has x <= ~0.
// x is clamped to [-127, 127] ([-1023, 1023]): at the low end n = -127 makes the scale 2^n's bits
// 0, so x <= -127 gives exactly 0 with no select (masked scores included); x in (-127, -126) gives
// 0 or a subnormal, the same to a probability. NaN propagates.
FD_ATT_INLINE V<float> vexp2(V<float> x) {
  const V<float> lo = splat(-127.0f), hi = splat(127.0f), magic = splat(12582912.0f);  // 1.5 * 2^23
  V<float> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V<float> t = xc + magic;                                 // rounds xc to an integer
  const IV<float> n = reinterpret_cast<const IV<float>&>(t) - reinterpret_cast<const IV<float>&>(magic);
  const V<float> r = xc - (t - magic);                           // [-1/2, 1/2], exact
  // 2^r: degree-6 relative-minimax fit on [-1/2, 1/2] (Lawson iteration in float64): 2.0e-9
  // relative, 1.6 ulp with float Horner steps
  V<float> p = splat(1.5353498631799026e-04f);
  p = p * r + 1.3398882441954063e-03f;
  p = p * r + 9.6184368734925070e-03f;
  p = p * r + 5.5503324441125435e-02f;
  p = p * r + 2.4022647917512027e-01f;
  p = p * r + 6.9314720287504470e-01f;
  p = p * r + 1.0f;
  const IV<float> e = (n + 127) << 23;
  return p * reinterpret_cast<const V<float>&>(e);
}

FD_ATT_INLINE V<double> vexp2(V<double> x) {
  const V<double> lo = splat(-1023.0), hi = splat(1023.0), magic = splat(6755399441055744.0);  // 1.5 * 2^52
  V<double> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V<double> t = xc + magic;
  const IV<double> n = reinterpret_cast<const IV<double>&>(t) - reinterpret_cast<const IV<double>&>(magic);
  const V<double> r = xc - (t - magic);
  // 2^r: Taylor series of e^(r ln 2) to degree 13 (ln2^k / k!), truncation < 5e-18 relative
  V<double> p = splat(1.3691488853904124e-12);
  p = p * r + 2.5678435993488196e-11;
  p = p * r + 4.4455382718708100e-10;
  p = p * r + 7.0549116208011210e-09;
  p = p * r + 1.0178086009239696e-07;
  p = p * r + 1.3215486790144305e-06;
  p = p * r + 1.5252733804059838e-05;
  p = p * r + 1.5403530393381606e-04;
  p = p * r + 1.3333558146428441e-03;
  p = p * r + 9.6181291076284770e-03;
  p = p * r + 5.5504108664821576e-02;
  p = p * r + 2.4022650695910071e-01;
  p = p * r + 6.9314718055994531e-01;
  p = p * r + 1.0;
  const IV<double> e = (n + 1023) << 52;
  return p * reinterpret_cast<const V<double>&>(e);
}

template <typename C> FD_ATT_INLINE V<C> vmax(V<C> a, V<C> b) { return a > b ? a : b; }

// ---- the micro-kernel -----------------------------------------------------------------------------

// acc[r][v] += sum_{k < K} a[r * a_rs + k * a_ks] * b[k * b_ks + v * W]: MR broadcast scalars times NV
// vectors per k (b 64-byte aligned, b_ks a multiple of W).
template <typename C, int MR, int NV>
FD_ATT_INLINE void mk(V<C> (&acc)[MR][NV], const C* __restrict__ a, int64_t a_rs, int64_t a_ks,
                      const C* __restrict__ b, int64_t b_ks, int64_t K) {
  constexpr int W = Vec<C>::W;
  const C* ar[MR];
  for (int r = 0; r < MR; ++r) ar[r] = a + r * a_rs;
  for (int64_t k = 0; k < K; ++k) {
    V<C> bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vld(b + k * b_ks + v * W);
    for (int r = 0; r < MR; ++r) {
      const C s = ar[r][k * a_ks];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
}

// f(integral_constant<int, R>, r0) over rows [0, n) in strips of MR rows, the last one of n % MR.
template <int M, typename F> FD_ATT_INLINE void strip_tail(int rem, int64_t r0, F& f) {
  if (rem == M) f(std::integral_constant<int, M>{}, r0);
  else if constexpr (M > 1) strip_tail<M - 1>(rem, r0, f);
}
template <int MR, typename F> FD_ATT_INLINE void strips(int64_t n, F&& f) {
  int64_t r = 0;
  for (; r + MR <= n; r += MR) f(std::integral_constant<int, MR>{}, r);
  if constexpr (MR > 1)
    if (n > r) strip_tail<MR - 1>(int(n - r), r, f);
}

// Register blocks, tuning only (every sum runs over k in order whatever the blocking): rows of the
// score strips (kMR), of the OT / dK^T / dV^T strips (kMRO) and of the dQ strips (kMRQ), each times
// kNV vectors. 6 x 4 = 24 accumulators + 4 loads + 1 broadcast of the 32 zmm registers; the kernel
// alone runs at 105-111 of the 115 GFLOP/s per core that a pure FMA loop reaches here (Zen 4 VM). 6
// rather than 4 rows: forward 12.4 -> 11.7 ms, backward 33.6 -> 28.4 ms, KD forward 16.7 -> 13.7 ms,
// KD backward 28.3 -> 24.2 ms (1 thread, B = 1, H = 4, N = 1024, D = 64, fp32, CPU time).
constexpr int kMR = 6;
constexpr int kMRO = 6;
constexpr int kMRQ = 6;
constexpr int kNV = 4;

// ---- memory -------------------------------------------------------------------------------------

// One 64-byte aligned allocation, carved into tiles with take(); allocated before any parallel region
// (an exception must not cross one).
class Arena {
 public:
  explicit Arena(size_t bytes) : bytes_(round(bytes)), p_(bytes_ ? std::aligned_alloc(64, bytes_) : nullptr) {
    if (bytes_ && !p_) throw std::bad_alloc();
  }
  ~Arena() { std::free(p_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  char* data() const { return static_cast<char*>(p_); }
  static size_t round(size_t b) { return (b + 63) / 64 * 64; }

 private:
  size_t bytes_;
  void* p_;
};

// Carves consecutive 64-byte aligned tiles from a block: sizing pass (base null) and real pass alike.
struct Carver {
  char* base;
  size_t off = 0;
  template <typename X> X* take(int64_t n) {
    X* p = reinterpret_cast<X*>(base ? base + off : nullptr);
    off += Arena::round(size_t(std::max<int64_t>(n, 0)) * sizeof(X));
    return p;
  }
};

int threads_for(double flops, int64_t tasks) {
#ifdef _OPENMP
  // below ~2 MFLOP one thread: a fork/join costs ~5 us (tuning only)
  if (flops < 2e6 || tasks < 2) return 1;
  return int(std::min<int64_t>(omp_get_max_threads(), tasks));
#else
  (void)flops;
  (void)tasks;
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// An input [B, H, L, D] as pointer and strides in elements.
template <typename T> struct In {
  const T* p;
  int64_t sb, sh, sl;
  const T* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * sl; }
};
template <typename T> In<T> in(uintptr_t p, int64_t sb, int64_t sh, int64_t sl) {
  return In<T>{reinterpret_cast<const T*>(p), sb, sh, sl};
}

// dst[d] = C(src[d]), d < D: fp16 with F16C, bf16 with a shift, both vectorized (load() of
// common.h is scalar and branchy: 15% of an fp16 backward when the packing used it).
template <typename T, typename C> FD_ATT_INLINE void widen_row(const T* src, int64_t D, C* dst) {
  if constexpr (std::is_same<T, C>::value) {
    std::copy(src, src + D, dst);
  } else if constexpr (simd::kInlineLoad<T>) {
    for (int64_t d = 0; d < D; ++d) dst[d] = simd::ld(src, d);
  } else {
    simd::widen(src, D, dst);
  }
}

// Rows [i0, i0 + n) of head (b, h) as compute-type rows: in place for fp32 / fp64 (row stride sl),
// else widened into tile (row stride D). Returns the pointer, sets *stride.
template <typename T, typename C>
const C* rows_c(const In<T>& x, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t D, C* tile, int64_t* stride) {
  if constexpr (std::is_same<T, C>::value) {
    (void)n;
    (void)D;
    (void)tile;
    *stride = x.sl;
    return x.row(b, h, i0);
  } else {
    for (int64_t i = 0; i < n; ++i) widen_row(x.row(b, h, i0 + i), D, tile + i * D);
    *stride = D;
    return tile;
  }
}

// XT[d][i] = c * x[i0 + i][d] for i < n, 0 for n <= i < ld (the lanes of a transposed tile).
template <typename T, typename C>
void pack_t(const In<T>& x, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t D, C c, C* XT, int64_t ld) {
  constexpr int64_t kRow = 256;  // the largest head dim the Python side passes
  C tmp[kRow];
  for (int64_t i = 0; i < n; ++i) {
    const T* src = x.row(b, h, i0 + i);
    if (std::is_same<T, C>::value || D > kRow) {
      for (int64_t d = 0; d < D; ++d) XT[d * ld + i] = c * C(load(src, d));
    } else {
      widen_row(src, D, tmp);
      for (int64_t d = 0; d < D; ++d) XT[d * ld + i] = c * tmp[d];
    }
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = n; i < ld; ++i) XT[d * ld + i] = C(0);
}

// ---- forward ------------------------------------------------------------------------------------

// Keys per block of the forwards (rows of the S^T tile): tuning only; 32, 48, 64, 96 and 128 all
// ran within the noise (11.2-11.9 ms, the setting of kMR's comment).
constexpr int64_t kFwdBK = 64;

// One key block of a forward's transposed logits: XT[j][i] = sum_d kx[j0 + j][d] QxT[d][i] for the nk
// keys from j0 (kNegBig where key j0 + j is past query lane i, when mask), and the block's max per
// query lane in mx. Kw: the widening tile for 16-bit keys. Inlined: as a call it cost the forward ~6 %.
template <typename T, typename C>
FD_ATT_INLINE void block_logits_t(const In<T>& kx, int64_t b, int64_t hx, int64_t j0, int64_t nk, int64_t Dx,
                                  const C* QxT, C* XT, C* Kw, bool mask, const IV<C> (&iv)[kNV], V<C> (&mx)[kNV]) {
  constexpr int W = Vec<C>::W, NV = kNV, BQ = NV * W;
  int64_t ksl;
  const C* kp = rows_c(kx, b, hx, j0, nk, Dx, Kw, &ksl);
  for (int u = 0; u < NV; ++u) mx[u] = splat(kNegBig<C>);
  strips<kMR>(nk, [&](auto mr, int64_t jr) {
    constexpr int R = decltype(mr)::value;
    V<C> acc[R][NV] = {};
    mk<C, R, NV>(acc, kp + jr * ksl, ksl, 1, QxT, BQ, Dx);
    for (int r = 0; r < R; ++r) {
      if (mask) {
        const IV<C> jj = isplat<C>(j0 + jr + r);
        for (int u = 0; u < NV; ++u) acc[r][u] = jj > iv[u] ? splat(kNegBig<C>) : acc[r][u];
      }
      for (int u = 0; u < NV; ++u) {
        mx[u] = vmax<C>(mx[u], acc[r][u]);
        vst(XT + (jr + r) * BQ + u * W, acc[r][u]);
      }
    }
  });
}

struct AttnShape {
  int64_t B, Hq, Hk, Lq, Lk, D;
};

// One query block: out rows [i0, i0 + nq) of head (b, h) and their lse. Scratch: QT [D][BQ],
// ST [BK][BQ], OT [D][BQ], and for 16-bit inputs K/V row tiles [BK][D].
template <typename T, typename C>
void fwd_block(const AttnShape& s, const In<T>& q, const In<T>& k, const In<T>& v, bool causal, C c,
               int64_t b, int64_t h, int64_t i0, T* out, C* lse, C* QT, C* ST, C* OT, C* Kw, C* Vw) {
  constexpr int W = Vec<C>::W, NV = kNV, BQ = NV * W;
  const int64_t D = s.D, hk = h / (s.Hq / s.Hk), nq = std::min<int64_t>(BQ, s.Lq - i0);
  pack_t(q, b, h, i0, nq, D, c, QT, BQ);
  std::fill(OT, OT + D * BQ, C(0));
  V<C> m[NV], l[NV];
  IV<C> iv[NV];
  for (int u = 0; u < NV; ++u) {
    m[u] = splat(kNegBig<C>);
    l[u] = V<C>{};
    iv[u] = lanes_from<C>(i0 + u * W);
  }
  // causal: query i0 + nq - 1 is the last one that sees anything of a later key
  const int64_t kend = causal ? std::min(s.Lk, i0 + nq) : s.Lk;
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdBK) {
    const int64_t nk = std::min(kFwdBK, kend - j0);
    const bool mask = causal && j0 + nk - 1 > i0;
    // S^T = k QT (causal mask), the block's max per query
    V<C> mx[NV];
    block_logits_t(k, b, hk, j0, nk, D, QT, ST, Kw, mask, iv, mx);
    int64_t vsl;
    const C* vp = rows_c(v, b, hk, j0, nk, D, Vw, &vsl);
    // online softmax: key 0 is in the first block and visible to every query, so m is a real
    // maximum from then on and masked scores give exactly 0
    V<C> alpha[NV], sum[NV];
    for (int u = 0; u < NV; ++u) {
      const V<C> mn = vmax<C>(m[u], mx[u]);
      alpha[u] = vexp2(m[u] - mn);
      m[u] = mn;
      sum[u] = V<C>{};
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int u = 0; u < NV; ++u) {
        const V<C> p = vexp2(vld(ST + j * BQ + u * W) - m[u]);
        vst(ST + j * BQ + u * W, p);
        sum[u] += p;
      }
    for (int u = 0; u < NV; ++u) l[u] = l[u] * alpha[u] + sum[u];
    // OT = alpha OT + v^T P^T, 4 head-dim rows at a time
    strips<kMRO>(D, [&](auto mr, int64_t d0) {
      constexpr int R = decltype(mr)::value;
      V<C> acc[R][NV];
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < NV; ++u) acc[r][u] = vld(OT + (d0 + r) * BQ + u * W) * alpha[u];
      mk<C, R, NV>(acc, vp + d0, 1, vsl, ST, BQ, nk);
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < NV; ++u) vst(OT + (d0 + r) * BQ + u * W, acc[r][u]);
    });
  }
  // epilogue: lse = ln2 (m + log2 l); out = OT^T / l
  alignas(64) C mrow[BQ];
  alignas(64) C lrow[BQ];
  for (int u = 0; u < NV; ++u) {
    vst(mrow + u * W, m[u]);
    vst(lrow + u * W, l[u]);
  }
  const int64_t row0 = (b * s.Hq + h) * s.Lq + i0;
  for (int64_t i = 0; i < nq; ++i) {
    lse[row0 + i] = C(kLn2 * (double(mrow[i]) + std::log2(double(lrow[i]))));
    const C inv = C(1) / lrow[i];
    T* o = out + (row0 + i) * D;
    for (int64_t d = 0; d < D; ++d) store(o, d, OT[d * BQ + i] * inv);
  }
}

template <typename T>
void attention_forward_t(const AttnShape& s, const In<T>& q, const In<T>& k, const In<T>& v, bool causal,
                         double scale, T* out, typename Compute<T>::type* lse) {
  using C = typename Compute<T>::type;
  constexpr int64_t BQ = kNV * Vec<C>::W, BK = kFwdBK;
  const int64_t D = s.D, nqb = (s.Lq + BQ - 1) / BQ, ntasks = s.B * s.Hq * nqb;
  const double flops = 4.0 * double(s.B * s.Hq) * double(s.Lq) * double(s.Lk) * double(D) * (causal ? 0.5 : 1.0);
  const int nthr = threads_for(flops, ntasks);
  constexpr bool wide = !std::is_same<T, C>::value;
  auto carve = [&](Carver& cv, C** QT, C** ST, C** OT, C** Kw, C** Vw) {
    *QT = cv.take<C>(D * BQ);
    *ST = cv.take<C>(BK * BQ);
    *OT = cv.take<C>(D * BQ);
    *Kw = wide ? cv.take<C>(BK * D) : nullptr;
    *Vw = wide ? cv.take<C>(BK * D) : nullptr;
  };
  C *QT, *ST, *OT, *Kw, *Vw;
  Carver sizing{nullptr};
  carve(sizing, &QT, &ST, &OT, &Kw, &Vw);
  const size_t per_thread = sizing.off;
  Arena arena(per_thread * size_t(nthr));
  const C c = C(scale * kLog2e);
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    Carver cv{arena.data() + per_thread * size_t(thread_id())};
    C *QT_, *ST_, *OT_, *Kw_, *Vw_;
    carve(cv, &QT_, &ST_, &OT_, &Kw_, &Vw_);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      // causal: the last query blocks have the most keys, so they go first
      const int64_t bh = t / nqb, qb = causal ? nqb - 1 - t % nqb : t % nqb;
      fwd_block<T, C>(s, q, k, v, causal, c, bh / s.Hq, bh % s.Hq, qb * BQ, out, lse, QT_, ST_, OT_, Kw_, Vw_);
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------

// Query rows per tile of the backwards (rows of the P and dS tiles): tuning only (128: the same).
constexpr int64_t kBwdBQ = 64;
// Backward tasks wanted from the shape alone (never the thread count, which must not change a bit):
// below this many (b, kv head) pairs a pair's work is split, first by its query heads, then by its
// keys (the file comment). 8: 2 threads get 4 tasks each, and the scratch of the partial sums stays
// under ~8 heads' worth of dQ or dK, dV.
constexpr int64_t kBwdMinTasks = 8;

// Task t = ((b Hk + hk) nsplit + split) nseg + seg: query heads [split G / nsplit, (split + 1) G /
// nsplit) of the group, key blocks seg, seg + nseg, ... (interleaved: causal work stays balanced).
struct BwdPlan {
  int64_t nkb, nsplit, nseg, nkbs;  // key blocks, head splits, key segments, blocks per segment at most
  int64_t ntasks;
};

BwdPlan bwd_plan(int64_t B, int64_t Hk, int64_t G, int64_t Lk, int64_t BK) {
  BwdPlan p;
  p.nkb = (Lk + BK - 1) / BK;
  const int64_t pairs = std::max<int64_t>(1, B * Hk), want = (kBwdMinTasks + pairs - 1) / pairs;
  p.nsplit = std::max<int64_t>(1, std::min(G, want));
  p.nseg = std::max<int64_t>(1, std::min(p.nkb, (want + p.nsplit - 1) / p.nsplit));
  p.nkbs = (p.nkb + p.nseg - 1) / p.nseg;
  p.ntasks = B * Hk * p.nsplit * p.nseg;
  return p;
}

// out[(o L + i) D + d] = f * sum over p < np, in order, of part[((o np + p) L + i) ldp + d]: the
// partial dQ (np = nseg) or dK, dV (np = nsplit) of the split tasks.
template <typename T, typename C>
void reduce_parts(T* out, const C* part, int64_t nouter, int64_t np, int64_t L, int64_t D, int64_t ldp, C f, int nthr) {
  const int64_t n = nouter * L;
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const int64_t o = r / L, i = r % L;
    const C* p0 = part + (o * np * L + i) * ldp;
    T* dst = out + r * D;
    for (int64_t d = 0; d < D; ++d) {
      C acc = p0[d];
      for (int64_t k = 1; k < np; ++k) acc += p0[k * L * ldp + d];
      store(dst, d, f * acc);
    }
  }
}

struct BwdTask {
  int64_t b, hk, split, seg, g0, g1;  // query heads hk G + [g0, g1) of the group
};

BwdTask task_of(const BwdPlan& p, int64_t t, int64_t Hk, int64_t G) {
  BwdTask x;
  x.seg = t % p.nseg;
  x.split = t / p.nseg % p.nsplit;
  x.hk = t / (p.nseg * p.nsplit) % Hk;
  x.b = t / (p.nseg * p.nsplit * Hk);
  x.g0 = x.split * G / p.nsplit;
  x.g1 = (x.split + 1) * G / p.nsplit;
  return x;
}

// XT[d][j] = x[j0 + j][d] (j < nk, else 0) for a [D][BK] tile; and optionally rows[j][d] (d < D,
// zero-padded to DP) for the dQ product.
template <typename T, typename C>
void pack_keys(const In<T>& x, int64_t b, int64_t h, int64_t j0, int64_t nk, int64_t D, int64_t BK, C* XT,
               C* rows, int64_t DP) {
  pack_t(x, b, h, j0, nk, D, C(1), XT, BK);
  if (rows) {
    for (int64_t j = 0; j < nk; ++j) {
      C* dst = rows + j * DP;
      widen_row(x.row(b, h, j0 + j), D, dst);
      for (int64_t d = D; d < DP; ++d) dst[d] = C(0);
    }
  }
}

// dQ[i][d] += sum_{j < nk} dS[i][j] krow[j][d] for rows [0, nq) of dQ (row stride DP), in chunks of
// up to 4 vectors of d.
template <typename C, int NVC>
FD_ATT_INLINE void dq_chunk(C* dq, int64_t DP, const C* dS, int64_t BK, const C* krow, int64_t nk, int64_t nq) {
  constexpr int W = Vec<C>::W;
  strips<kMRQ>(nq, [&](auto mr, int64_t ir) {
    constexpr int R = decltype(mr)::value;
    V<C> acc[R][NVC];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NVC; ++u) acc[r][u] = vld(dq + (ir + r) * DP + u * W);
    mk<C, R, NVC>(acc, dS + ir * BK, BK, 1, krow, DP, nk);
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NVC; ++u) vst(dq + (ir + r) * DP + u * W, acc[r][u]);
  });
}

template <typename C>
void dq_update(C* dq, int64_t DP, const C* dS, int64_t BK, const C* krow, int64_t nk, int64_t nq) {
  constexpr int W = Vec<C>::W;
  const int64_t nvd = DP / W;
  for (int64_t c0 = 0; c0 < nvd; c0 += 4) {
    C* q = dq + c0 * W;
    const C* kr = krow + c0 * W;
    switch (std::min<int64_t>(4, nvd - c0)) {
      case 4: dq_chunk<C, 4>(q, DP, dS, BK, kr, nk, nq); break;
      case 3: dq_chunk<C, 3>(q, DP, dS, BK, kr, nk, nq); break;
      case 2: dq_chunk<C, 2>(q, DP, dS, BK, kr, nk, nq); break;
      default: dq_chunk<C, 1>(q, DP, dS, BK, kr, nk, nq); break;
    }
  }
}

// accT[d][j] += sum_{i < nq} x[i][d] g[i][j] for d < D: the dK^T / dV^T products (x rows of stride
// xsl, g a [BQ][BK] tile).
template <typename C>
void dkv_update(C* accT, int64_t BK, const C* x, int64_t xsl, const C* g, int64_t D, int64_t nq) {
  constexpr int W = Vec<C>::W, NV = kNV;
  strips<kMRO>(D, [&](auto mr, int64_t d0) {
    constexpr int R = decltype(mr)::value;
    V<C> acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) acc[r][u] = vld(accT + (d0 + r) * BK + u * W);
    mk<C, R, NV>(acc, x + d0, 1, xsl, g, BK, nq);
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) vst(accT + (d0 + r) * BK + u * W, acc[r][u]);
  });
}

// out rows [j0, j0 + nk) of a contiguous [.., L, D] tensor at row0 = f * accT^T.
template <typename T, typename C>
void store_t(T* out, int64_t row0, int64_t nk, int64_t D, const C* accT, int64_t BK, C f) {
  for (int64_t j = 0; j < nk; ++j) {
    T* o = out + (row0 + j) * D;
    for (int64_t d = 0; d < D; ++d) store(o, d, f * accT[d * BK + j]);
  }
}

template <typename T>
void attention_backward_t(const AttnShape& s, const In<T>& q, const In<T>& k, const In<T>& v, const T* out,
                          const T* dout, const typename Compute<T>::type* lse, bool causal, double scale, T* dq,
                          T* dk, T* dv) {
  using C = typename Compute<T>::type;
  constexpr int W = Vec<C>::W, NV = kNV;
  constexpr int64_t BK = NV * W, BQ = kBwdBQ;
  const int64_t D = s.D, DP = (D + W - 1) / W * W, G = s.Hq / s.Hk, Lq = s.Lq, Lk = s.Lk;
  const BwdPlan plan = bwd_plan(s.B, s.Hk, G, Lk, BK);
  const int64_t nseg = plan.nseg, nsplit = plan.nsplit;
  const double flops = 10.0 * double(s.B * s.Hq) * double(Lq) * double(Lk) * double(D);
  const int nthr = threads_for(flops, plan.ntasks);
  constexpr bool wide = !std::is_same<T, C>::value;
  struct Scratch {
    C *KT, *VT, *Krow, *P, *dS, *dKT, *dVT, *dQ, *delta, *lse2, *Qw, *dOw;
  };
  auto carve = [&](Carver& cv) {
    Scratch x;
    x.KT = cv.take<C>(D * BK);
    x.VT = cv.take<C>(D * BK);
    x.Krow = cv.take<C>(BK * DP);
    x.P = cv.take<C>(BQ * BK);
    x.dS = cv.take<C>(BQ * BK);
    x.dKT = cv.take<C>(plan.nkbs * D * BK);
    x.dVT = cv.take<C>(plan.nkbs * D * BK);
    x.dQ = nseg == 1 ? cv.take<C>(Lq * DP) : nullptr;
    x.delta = cv.take<C>(Lq);
    x.lse2 = cv.take<C>(Lq);
    x.Qw = wide ? cv.take<C>(Lq * D) : nullptr;
    x.dOw = wide ? cv.take<C>(Lq * D) : nullptr;
    return x;
  };
  Carver sizing{nullptr};
  carve(sizing);
  const size_t per_thread = sizing.off;
  // partial sums of split tasks: dQ [B Hq][nseg][Lq][DP] when the keys are split, dK and dV
  // [B Hk][nsplit][Lk][D] when the heads are
  C *partQ, *partK, *partV;
  auto carve_parts = [&](Carver& cv) {
    cv.off = per_thread * size_t(nthr);
    partQ = nseg > 1 ? cv.take<C>(s.B * s.Hq * nseg * Lq * DP) : nullptr;
    partK = nsplit > 1 ? cv.take<C>(s.B * s.Hk * nsplit * Lk * D) : nullptr;
    partV = nsplit > 1 ? cv.take<C>(s.B * s.Hk * nsplit * Lk * D) : nullptr;
  };
  Carver sizing_parts{nullptr};
  carve_parts(sizing_parts);
  Arena arena(sizing_parts.off);
  Carver real_parts{arena.data()};
  carve_parts(real_parts);
  const C c = C(scale * kLog2e), f = C(scale);
  const In<T> do_in{dout, s.Hq * Lq * D, Lq * D, D};
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    Carver cv{arena.data() + per_thread * size_t(thread_id())};
    const Scratch x = carve(cv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < plan.ntasks; ++t) {
      const BwdTask tk = task_of(plan, t, s.Hk, G);
      const int64_t b = tk.b, hk = tk.hk, seg = tk.seg;
      std::fill(x.dKT, x.dKT + plan.nkbs * D * BK, C(0));
      std::fill(x.dVT, x.dVT + plan.nkbs * D * BK, C(0));
      for (int64_t g = tk.g0; g < tk.g1; ++g) {
        const int64_t h = hk * G + g, row0 = (b * s.Hq + h) * Lq;
        int64_t qsl, dosl;
        const C* qp = rows_c(q, b, h, 0, Lq, D, x.Qw, &qsl);
        const C* dop = rows_c(do_in, b, h, 0, Lq, D, x.dOw, &dosl);
        for (int64_t i = 0; i < Lq; ++i) {
          const T *o = out + (row0 + i) * D, *dor = dout + (row0 + i) * D;
          C acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += C(load(dor, d)) * C(load(o, d));
          x.delta[i] = acc;
          x.lse2[i] = lse[row0 + i] * C(kLog2e);
        }
        C* dQ = nseg == 1 ? x.dQ : partQ + ((b * s.Hq + h) * nseg + seg) * Lq * DP;
        std::fill(dQ, dQ + Lq * DP, C(0));
        for (int64_t kb = seg, tb = 0; kb < plan.nkb; kb += nseg, ++tb) {
          const int64_t j0 = kb * BK, nk = std::min(BK, Lk - j0);
          if (causal && j0 >= Lq) continue;  // no query sees these keys: dK = dV = 0
          pack_keys(k, b, hk, j0, nk, D, BK, x.KT, x.Krow, DP);
          pack_keys<T, C>(v, b, hk, j0, nk, D, BK, x.VT, nullptr, DP);
          C* dKT = x.dKT + tb * D * BK;
          C* dVT = x.dVT + tb * D * BK;
          IV<C> jv[NV];
          for (int u = 0; u < NV; ++u) jv[u] = lanes_from<C>(j0 + u * W);
          // causal: query i sees key j0 iff i >= j0, so the rows start at j0 (only the first tile
          // then needs the mask, with BQ = BK)
          for (int64_t i0 = causal ? j0 : 0; i0 < Lq; i0 += BQ) {
            const int64_t nq = std::min(BQ, Lq - i0);
            const bool mask = (causal && j0 + nk - 1 > i0) || nk < BK;
            strips<kMR>(nq, [&](auto mr, int64_t ir) {
              constexpr int R = decltype(mr)::value;
              V<C> acc[R][NV] = {};
              mk<C, R, NV>(acc, qp + (i0 + ir) * qsl, qsl, 1, x.KT, BK, D);
              for (int r = 0; r < R; ++r) {
                const int64_t i = i0 + ir + r;
                const C l2 = x.lse2[i];
                const IV<C> lim = isplat<C>(causal ? std::min(i, Lk - 1) : Lk - 1);
                for (int u = 0; u < NV; ++u) {
                  V<C> p = vexp2(acc[r][u] * c - l2);
                  if (mask) p = jv[u] > lim ? V<C>{} : p;
                  vst(x.P + (ir + r) * BK + u * W, p);
                }
              }
              V<C> dp[R][NV] = {};
              mk<C, R, NV>(dp, dop + (i0 + ir) * dosl, dosl, 1, x.VT, BK, D);
              for (int r = 0; r < R; ++r) {
                const C dl = x.delta[i0 + ir + r];
                for (int u = 0; u < NV; ++u)
                  vst(x.dS + (ir + r) * BK + u * W, vld(x.P + (ir + r) * BK + u * W) * (dp[r][u] - dl));
              }
            });
            dkv_update(dVT, BK, dop + i0 * dosl, dosl, x.P, D, nq);
            dkv_update(dKT, BK, qp + i0 * qsl, qsl, x.dS, D, nq);
            dq_update(dQ + i0 * DP, DP, x.dS, BK, x.Krow, nk, nq);
          }
        }
        if (nseg == 1)
          for (int64_t i = 0; i < Lq; ++i) {
            T* o = dq + (row0 + i) * D;
            for (int64_t d = 0; d < D; ++d) store(o, d, f * dQ[i * DP + d]);
          }
      }
      for (int64_t kb = seg, tb = 0; kb < plan.nkb; kb += nseg, ++tb) {
        const int64_t j0 = kb * BK, nk = std::min(BK, Lk - j0);
        if (nsplit == 1) {
          const int64_t row0 = (b * s.Hk + hk) * Lk + j0;
          store_t(dk, row0, nk, D, x.dKT + tb * D * BK, BK, f);
          store_t(dv, row0, nk, D, x.dVT + tb * D * BK, BK, C(1));
        } else {
          const int64_t row0 = ((b * s.Hk + hk) * nsplit + tk.split) * Lk + j0;
          store_t(partK, row0, nk, D, x.dKT + tb * D * BK, BK, C(1));
          store_t(partV, row0, nk, D, x.dVT + tb * D * BK, BK, C(1));
        }
      }
    }
  }
  if (nseg > 1) reduce_parts(dq, partQ, s.B * s.Hq, nseg, Lq, D, DP, f, nthr);
  if (nsplit > 1) {
    reduce_parts(dk, partK, s.B * s.Hk, nsplit, Lk, D, D, f, nthr);
    reduce_parts(dv, partV, s.B * s.Hk, nsplit, Lk, D, D, C(1), nthr);
  }
}

// ---- attention KD forward -----------------------------------------------------------------------

struct KdShape {
  int64_t B, H, Hks, Hkt, Lq, Lk, Ds, Dt;
};

// One query block of the KD forward: kl, lse_s, lse_t for rows [i0, i0 + nq) of head (b, h).
template <typename T, typename C>
void kd_fwd_block(const KdShape& s, const In<T>& qs, const In<T>& ks, const In<T>& qt, const In<T>& kt, bool causal,
                  C cs, C ct, int64_t b, int64_t h, int64_t i0, C* kl, C* lse_s, C* lse_t, C* QsT, C* QtT, C* ST,
                  C* TT, C* Ksw, C* Ktw) {
  constexpr int W = Vec<C>::W, NV = kNV, BQ = NV * W;
  const int64_t nq = std::min<int64_t>(BQ, s.Lq - i0);
  const int64_t hks = h / (s.H / s.Hks), hkt = h / (s.H / s.Hkt);
  pack_t(qs, b, h, i0, nq, s.Ds, cs, QsT, BQ);
  pack_t(qt, b, h, i0, nq, s.Dt, ct, QtT, BQ);
  V<C> ms[NV], ls[NV], mt[NV], lt[NV], ut[NV];
  IV<C> iv[NV];
  for (int u = 0; u < NV; ++u) {
    ms[u] = mt[u] = splat(kNegBig<C>);
    ls[u] = lt[u] = ut[u] = V<C>{};
    iv[u] = lanes_from<C>(i0 + u * W);
  }
  const int64_t kend = causal ? std::min(s.Lk, i0 + nq) : s.Lk;
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdBK) {
    const int64_t nk = std::min(kFwdBK, kend - j0);
    const bool mask = causal && j0 + nk - 1 > i0;
    V<C> mxs[NV], mxt[NV];  // the two sides' logits (S^T, T^T) and block maxima
    block_logits_t(ks, b, hks, j0, nk, s.Ds, QsT, ST, Ksw, mask, iv, mxs);
    block_logits_t(kt, b, hkt, j0, nk, s.Dt, QtT, TT, Ktw, mask, iv, mxt);
    V<C> sums[NV], sumt[NV], sumu[NV];
    for (int u = 0; u < NV; ++u) {
      const V<C> ns = vmax<C>(ms[u], mxs[u]), nt = vmax<C>(mt[u], mxt[u]);
      const V<C> as = vexp2(ms[u] - ns), at = vexp2(mt[u] - nt);
      ms[u] = ns;
      mt[u] = nt;
      ls[u] *= as;
      lt[u] *= at;
      ut[u] *= at;
      sums[u] = sumt[u] = sumu[u] = V<C>{};
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int u = 0; u < NV; ++u) {
        const V<C> sv = vld(ST + j * BQ + u * W), tv = vld(TT + j * BQ + u * W);
        const V<C> pt = vexp2(tv - mt[u]);
        sumt[u] += pt;
        sumu[u] += pt * (tv - sv);  // masked: both kNegBig, 0
        sums[u] += vexp2(sv - ms[u]);
      }
    for (int u = 0; u < NV; ++u) {
      ls[u] += sums[u];
      lt[u] += sumt[u];
      ut[u] += sumu[u];
    }
  }
  alignas(64) C a_ms[BQ];
  alignas(64) C a_ls[BQ];
  alignas(64) C a_mt[BQ];
  alignas(64) C a_lt[BQ];
  alignas(64) C a_u[BQ];
  for (int u = 0; u < NV; ++u) {
    vst(a_ms + u * W, ms[u]);
    vst(a_ls + u * W, ls[u]);
    vst(a_mt + u * W, mt[u]);
    vst(a_lt + u * W, lt[u]);
    vst(a_u + u * W, ut[u]);
  }
  const int64_t row0 = (b * s.H + h) * s.Lq + i0;
  for (int64_t i = 0; i < nq; ++i) {
    // in double: the KL is a difference of O(log Lk) terms
    const double Ls = kLn2 * (double(a_ms[i]) + std::log2(double(a_ls[i])));
    const double Lt = kLn2 * (double(a_mt[i]) + std::log2(double(a_lt[i])));
    const double A = kLn2 * double(a_u[i]) / double(a_lt[i]);
    lse_s[row0 + i] = C(Ls);
    lse_t[row0 + i] = C(Lt);
    kl[row0 + i] = C(A - Lt + Ls);
  }
}

template <typename T>
void attention_kd_forward_t(const KdShape& s, const In<T>& qs, const In<T>& ks, const In<T>& qt, const In<T>& kt,
                            bool causal, double scale_s, double scale_t, typename Compute<T>::type* kl,
                            typename Compute<T>::type* lse_s, typename Compute<T>::type* lse_t) {
  using C = typename Compute<T>::type;
  constexpr int64_t BQ = kNV * Vec<C>::W, BK = kFwdBK;
  const int64_t nqb = (s.Lq + BQ - 1) / BQ, ntasks = s.B * s.H * nqb;
  const double flops =
      2.0 * double(s.B * s.H) * double(s.Lq) * double(s.Lk) * double(s.Ds + s.Dt) * (causal ? 0.5 : 1.0);
  const int nthr = threads_for(flops, ntasks);
  constexpr bool wide = !std::is_same<T, C>::value;
  struct Scratch {
    C *QsT, *QtT, *ST, *TT, *Ksw, *Ktw;
  };
  auto carve = [&](Carver& cv) {
    Scratch x;
    x.QsT = cv.take<C>(s.Ds * BQ);
    x.QtT = cv.take<C>(s.Dt * BQ);
    x.ST = cv.take<C>(BK * BQ);
    x.TT = cv.take<C>(BK * BQ);
    x.Ksw = wide ? cv.take<C>(BK * s.Ds) : nullptr;
    x.Ktw = wide ? cv.take<C>(BK * s.Dt) : nullptr;
    return x;
  };
  Carver sizing{nullptr};
  carve(sizing);
  const size_t per_thread = sizing.off;
  Arena arena(per_thread * size_t(nthr));
  const C cs = C(scale_s * kLog2e), ct = C(scale_t * kLog2e);
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    Carver cv{arena.data() + per_thread * size_t(thread_id())};
    const Scratch x = carve(cv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t bh = t / nqb, qb = causal ? nqb - 1 - t % nqb : t % nqb;
      kd_fwd_block<T, C>(s, qs, ks, qt, kt, causal, cs, ct, bh / s.H, bh % s.H, qb * BQ, kl, lse_s, lse_t, x.QsT,
                         x.QtT, x.ST, x.TT, x.Ksw, x.Ktw);
    }
  }
}

// ---- attention KD backward ----------------------------------------------------------------------

template <typename T>
void attention_kd_backward_t(const KdShape& s, const In<T>& qs, const In<T>& ks, const In<T>& qt, const In<T>& kt,
                             const typename Compute<T>::type* lse_s, const typename Compute<T>::type* lse_t,
                             const typename Compute<T>::type* gr, bool causal, double scale_s, double scale_t,
                             T* dqs, T* dks) {
  using C = typename Compute<T>::type;
  constexpr int W = Vec<C>::W, NV = kNV;
  constexpr int64_t BK = NV * W, BQ = kBwdBQ;
  const int64_t Ds = s.Ds, Dt = s.Dt, DP = (Ds + W - 1) / W * W, G = s.H / s.Hks, Lq = s.Lq, Lk = s.Lk;
  const BwdPlan plan = bwd_plan(s.B, s.Hks, G, Lk, BK);
  const int64_t nseg = plan.nseg, nsplit = plan.nsplit;
  const double flops = 2.0 * double(s.B * s.H) * double(Lq) * double(Lk) * double(3 * Ds + Dt);
  const int nthr = threads_for(flops, plan.ntasks);
  constexpr bool wide = !std::is_same<T, C>::value;
  struct Scratch {
    C *KsT, *KtT, *Ksrow, *dS, *dKT, *dQ, *ls2, *lt2, *Qsw, *Qtw;
  };
  auto carve = [&](Carver& cv) {
    Scratch x;
    x.KsT = cv.take<C>(Ds * BK);
    x.KtT = cv.take<C>(Dt * BK);
    x.Ksrow = cv.take<C>(BK * DP);
    x.dS = cv.take<C>(BQ * BK);
    x.dKT = cv.take<C>(plan.nkbs * Ds * BK);
    x.dQ = nseg == 1 ? cv.take<C>(Lq * DP) : nullptr;
    x.ls2 = cv.take<C>(Lq);
    x.lt2 = cv.take<C>(Lq);
    x.Qsw = wide ? cv.take<C>(Lq * Ds) : nullptr;
    x.Qtw = wide ? cv.take<C>(Lq * Dt) : nullptr;
    return x;
  };
  Carver sizing{nullptr};
  carve(sizing);
  const size_t per_thread = sizing.off;
  // partial sums of split tasks (as attention_backward_t)
  C *partQ, *partK;
  auto carve_parts = [&](Carver& cv) {
    cv.off = per_thread * size_t(nthr);
    partQ = nseg > 1 ? cv.take<C>(s.B * s.H * nseg * Lq * DP) : nullptr;
    partK = nsplit > 1 ? cv.take<C>(s.B * s.Hks * nsplit * Lk * Ds) : nullptr;
  };
  Carver sizing_parts{nullptr};
  carve_parts(sizing_parts);
  Arena arena(sizing_parts.off);
  Carver real_parts{arena.data()};
  carve_parts(real_parts);
  const C cs = C(scale_s * kLog2e), ct = C(scale_t * kLog2e), f = C(scale_s);
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    Carver cv{arena.data() + per_thread * size_t(thread_id())};
    const Scratch x = carve(cv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < plan.ntasks; ++t) {
      const BwdTask tk = task_of(plan, t, s.Hks, G);
      const int64_t b = tk.b, hk = tk.hk, seg = tk.seg;
      std::fill(x.dKT, x.dKT + plan.nkbs * Ds * BK, C(0));
      for (int64_t g = tk.g0; g < tk.g1; ++g) {
        const int64_t h = hk * G + g, ht = h / (s.H / s.Hkt), row0 = (b * s.H + h) * Lq;
        int64_t qssl, qtsl;
        const C* qsp = rows_c(qs, b, h, 0, Lq, Ds, x.Qsw, &qssl);
        const C* qtp = rows_c(qt, b, h, 0, Lq, Dt, x.Qtw, &qtsl);
        for (int64_t i = 0; i < Lq; ++i) {
          x.ls2[i] = lse_s[row0 + i] * C(kLog2e);
          x.lt2[i] = lse_t[row0 + i] * C(kLog2e);
        }
        C* dQ = nseg == 1 ? x.dQ : partQ + ((b * s.H + h) * nseg + seg) * Lq * DP;
        std::fill(dQ, dQ + Lq * DP, C(0));
        for (int64_t kb = seg, tb = 0; kb < plan.nkb; kb += nseg, ++tb) {
          const int64_t j0 = kb * BK, nk = std::min(BK, Lk - j0);
          if (causal && j0 >= Lq) continue;
          pack_keys(ks, b, hk, j0, nk, Ds, BK, x.KsT, x.Ksrow, DP);
          pack_keys<T, C>(kt, b, ht, j0, nk, Dt, BK, x.KtT, nullptr, DP);
          C* dKT = x.dKT + tb * Ds * BK;
          IV<C> jv[NV];
          for (int u = 0; u < NV; ++u) jv[u] = lanes_from<C>(j0 + u * W);
          for (int64_t i0 = causal ? j0 : 0; i0 < Lq; i0 += BQ) {
            const int64_t nq = std::min(BQ, Lq - i0);
            const bool mask = (causal && j0 + nk - 1 > i0) || nk < BK;
            strips<kMR>(nq, [&](auto mr, int64_t ir) {
              constexpr int R = decltype(mr)::value;
              V<C> acc[R][NV] = {};
              mk<C, R, NV>(acc, qsp + (i0 + ir) * qssl, qssl, 1, x.KsT, BK, Ds);
              for (int r = 0; r < R; ++r) {
                const C l2 = x.ls2[i0 + ir + r];
                for (int u = 0; u < NV; ++u) vst(x.dS + (ir + r) * BK + u * W, vexp2(acc[r][u] * cs - l2));
              }
              V<C> at[R][NV] = {};
              mk<C, R, NV>(at, qtp + (i0 + ir) * qtsl, qtsl, 1, x.KtT, BK, Dt);
              for (int r = 0; r < R; ++r) {
                const int64_t i = i0 + ir + r;
                const C l2 = x.lt2[i], gi = gr[row0 + i];
                const IV<C> lim = isplat<C>(causal ? std::min(i, Lk - 1) : Lk - 1);
                for (int u = 0; u < NV; ++u) {
                  C* d = x.dS + (ir + r) * BK + u * W;
                  V<C> ds = gi * (vld(d) - vexp2(at[r][u] * ct - l2));
                  if (mask) ds = jv[u] > lim ? V<C>{} : ds;
                  vst(d, ds);
                }
              }
            });
            dkv_update(dKT, BK, qsp + i0 * qssl, qssl, x.dS, Ds, nq);
            dq_update(dQ + i0 * DP, DP, x.dS, BK, x.Ksrow, nk, nq);
          }
        }
        if (nseg == 1)
          for (int64_t i = 0; i < Lq; ++i) {
            T* o = dqs + (row0 + i) * Ds;
            for (int64_t d = 0; d < Ds; ++d) store(o, d, f * dQ[i * DP + d]);
          }
      }
      for (int64_t kb = seg, tb = 0; kb < plan.nkb; kb += nseg, ++tb) {
        const int64_t j0 = kb * BK, nk = std::min(BK, Lk - j0);
        if (nsplit == 1)
          store_t(dks, (b * s.Hks + hk) * Lk + j0, nk, Ds, x.dKT + tb * Ds * BK, BK, f);
        else
          store_t(partK, ((b * s.Hks + hk) * nsplit + tk.split) * Lk + j0, nk, Ds, x.dKT + tb * Ds * BK, BK, C(1));
      }
    }
  }
  if (nseg > 1) reduce_parts(dqs, partQ, s.B * s.H, nseg, Lq, Ds, DP, f, nthr);
  if (nsplit > 1) reduce_parts(dks, partK, s.B * s.Hks, nsplit, Lk, Ds, Ds, f, nthr);
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void attention_forward(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                       uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                       uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                       uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                       bool causal, double scale, uintptr_t out, uintptr_t lse, uintptr_t stream) {
  (void)stream;
  if (B <= 0 || Hq <= 0 || Lq <= 0) return;
  const AttnShape s{B, Hq, Hk, Lq, Lk, D};
  sched::dispatch_dtype(dtype, "attention_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    attention_forward_t<T>(s, in<T>(q, q_sb, q_sh, q_sl), in<T>(k, k_sb, k_sh, k_sl), in<T>(v, v_sb, v_sh, v_sl),
                           causal, scale, reinterpret_cast<T*>(out), reinterpret_cast<C*>(lse));
  });
}

void attention_backward(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                        uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                        uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                        uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                        uintptr_t out, uintptr_t dout, uintptr_t lse, bool causal, double scale,
                        uintptr_t dq, uintptr_t dk, uintptr_t dv,
                        uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  (void)workspace;
  (void)workspace_bytes;
  (void)stream;
  if (B <= 0 || Hk <= 0) return;
  const AttnShape s{B, Hq, Hk, Lq, Lk, D};
  sched::dispatch_dtype(dtype, "attention_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    attention_backward_t<T>(s, in<T>(q, q_sb, q_sh, q_sl), in<T>(k, k_sb, k_sh, k_sl), in<T>(v, v_sb, v_sh, v_sl),
                            reinterpret_cast<const T*>(out), reinterpret_cast<const T*>(dout),
                            reinterpret_cast<const C*>(lse), causal, scale, reinterpret_cast<T*>(dq),
                            reinterpret_cast<T*>(dk), reinterpret_cast<T*>(dv));
  });
}

int64_t attention_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk,
                                           int64_t D) {
  (void)dtype, (void)B, (void)Hq, (void)Hk, (void)Lq, (void)Lk, (void)D;
  return 0;  // the CPU kernel allocates its own scratch
}

void attention_kd_forward(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                          int64_t Ds, int64_t Dt,
                          uintptr_t qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                          uintptr_t ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                          uintptr_t qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                          uintptr_t kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                          bool causal, double scale_s, double scale_t,
                          uintptr_t kl, uintptr_t lse_s, uintptr_t lse_t, uintptr_t stream) {
  (void)stream;
  if (B <= 0 || H <= 0 || Lq <= 0) return;
  const KdShape s{B, H, Hks, Hkt, Lq, Lk, Ds, Dt};
  sched::dispatch_dtype(dtype, "attention_kd_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    attention_kd_forward_t<T>(s, in<T>(qs, qs_sb, qs_sh, qs_sl), in<T>(ks, ks_sb, ks_sh, ks_sl),
                              in<T>(qt, qt_sb, qt_sh, qt_sl), in<T>(kt, kt_sb, kt_sh, kt_sl), causal, scale_s,
                              scale_t, reinterpret_cast<C*>(kl), reinterpret_cast<C*>(lse_s),
                              reinterpret_cast<C*>(lse_t));
  });
}

void attention_kd_backward(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                           int64_t Ds, int64_t Dt,
                           uintptr_t qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                           uintptr_t ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                           uintptr_t qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                           uintptr_t kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                           uintptr_t lse_s, uintptr_t lse_t, uintptr_t g, bool causal, double scale_s,
                           double scale_t, uintptr_t dqs, uintptr_t dks,
                           uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  (void)workspace;
  (void)workspace_bytes;
  (void)stream;
  if (B <= 0 || Hks <= 0) return;
  const KdShape s{B, H, Hks, Hkt, Lq, Lk, Ds, Dt};
  sched::dispatch_dtype(dtype, "attention_kd_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename Compute<T>::type;
    attention_kd_backward_t<T>(s, in<T>(qs, qs_sb, qs_sh, qs_sl), in<T>(ks, ks_sb, ks_sh, ks_sl),
                               in<T>(qt, qt_sb, qt_sh, qt_sl), in<T>(kt, kt_sb, kt_sh, kt_sl),
                               reinterpret_cast<const C*>(lse_s), reinterpret_cast<const C*>(lse_t),
                               reinterpret_cast<const C*>(g), causal, scale_s, scale_t, reinterpret_cast<T*>(dqs),
                               reinterpret_cast<T*>(dks));
  });
}

int64_t attention_kd_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt,
                                              int64_t Lq, int64_t Lk, int64_t Ds, int64_t Dt) {
  (void)dtype, (void)B, (void)H, (void)Hks, (void)Hkt, (void)Lq, (void)Lk, (void)Ds, (void)Dt;
  return 0;  // the CPU kernel allocates its own scratch
}

}  // namespace cpu
}  // namespace flashdistill
