// Warp-level tensor-core primitives for the attention kernels (attention.cu only): mma.sync
// m16n8k16 (fp16/bf16 in, fp32 accumulate), ldmatrix, cp.async, and the shared-memory tile loader.
// Private to csrc/cuda (nvcc only). Every instruction here needs sm_80 or newer; on an older target
// the bodies compile to a trap (the host entry refuses such a device before launching).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane =
// 4 g + t (g = lane / 4 in 0..7, t = lane % 4):
//   A 16x16 row-major, 4 x b32 (2 elements each, the lower column in the low half):
//     a0 = A[g][2t..2t+1]  a1 = A[g+8][2t..2t+1]  a2 = A[g][2t+8..2t+9]  a3 = A[g+8][2t+8..2t+9]
//   B 16x8 "col" (B[k][n], k pairs packed):  b0 = B[2t..2t+1][g]  b1 = B[2t+8..2t+9][g]
//   C/D 16x8 fp32:  c0, c1 = C[g][2t], C[g][2t+1]   c2, c3 = C[g+8][2t], C[g+8][2t+1]
// So the accumulators of two adjacent n-tiles (columns 16 kk .. 16 kk + 15) are, packed to 16 bits,
// exactly the A fragment of that 16-column chunk (pack_a below): P = softmax(S) never leaves the
// registers between S = Q K^T and O += P V.
//
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8 i .. 8 i + 7 give the row addresses of matrix i,
// and register i of lane l receives row l / 4, columns 2 (l % 4) .. +1 of matrix i (with .trans:
// the element pair [2 (l % 4) .. +1][l / 4], i.e. of the transposed matrix). The three address
// patterns below (load_a, load_b_nk, load_b_kn) are derived in their comments.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "flashdistill/common.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FD_ATTN_MMA_UNSUPPORTED 1
#endif

namespace flashdistill {
namespace gpu {
namespace attn_mma {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- ldmatrix -----------------------------------------------------------------------------------
// "memory" clobbers: the compiler must not move a shared-memory read across __syncthreads or the
// cp.async waits (they are ordinary asm to it).

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(FD_ATTN_MMA_UNSUPPORTED)
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(FD_ATTN_MMA_UNSUPPORTED)
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// A operand: rows r0 .. r0 + 15, columns c0 .. c0 + 15 of a row-major tile with row stride LDS.
// Matrix i = lane / 8 must be (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
// (rows 8-15, cols 8-15) for a0..a3: row r0 + lane % 16, column c0 + 8 (lane / 16).
template <int LDS>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* s, int r0, int c0, int lane) {
  ldsm_x4(a, smem_u32(s + (r0 + (lane & 15)) * LDS + c0 + (lane >> 4) * 8));
}

// B operands of two n-tiles from a tile stored [n][k] (k contiguous: K for S = Q K^T, V for dP = dO
// V^T, Q / dO for the transposed products of the dK/dV kernel): b[0], b[1] for columns n0 .. n0 + 7,
// b[2], b[3] for n0 + 8 .. n0 + 15, k = k0 .. k0 + 15. Matrix i must be (n 0-7, k 0-7), (n 0-7,
// k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15): row n0 + 8 (lane / 16) + lane % 8, column k0 + 8
// ((lane / 8) % 2). Without .trans, lane l gets B[k = 2 (l % 4) .. +1][n = l / 4]: the b0/b1 layout.
template <int LDS>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const uint16_t* s, int n0, int k0, int lane) {
  ldsm_x4(b, smem_u32(s + (n0 + (lane >> 4) * 8 + (lane & 7)) * LDS + k0 + ((lane >> 3) & 1) * 8));
}

// B operands of two n-tiles from a tile stored [k][n] (n contiguous: V for O += P V, dO for dV += P^T
// dO, K for dQ += dS K, Q for dK += dS^T Q), through .trans: b[0], b[1] for n0 .. n0 + 7, b[2], b[3]
// for n0 + 8 .. n0 + 15. Matrix i must be (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15,
// n 8-15): row k0 + 8 ((lane / 8) % 2) + lane % 8, column n0 + 8 (lane / 16).
template <int LDS>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const uint16_t* s, int k0, int n0, int lane) {
  ldsm_x4_trans(b, smem_u32(s + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + n0 + (lane >> 4) * 8));
}

// ---- mma.sync m16n8k16, fp32 accumulate ------------------------------------------------------------

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, f16_t) {
#if defined(FD_ATTN_MMA_UNSUPPORTED)
  __trap();
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bf16_t) {
#if defined(FD_ATTN_MMA_UNSUPPORTED)
  __trap();
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two n-tiles at once: d0 += a * (b[0], b[1]), d1 += a * (b[2], b[3]) (the load_b_* pairs).
template <typename T>
__device__ __forceinline__ void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[4]) {
  mma16816(d0, a, b[0], b[1], T{});
  mma16816(d1, a, b[2], b[3], T{});
}

// ---- packing fp32 pairs to 16-bit operands (round to nearest even) ----------------------------------

__device__ __forceinline__ uint32_t pack2(float lo, float hi, f16_t) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, bf16_t) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// The A fragment of columns 16 kk .. 16 kk + 15 of a 16-row accumulator block c[n-tile][4]
// (the layout identity in the header comment).
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2(c0[0], c0[1], T{});
  a[1] = pack2(c0[2], c0[3], T{});
  a[2] = pack2(c1[0], c1[1], T{});
  a[3] = pack2(c1[2], c1[3], T{});
}

// ---- cp.async -------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(uint32_t saddr, const void* gptr) {
#if defined(FD_ATTN_MMA_UNSUPPORTED)
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(gptr) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(FD_ATTN_MMA_UNSUPPORTED)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight. Visibility to the other
// threads of the block needs a __syncthreads after it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(FD_ATTN_MMA_UNSUPPORTED)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---- tiles ----------------------------------------------------------------------------------------

// Row stride of a [rows][D] 16-bit tile in shared memory: D + 8 elements. 16-byte rows keep cp.async
// and ldmatrix aligned, and the extra 16 bytes shift consecutive rows by 16 bytes mod 128 (D = 64,
// 128: stride 144 / 272 B) or by 80 B (D = 32, 96: 80 / 208 B), so the 8 row addresses of one
// ldmatrix phase hit 8 distinct 16-byte bank groups: conflict-free without a swizzle.
template <int D> struct Tile {
  static constexpr int kLds = D + 8;
};

// Rows 0 .. ROWS - 1 of a tile from global rows g + r * ld (r < nvalid; r >= nvalid is zero-filled,
// so a tail block multiplies zeros, never stale data or NaN), columns 0 .. dvalid - 1 (dvalid a
// multiple of 8, <= D; columns dvalid .. D - 1 are zero: a narrower head dim in a wider tile gives the
// same dot products). All NT threads of the block call it.
// vec: g and ld allow 16-byte cp.async (asynchronous; the caller commits and waits); otherwise eight
// 2-byte loads and one 16-byte shared store per chunk (synchronous). Either way the data is visible to
// the block after the caller's cp_async_wait + __syncthreads.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile(uint16_t* s, const uint16_t* g, int64_t ld, int nvalid, bool vec,
                                          int tid, int dvalid = D) {
  constexpr int kLds = Tile<D>::kLds, kChunks = D / 8, kTotal = ROWS * kChunks;
  static_assert(D % 8 == 0, "16-byte chunks");
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += NT) {
    const int c = c0 + tid;
    if (kTotal % NT != 0 && c >= kTotal) break;
    const int r = c / kChunks, col = (c - r * kChunks) * 8;
    uint16_t* dst = s + r * kLds + col;
    if (r < nvalid && col < dvalid) {
      const uint16_t* src = g + r * ld + col;
      if (vec) {
        cp_async16(smem_u32(dst), src);
      } else {
        uint16_t e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = src[i];
        uint4 u;
        memcpy(&u, e, 16);
        *reinterpret_cast<uint4*>(dst) = u;
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

}  // namespace attn_mma
}  // namespace gpu
}  // namespace flashdistill
