// The CPU's vectorized twin of philox::normals (philox.h): the same stream elements, the same Philox
// bits, the Box-Muller transform with vectorizable float32 log / sin / cos (polynomials on the float's
// bits: kd.h's log1p, and a polynomial sin / cos) instead of libm's scalar calls. Results equal philox::normals within a few
// ulp (the log's and the angle's polynomials), the "normals within rounding" contract of the stream.
//
// Layout of the work: the tile's Philox blocks as structure-of-arrays (the 10 rounds run over all
// blocks at once, so gcc vectorizes the 32x32 -> 64-bit multiplies), then the pairs' transforms over
// arrays. The angle needs no range reduction: theta = 2 pi u2 = (pi / 2)(q + f) with q the top two of
// the word's 24 bits (exact) and f in [0, 1); sin and cos of (pi / 2) f come from Taylor polynomials
// and the quadrant q rotates them.
// Work per normal: ~15 integer ops (a quarter block) + ~35 flops; measured in benchmarks/NOTES.md.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "flashdistill/kd.h"
#include "flashdistill/philox.h"

namespace flashdistill {
namespace cpu_noise {

constexpr int64_t kMaxBlocks = 260;  // a tile of up to 1024 elements at any alignment

inline float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// out[k] = normal of stream element idx0 + k (k < m <= 1024), float.
inline void normals(uint64_t idx0, int64_t m, uint64_t seed, uint64_t offset, float* out) {
  const uint64_t b0 = idx0 >> 2;
  const int64_t nb = int64_t(((idx0 + uint64_t(m) + 3) >> 2) - b0);
  alignas(64) uint32_t c0[kMaxBlocks], c1[kMaxBlocks], c2[kMaxBlocks], c3[kMaxBlocks];
  const uint32_t o_lo = uint32_t(offset), o_hi = uint32_t(offset >> 32);
  for (int64_t i = 0; i < nb; ++i) {
    const uint64_t b = b0 + uint64_t(i);
    c0[i] = uint32_t(b);
    c1[i] = uint32_t(b >> 32);
    c2[i] = o_lo;
    c3[i] = o_hi;
  }
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t i = 0; i < nb; ++i) {
      const uint64_t p0 = uint64_t(philox::kM0) * c0[i], p1 = uint64_t(philox::kM1) * c2[i];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[i] ^ k0, n2 = uint32_t(p0 >> 32) ^ c3[i] ^ k1;
      c1[i] = uint32_t(p1);
      c3[i] = uint32_t(p0);
      c0[i] = n0;
      c2[i] = n2;
    }
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
  // the pairs (w0, w1) and (w2, w3) of every block: 2 nb pairs, 4 nb normals, computed into
  // contiguous arrays (a strided store stops gcc's vectorizer), then interleaved
  alignas(64) float nc[2][kMaxBlocks], ns[2][kMaxBlocks];
  for (int half = 0; half < 2; ++half) {
    const uint32_t* __restrict__ ev = half ? c2 : c0;
    const uint32_t* __restrict__ od = half ? c3 : c1;
    float* __restrict__ oc = nc[half];
    float* __restrict__ os = ns[half];
    for (int64_t i = 0; i < nb; ++i) {
      const float u1 = float(int32_t((ev[i] >> 8) + 1u)) * (1.0f / 16777216.0f);
      const float r = __builtin_sqrtf(-2.0f * kdmath::kd_log1p(u1 - 1.0f));  // u1 - 1 is exact (u1 = k 2^-24)
      const uint32_t k24 = od[i] >> 8;
      const uint32_t q = k24 >> 22;                                              // quadrant of 2 pi u2
      const float f = float(int32_t(k24 & 0x3fffffu)) * (1.0f / 4194304.0f);    // in [0, 1)
      const float ph = f * 1.57079632679489662f, p2 = ph * ph;
      float sn = -1.0f / 39916800.0f;                                             // sin: to ph^11
      sn = sn * p2 + 1.0f / 362880.0f;
      sn = sn * p2 - 1.0f / 5040.0f;
      sn = sn * p2 + 1.0f / 120.0f;
      sn = sn * p2 - 1.0f / 6.0f;
      sn = sn * p2 + 1.0f;
      sn = sn * ph;
      float cs = 1.0f / 479001600.0f;                                            // cos: to ph^12
      cs = cs * p2 - 1.0f / 3628800.0f;
      cs = cs * p2 + 1.0f / 40320.0f;
      cs = cs * p2 - 1.0f / 720.0f;
      cs = cs * p2 + 1.0f / 24.0f;
      cs = cs * p2 - 0.5f;
      cs = cs * p2 + 1.0f;
      // rotate by q quarter turns: (cos, sin) of (pi/2)(q + f)
      const bool odd = (q & 1u) != 0, neg_c = ((q + 1u) & 2u) != 0, neg_s = q >= 2u;  // neg_c: q = 1, 2
      const float c_r = odd ? sn : cs, s_r = odd ? cs : sn;
      oc[i] = r * (neg_c ? -c_r : c_r);
      os[i] = r * (neg_s ? -s_r : s_r);
    }
  }
  alignas(64) float nrm[4 * kMaxBlocks];
  for (int64_t i = 0; i < nb; ++i) {
    nrm[4 * i] = nc[0][i];
    nrm[4 * i + 1] = ns[0][i];
    nrm[4 * i + 2] = nc[1][i];
    nrm[4 * i + 3] = ns[1][i];
  }
  const int64_t skip = int64_t(idx0 - (b0 << 2));
  std::copy(nrm + skip, nrm + skip + m, out);
}

// double: the scalar spec path (libm), as philox::normals.
inline void normals(uint64_t idx0, int64_t m, uint64_t seed, uint64_t offset, double* out) {
  philox::normals<double>(idx0, m, seed, offset, out);
}

}  // namespace cpu_noise
}  // namespace flashdistill
