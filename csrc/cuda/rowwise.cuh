// Device helpers shared by the row-wise CUDA kernels (score_diff.cu, score_identity.cu,
// regression.cu): the work split over [B, D] rows, 128-bit packs, conversions, fixed-order block
// reductions, launch checks. Header-only, included by nvcc translation units only (module.cpp never
// sees it). Everything here is independent of the op: the per-element math lives in each op's file.
//
// The layout every op shares (csrc/README.md, "The score-loss skeletons"): input row b starts at
// ptr + b * bstride (elements) and holds D contiguous elements; outputs are contiguous [B, D].
// A 1-D grid of B * n_chunks blocks, block k = (b, c) = (k / n_chunks, k % n_chunks), each block one
// chunk of `chunk` elements of one row (the last chunk of a row may be shorter). The split is a
// function of (element size, B, D) alone, so a workspace query needs no device, and every sum over
// a chunk is formed in the same order whatever the device, the stream or the pointers' alignment.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "flashdistill/common.h"

#if defined(__USE_FAST_MATH__)
#error "csrc/cuda kernels must not be built with --use_fast_math: it flushes subnormals and approximates division and sqrt"
#endif

namespace flashdistill {
namespace gpu {
namespace rowwise {

// 256 threads: 8 warps, enough for a block to keep 4-8 KiB in flight per load round (one 16-byte
// pack per thread per operand) while 4-8 blocks share an SM. Any multiple of 32 up to 1024 is
// correct; the reductions' order (hence the bits of every sum) depends on it, so it is one constant.
constexpr int kThreads = 256;
constexpr int64_t kTargetBlocks = 1024;    // ~7.8 blocks per SM on 132 SMs (H100 SXM / H200): >= 2 waves
constexpr int64_t kMinTilesPerChunk = 2;   // a chunk is >= 2 tiles of kThreads * V elements when D allows
constexpr int kFinalThreads = 256;         // finalize kernels: one warp per sample (or one block in all)

static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block reductions need whole warps");
static_assert(kFinalThreads % 32 == 0 && kFinalThreads <= 1024, "block reductions need whole warps");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- work split -------------------------------------------------------------------------------------

struct Plan {
  int64_t n_chunks;  // chunks per row (0 when B * D == 0)
  int64_t chunk;     // elements per chunk, a multiple of kThreads * V; the last chunk may be shorter
};

// Chunks per row: enough for ~kTargetBlocks blocks in all, but no chunk under kMinTilesPerChunk
// tiles (a tile = one 16-byte pack per thread). None is empty: (n_chunks - 1) * chunk < D.
inline Plan make_plan(int64_t elem_bytes, int64_t B, int64_t D) {
  if (B <= 0 || D <= 0) return {0, 0};
  const int64_t vec = 16 / elem_bytes, tile = kThreads * vec;
  const int64_t tiles = ceil_div(D, tile);
  const int64_t want = ceil_div(kTargetBlocks, B);
  const int64_t most = std::max<int64_t>(1, tiles / kMinTilesPerChunk);
  const int64_t n = std::min(want, most);
  const int64_t chunk = ceil_div(tiles, n) * tile;
  return {ceil_div(D, chunk), chunk};
}

// Bytes of one element of the dtype; throws std::invalid_argument (naming `op`) for an unknown code.
inline int64_t elem_bytes_of(int64_t dtype, const char* op) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    case kFloat64: return 8;
    default:
      throw std::invalid_argument(std::string("flashdistill ") + op + " (cuda): unknown dtype code " +
                                  std::to_string(dtype) + " (0 float32, 1 float16, 2 bfloat16, 3 float64)");
  }
}

inline int64_t compute_bytes_of(int64_t dtype) { return dtype == kFloat64 ? 8 : 4; }

[[noreturn]] inline void bad_arg(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("flashdistill ") + op + " (cuda): " + what);
}

// Blocks of a launch over B rows: B * n_chunks, which must fit gridDim.x (2^31 - 1). n_chunks <=
// ceil(kTargetBlocks / B), so B * n_chunks < B + kTargetBlocks and the product cannot overflow.
inline int64_t grid_blocks(const char* op, int64_t B, const Plan& plan) {
  const int64_t n = B * plan.n_chunks;
  if (n > INT32_MAX) bad_arg(op, "B=" + std::to_string(B) + " needs more than 2^31 - 1 blocks");
  return n;
}

// cudaGetLastError after a launch, as std::runtime_error naming the op and the kernel.
inline void check_launch(const char* op, const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("flashdistill ") + op + " (cuda): launch of " + kernel + " failed: " +
                             cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row p + b * bstride (b < B) starts on a 16-byte boundary; a null (absent) operand passes.
inline bool rows_aligned(const void* p, int64_t bstride, int64_t B, int64_t elem_bytes) {
  if (p == nullptr) return true;
  return aligned16(p) && (B <= 1 || (bstride * elem_bytes) % 16 == 0);
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag turned into a template argument
// (`decltype(flag)::value` inside f), so the launch sites enumerate kernel instances without a
// switch per combination.
template <typename F>
inline void with_flag(bool v, F&& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

// Calls f(T{}) with T the storage type of the dtype code (float, f16_t, bf16_t, double); throws
// std::invalid_argument naming `op` for an unknown code.
template <typename F>
inline void with_dtype(int64_t dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(f16_t{}); break;
    case kBFloat16: f(bf16_t{}); break;
    case kFloat64: f(double{}); break;
    default: bad_arg(op, "unknown dtype code " + std::to_string(dtype));
  }
}

// ---- element conversion on the device ---------------------------------------------------------------
// Loads of f16 / bf16 are exact; stores round to nearest even (cvt.rn), subnormals kept, overflow to
// inf: the same bits as common.h's to_f16 / to_bf16 for every non-NaN value.

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

// ---- 128-bit packs ----------------------------------------------------------------------------------

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

// An explicit st.global.wb.v4 (default write-back policy: a gradient stays in L2 for its consumer);
// a plain uint4 assignment gets split into four 32-bit stores after the memcpy is scalarized.
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& in) {  // p is 16-byte aligned
  uint4 u;
  memcpy(&u, &in, 16);
  __stwb(reinterpret_cast<uint4*>(p), u);
}

// Elements [i, i + valid) of a row into a pack: one 128-bit access when allowed and the group is
// whole, else element by element (lanes >= valid keep their zero and are never used).
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

template <typename T>
__device__ __forceinline__ void store_group(T* __restrict__ row, int64_t i, const Pack<T>& in, int valid,
                                            bool vec) {
  if (vec && valid == Pack<T>::n) {
    store_pack(row + i, in);
  } else {
#pragma unroll
    for (int j = 0; j < Pack<T>::n; ++j)
      if (j < valid) row[i + j] = in.v[j];
  }
}

// The chunk of block `blk`: row b, elements [i0, i1), n_groups groups of V elements (the last one
// possibly partial). Thread t takes groups q = t, t + blockDim, ...; within a group, elements j =
// 0..V-1 in order, in the vector and the scalar path alike, so the sums do not depend on alignment.
struct Chunk {
  int64_t b, i0, i1, n_groups;
};

template <int V>
__device__ __forceinline__ Chunk chunk_of(int64_t blk, int64_t n_chunks, int64_t chunk, int64_t D) {
  Chunk k;
  k.b = blk / n_chunks;
  const int64_t c = blk - k.b * n_chunks;
  k.i0 = c * chunk;
  k.i1 = min64(k.i0 + chunk, D);
  k.n_groups = (k.i1 - k.i0 + V - 1) / V;
  return k;
}

// ---- reductions: fixed order for a given blockDim (a multiple of 32) --------------------------------

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // lane 0 holds the warp's sum
}

// Sum of v over the block, returned to every thread. Every thread must call it (it has barriers).
// Safe to call repeatedly in one kernel: a call's reads of warp_sums (before its last barrier) and of
// total (before the next call's first barrier) are ordered before the next call's writes.
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

// Per-sample totals from per-chunk partials: out[b * K + k] = sum_c part[(b * n_chunks + c) * K + k],
// one warp per sample b, lane-strided then a shuffle tree: an order fixed by n_chunks alone. Launch
// with ceil(B / (kFinalThreads / 32)) blocks of kFinalThreads. (With n_chunks == 1 the partial
// kernels write `out` directly and this kernel is not launched.)
template <typename C, int K>
__global__ void __launch_bounds__(kFinalThreads) rows_final(const C* __restrict__ part, int64_t B,
                                                            int64_t n_chunks, C* __restrict__ out) {
  const int64_t b = int64_t(blockIdx.x) * (kFinalThreads / 32) + (threadIdx.x >> 5);
  const unsigned lane = threadIdx.x & 31u;
  if (b >= B) return;  // whole warps leave together: the shuffles below see full warps only
  C s[K];
#pragma unroll
  for (int k = 0; k < K; ++k) s[k] = C(0);
  const C* __restrict__ p = part + b * n_chunks * K;
  for (int64_t c = lane; c < n_chunks; c += 32) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += p[c * K + k];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const C t = warp_sum(s[k]);
    if (lane == 0) out[b * K + k] = t;
  }
}

}  // namespace rowwise
}  // namespace gpu
}  // namespace flashdistill
