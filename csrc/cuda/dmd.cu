// DMD / DMD2 generator loss, forward, CUDA backend (ABI: csrc/README.md; spec: kernels/dmd/reference.py).
//
// Math, per sample b (row of D elements), in the compute type C (float; double for float64):
//   r    = real_uncond ? uncond + w_b (real - uncond) : real        w_b = guidance[b] or guidance_scale
//   S1_b = sum_i |x - r|                     n_b = clamp_min_nan(S1_b / D, eps)   (NaN passes through)
//   g    = nan_to_num((fake - r) / n_b)      stored rounded to the dtype
//   loss = 0.5 * sum_{b,i} g^2 / (B D)       g^2 of the unrounded g
//
// Three kernels, no atomics, every sum in a fixed order that depends only on (dtype, B, D):
//   1. dmd_absdiff_partials  one block per (row b, chunk c): sum |x - r| over the chunk -> ws1[b, c]
//   2. dmd_grad_partials     same blocks: n_b from the n_chunks partials ws1[b, :] (every block of a
//                            row sums them in the same order, so all agree bit for bit), then g over
//                            the chunk, stored, and sum g^2 -> ws2[b, c]
//   3. dmd_loss_final        one block: loss = 0.5 * sum(ws2) / (B D)
// The grid is 1-D, B * n_chunks blocks, block k = (b, c) = (k / n_chunks, k % n_chunks): the same
// layout as a (n_chunks, B) grid without the 65535 cap on gridDim.y.
//
// Traffic per element, b = bytes of the dtype (4 f32, 2 f16/bf16, 8 f64); without (with) guidance:
//   kernel 1  reads x, real (, uncond)            2b (3b)      writes nothing per element
//   kernel 2  reads real (, uncond), fake         2b (3b)      writes g: b
//   total     5b (7b)  against the minimum 4b (5b) of reading every input once and writing g.
//   e.g. bf16: 10 (14) bytes/element, minimum 8 (10); f32: 20 (28), minimum 16 (20).
// The second read of real (and uncond) is the price of exactness: n_b needs the whole row's S1 before
// the first g of that row can be formed, and g must be divided by the final n_b, not a running one.
// The partials are 2 * B * n_chunks values of C (<= ~16 KiB): negligible.
// Flops per element: kernel 1: 2 (|x - r| and the add) + 3 for cfg; kernel 2: fake - r, one IEEE
// division, nan_to_num's compares, g^2 as one FMA: ~4 + the division (~10 instructions in f32) + 3 for
// cfg; + dtype conversions. That is < 1 flop/byte against a ridge of ~20 (H100 f32: 67 TFLOP/s over
// 3.35 TB/s; f64: ~10): every path is bandwidth-bound, so the division (exact, as the reference) and
// the 64-bit index arithmetic cost no time.
//
// What the L2 (50 MB on H100 and H200) buys: kernel 1 loads x with an evict-first hint and real
// (, uncond) with the default policy, so at its end L2 holds mostly the real (, uncond) bytes it read
// last. When real (+ uncond) of the whole batch fits (B D b up to ~40 MB, e.g. 10 M f32 or 20 M bf16
// elements without guidance) kernel 2's second read comes from L2 and DRAM traffic is the minimum
// 4b (5b). Larger tensors: kernel 2 walks its blocks in reverse, so it starts on the chunks kernel 1
// read last (still in L2); the hit fraction falls off as ~L2 / (bytes of real + uncond).
//
// Vectorization: 128-bit loads/stores (4 f32, 8 f16/bf16, 2 f64 per access) when every row of every
// operand the kernel touches starts on a 16-byte boundary (base pointer, and bstride * b when B > 1;
// g is contiguous, so its rows are aligned iff g is and D * b % 16 == 0). Otherwise, and for the last
// partial group of a row, elements are loaded one by one. Thread t handles the groups of V elements
// q = t, t + blockDim, ... of its chunk, and within a group elements j = 0..V-1, in both paths, and
// both paths run the same compute code: the sums are bitwise independent of alignment.
//
// Conversions: loads of f16 and bf16 are exact (cvt.f32.f16; a 16-bit shift for bf16). Stores use
// cvt.rn.f16.f32 / cvt.rn.bf16.f32, which round to nearest even with subnormals and overflow to inf,
// exactly as common.h's to_f16 / to_bf16 for every non-NaN value; g never is NaN (nan_to_num), so the
// stored bits equal the CPU backend's for the same g.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/dmd.h"  // per-element math shared with the CPU backend
#include "ops.h"

#if defined(__USE_FAST_MATH__)
#error "csrc/cuda/dmd.cu must not be built with --use_fast_math: it flushes subnormals and approximates the division"
#endif

namespace flashdistill {
namespace gpu {
namespace {

constexpr int kThreads = 256;          // kernels 1 and 2 (any multiple of 32 up to 1024 works)
constexpr int kFinalThreads = 1024;    // kernel 3
constexpr int64_t kTargetBlocks = 1024;     // ~7.8 blocks of 256 threads per SM on 132 SMs
constexpr int64_t kMinTilesPerChunk = 2;    // a chunk is >= 2 tiles of kThreads * V elements if D allows

static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block reductions need whole warps");
static_assert(kFinalThreads % 32 == 0 && kFinalThreads <= 1024, "block reductions need whole warps");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- work split: a function of (element size, B, D) only, shared by the workspace query ----------

struct Plan {
  int64_t n_chunks;  // chunks per row (0 when B * D == 0)
  int64_t chunk;     // elements per chunk, a multiple of kThreads * V; the last chunk may be shorter
};

Plan make_plan(int64_t elem_bytes, int64_t B, int64_t D) {
  if (B <= 0 || D <= 0) return {0, 0};
  const int64_t vec = 16 / elem_bytes, tile = kThreads * vec;
  const int64_t tiles = ceil_div(D, tile);                                // tiles per row
  const int64_t want = ceil_div(kTargetBlocks, B);                        // chunks for the target grid
  const int64_t most = std::max<int64_t>(1, tiles / kMinTilesPerChunk);   // keep chunks >= 2 tiles
  const int64_t n = std::min(want, most);
  const int64_t chunk = ceil_div(tiles, n) * tile;
  return {ceil_div(D, chunk), chunk};  // <= n chunks, none empty: (n_chunks - 1) * chunk < D
}

int64_t elem_bytes_of(int64_t dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    case kFloat64: return 8;
    default:
      throw std::invalid_argument("flashdistill dmd_forward (cuda): unknown dtype code " +
                                  std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16, 3 float64)");
  }
}

int64_t compute_bytes_of(int64_t dtype) { return dtype == kFloat64 ? 8 : 4; }

// ---- element conversion on the device ------------------------------------------------------------

__device__ __forceinline__ float to_c(float v) { return v; }
__device__ __forceinline__ double to_c(double v) { return v; }
__device__ __forceinline__ float to_c(f16_t v) { return __half2float(__ushort_as_half(v.bits)); }
__device__ __forceinline__ float to_c(bf16_t v) { return to_float(v); }  // common.h: exact 16-bit shift

template <typename T> struct FromC;
template <> struct FromC<float> { __device__ static float cvt(float v) { return v; } };
template <> struct FromC<double> { __device__ static double cvt(double v) { return v; } };
template <> struct FromC<f16_t> {
  __device__ static f16_t cvt(float v) { return f16_t{__half_as_ushort(__float2half_rn(v))}; }
};
template <> struct FromC<bf16_t> {
  __device__ static bf16_t cvt(float v) { return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(v))}; }
};

// ---- 128-bit packs -------------------------------------------------------------------------------

template <typename T> struct Pack {
  static constexpr int n = int(16 / sizeof(T));
  T v[n];
};
static_assert(sizeof(Pack<float>) == 16 && sizeof(Pack<double>) == 16, "pack size");
static_assert(sizeof(Pack<f16_t>) == 16 && sizeof(Pack<bf16_t>) == 16, "pack size");

enum class Cache { kKeep, kStream };  // kStream: evict-first (read once, or last use)

template <Cache kCache, typename T>
__device__ __forceinline__ void load_pack(Pack<T>& out, const T* p) {  // p is 16-byte aligned
  const uint4* q = reinterpret_cast<const uint4*>(p);
  const uint4 u = kCache == Cache::kStream ? __ldcs(q) : __ldg(q);
  memcpy(&out, &u, 16);
}

// An explicit st.global.wb.v4 (the default write-back policy, so g can stay in L2 for the backward):
// a plain uint4 assignment gets split into four 32-bit stores after the memcpy is scalarized.
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& in) {  // p is 16-byte aligned
  uint4 u;
  memcpy(&u, &in, 16);
  __stwb(reinterpret_cast<uint4*>(p), u);
}

// Loads elements [i, i + valid) of a row into a pack: one 128-bit access when allowed and the group
// is whole, else element by element (lanes >= valid keep their zero and are never used).
template <Cache kCache, typename T>
__device__ __forceinline__ void load_group(Pack<T>& out, const T* __restrict__ row, int64_t i, int valid,
                                           bool vec) {
  if (vec && valid == Pack<T>::n) {
    load_pack<kCache>(out, row + i);
  } else {
#pragma unroll
    for (int j = 0; j < Pack<T>::n; ++j)
      if (j < valid) out.v[j] = row[i + j];
  }
}

// ---- reductions: fixed order for a given blockDim (a multiple of 32) -----------------------------

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // lane 0 holds the warp's sum
}

// Sum of v over the block, returned to every thread. Every thread must call it (it has barriers).
// Safe to call repeatedly in one kernel: a call's reads of warp_sums (before its last barrier) and of
// total (before the next call's second barrier) are ordered before the next call's writes.
template <typename C>
__device__ __forceinline__ C block_sum(C v) {
  __shared__ C warp_sums[32];
  __shared__ C total;
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const unsigned n_warps = (blockDim.x + 31u) >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    C s = lane < n_warps ? warp_sums[lane] : C(0);
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// ---- kernels ---------------------------------------------------------------------------------------

template <typename T>
struct Args {
  using C = typename Compute<T>::type;
  const T* x; int64_t x_bs;
  const T* real; int64_t real_bs;
  const T* fake; int64_t fake_bs;
  const T* uncond; int64_t uncond_bs;   // null without guidance
  const C* guidance;                    // null: every w_b = guidance_scale
  C guidance_scale, eps;
  T* g;                                 // contiguous [B, D]
  int64_t B, D, chunk, n_chunks;
  bool vec1, vec2;                      // 128-bit accesses allowed in kernel 1 / kernel 2
  C* ws_abs;                            // [B * n_chunks] partial sums of |x - r|
  C* ws_sq;                             // [B * n_chunks] partial sums of g^2
};

template <typename T, bool kGuided>
__global__ void __launch_bounds__(kThreads) dmd_absdiff_partials(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / a.n_chunks, c = blk - b * a.n_chunks;
  const T* __restrict__ x = a.x + b * a.x_bs;
  const T* __restrict__ real = a.real + b * a.real_bs;
  const T* __restrict__ uncond = kGuided ? a.uncond + b * a.uncond_bs : nullptr;
  const C w = kGuided ? (a.guidance ? a.guidance[b] : a.guidance_scale) : C(0);
  const int64_t i0 = c * a.chunk, i1 = min64(i0 + a.chunk, a.D);
  const int64_t n_groups = (i1 - i0 + V - 1) / V;

  C acc = C(0);
  for (int64_t q = threadIdx.x; q < n_groups; q += blockDim.x) {
    const int64_t i = i0 + q * V;
    const int valid = int(min64(V, i1 - i));
    Pack<T> px{}, pr{}, pu{};
    load_group<Cache::kStream>(px, x, i, valid, a.vec1);   // x: read once
    load_group<Cache::kKeep>(pr, real, i, valid, a.vec1);  // real, uncond: read again by kernel 2
    if constexpr (kGuided) load_group<Cache::kKeep>(pu, uncond, i, valid, a.vec1);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C r = dmd_teacher<kGuided>(to_c(pr.v[j]), to_c(pu.v[j]), w);
        acc += dmd_abs_term(to_c(px.v[j]), r);
      }
    }
  }
  const C s = block_sum(acc);
  if (threadIdx.x == 0) a.ws_abs[blk] = s;
}

template <typename T, bool kGuided>
__global__ void __launch_bounds__(kThreads) dmd_grad_partials(const Args<T> a) {
  using C = typename Compute<T>::type;
  constexpr int V = Pack<T>::n;
  // Reverse block order: the first blocks to run re-read the chunks kernel 1 read last (in L2).
  const int64_t blk = int64_t(gridDim.x) - 1 - int64_t(blockIdx.x);
  const int64_t b = blk / a.n_chunks, c = blk - b * a.n_chunks;

  // n_b: the row's n_chunks partials, thread-strided then a block tree: the same order in every
  // block of the row, so every block gets the same n_b.
  const C* __restrict__ part = a.ws_abs + b * a.n_chunks;
  C s1 = C(0);
  for (int64_t k = threadIdx.x; k < a.n_chunks; k += blockDim.x) s1 += part[k];
  s1 = block_sum(s1);
  const C n_b = dmd_norm(s1 / C(a.D), a.eps);

  const T* __restrict__ real = a.real + b * a.real_bs;
  const T* __restrict__ fake = a.fake + b * a.fake_bs;
  const T* __restrict__ uncond = kGuided ? a.uncond + b * a.uncond_bs : nullptr;
  T* __restrict__ g = a.g + b * a.D;
  const C w = kGuided ? (a.guidance ? a.guidance[b] : a.guidance_scale) : C(0);
  const int64_t i0 = c * a.chunk, i1 = min64(i0 + a.chunk, a.D);
  const int64_t n_groups = (i1 - i0 + V - 1) / V;

  C acc = C(0);
  for (int64_t q = threadIdx.x; q < n_groups; q += blockDim.x) {
    const int64_t i = i0 + q * V;
    const int valid = int(min64(V, i1 - i));
    Pack<T> pr{}, pu{}, pf{}, pg{};
    load_group<Cache::kStream>(pr, real, i, valid, a.vec2);  // last use of every input
    if constexpr (kGuided) load_group<Cache::kStream>(pu, uncond, i, valid, a.vec2);
    load_group<Cache::kStream>(pf, fake, i, valid, a.vec2);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < valid) {
        const C r = dmd_teacher<kGuided>(to_c(pr.v[j]), to_c(pu.v[j]), w);
        const C gv = dmd_g(to_c(pf.v[j]), r, n_b);
        acc += gv * gv;
        pg.v[j] = FromC<T>::cvt(gv);
      }
    }
    if (a.vec2 && valid == V) {
      store_pack(g + i, pg);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j < valid) g[i + j] = pg.v[j];
    }
  }
  const C s2 = block_sum(acc);
  if (threadIdx.x == 0) a.ws_sq[blk] = s2;
}

template <typename C>
__global__ void __launch_bounds__(kFinalThreads) dmd_loss_final(const C* __restrict__ ws_sq, int64_t n,
                                                                 int64_t numel, C* __restrict__ loss) {
  C s = C(0);
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) s += ws_sq[k];
  s = block_sum(s);
  if (threadIdx.x == 0) *loss = C(0.5) * s / C(numel);  // B * D == 0: 0 / 0 = NaN, as torch's mean
}

// ---- host side -------------------------------------------------------------------------------------

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("flashdistill dmd_forward (cuda): launch of ") + kernel +
                             " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row ptr + b * bstride (b < B) starts on a 16-byte boundary.
bool rows_aligned(const void* p, int64_t bstride, int64_t B, int64_t elem_bytes) {
  return aligned16(p) && (B <= 1 || (bstride * elem_bytes) % 16 == 0);
}

template <typename T>
void launch(int64_t B, int64_t D, const void* x, int64_t x_bs, const void* real, int64_t real_bs,
            const void* fake, int64_t fake_bs, const void* uncond, int64_t uncond_bs, const void* guidance,
            double guidance_scale, double eps, void* g, void* loss, void* workspace, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  const int64_t eb = sizeof(T);
  const Plan plan = make_plan(eb, B, D);
  const int64_t n_parts = B * plan.n_chunks;

  Args<T> a;
  a.x = static_cast<const T*>(x); a.x_bs = x_bs;
  a.real = static_cast<const T*>(real); a.real_bs = real_bs;
  a.fake = static_cast<const T*>(fake); a.fake_bs = fake_bs;
  a.uncond = static_cast<const T*>(uncond); a.uncond_bs = uncond_bs;
  a.guidance = static_cast<const C*>(guidance);
  a.guidance_scale = C(guidance_scale);
  a.eps = C(eps);
  a.g = static_cast<T*>(g);
  a.B = B; a.D = D; a.chunk = plan.chunk; a.n_chunks = plan.n_chunks;
  const bool guided = uncond != nullptr;
  a.vec1 = rows_aligned(x, x_bs, B, eb) && rows_aligned(real, real_bs, B, eb) &&
           (!guided || rows_aligned(uncond, uncond_bs, B, eb));
  a.vec2 = rows_aligned(real, real_bs, B, eb) && rows_aligned(fake, fake_bs, B, eb) &&
           (!guided || rows_aligned(uncond, uncond_bs, B, eb)) && rows_aligned(g, D, B, eb);
  a.ws_abs = static_cast<C*>(workspace);
  a.ws_sq = a.ws_abs + n_parts;

  if (n_parts > 0) {
    const dim3 grid(static_cast<unsigned>(n_parts)), block(kThreads);
    if (guided) {
      dmd_absdiff_partials<T, true><<<grid, block, 0, stream>>>(a);
      check_launch("dmd_absdiff_partials");
      dmd_grad_partials<T, true><<<grid, block, 0, stream>>>(a);
      check_launch("dmd_grad_partials");
    } else {
      dmd_absdiff_partials<T, false><<<grid, block, 0, stream>>>(a);
      check_launch("dmd_absdiff_partials");
      dmd_grad_partials<T, false><<<grid, block, 0, stream>>>(a);
      check_launch("dmd_grad_partials");
    }
  }
  dmd_loss_final<C><<<1, kFinalThreads, 0, stream>>>(a.ws_sq, n_parts, B * D, static_cast<C*>(loss));
  check_launch("dmd_loss_final");
}

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("flashdistill dmd_forward (cuda): " + what);
}

}  // namespace

int64_t dmd_workspace_bytes(int64_t dtype, int64_t B, int64_t D) {
  const int64_t eb = elem_bytes_of(dtype);
  if (B < 0 || D < 0) bad("negative size B=" + std::to_string(B) + ", D=" + std::to_string(D));
  const Plan plan = make_plan(eb, B, D);
  // n_chunks <= ceil(kTargetBlocks / B), so B * n_chunks < B + kTargetBlocks: no overflow here.
  const int64_t n_parts = B * plan.n_chunks;
  if (n_parts > INT32_MAX) bad("B=" + std::to_string(B) + " needs more than 2^31 - 1 blocks");
  return 2 * n_parts * compute_bytes_of(dtype);
}

void dmd_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                      const void* x, int64_t x_bstride,
                      const void* real, int64_t real_bstride,
                      const void* fake, int64_t fake_bstride,
                      const void* real_uncond, int64_t real_uncond_bstride,
                      const void* guidance, double guidance_scale, double eps,
                      void* g, void* loss,
                      void* workspace, int64_t workspace_bytes,
                      CUstream_st* stream) {
  const int64_t need = dmd_workspace_bytes(dtype, B, D);  // validates dtype, B, D
  if (workspace_bytes < need)
    bad("workspace of " + std::to_string(workspace_bytes) + " bytes, need dmd_workspace_bytes = " +
        std::to_string(need));
  if (need > 0 && workspace == nullptr) bad("workspace is null");
  if (reinterpret_cast<uintptr_t>(workspace) % uintptr_t(compute_bytes_of(dtype)) != 0)
    bad("workspace is not aligned to the compute type");
  if (loss == nullptr) bad("loss is null");
  if (B > 0 && D > 0 && (x == nullptr || real == nullptr || fake == nullptr || g == nullptr))
    bad("null data pointer among x, real, fake, g");
  if (guidance != nullptr && real_uncond == nullptr) bad("a guidance array needs real_uncond");

  switch (dtype) {
    case kFloat32:
      launch<float>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride, real_uncond,
                    real_uncond_bstride, guidance, guidance_scale, eps, g, loss, workspace, stream);
      break;
    case kFloat16:
      launch<f16_t>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride, real_uncond,
                    real_uncond_bstride, guidance, guidance_scale, eps, g, loss, workspace, stream);
      break;
    case kBFloat16:
      launch<bf16_t>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride, real_uncond,
                     real_uncond_bstride, guidance, guidance_scale, eps, g, loss, workspace, stream);
      break;
    case kFloat64:
      launch<double>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride, real_uncond,
                     real_uncond_bstride, guidance, guidance_scale, eps, g, loss, workspace, stream);
      break;
    default:
      bad("unknown dtype code " + std::to_string(dtype));  // unreachable: validated above
  }
}

}  // namespace gpu
}  // namespace flashdistill
