// Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
// a counter-based generator, so any element of a stream can be computed independently on any
// backend. Shared by the CPU and CUDA kernels (FD_HD); the Triton kernel and the float64 spec
// (kernels/rng/reference.py) implement the same function; their bits agree exactly.
//
// The stream layout (kernels/rng/__init__.py documents it for users): a call with seed s (64 bits),
// offset o (64 bits, read from device memory) and a first element index e produces, for element i,
// the 4-word block philox(counter = (b mod 2^32, b >> 32, o mod 2^32, o >> 32), key = (s mod 2^32,
// s >> 32)) with b = (e + i) / 4, and takes word (e + i) mod 4:
//   uniform  u = (word >> 8) * 2^-24, in [0, 1) (24 bits, exact in float32);
//   normal   Box-Muller on the block's word pairs (w0, w1) and (w2, w3): with u1 = ((w_even >> 8) + 1)
//            * 2^-24 in (0, 1] and u2 = (w_odd >> 8) * 2^-24, r = sqrt(-2 log u1), the pair gives
//            r cos(2 pi u2) (even word) and r sin(2 pi u2) (odd word), in the compute type.
#pragma once

#include <cmath>
#include <cstdint>

#include "flashdistill/common.h"

namespace flashdistill {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key increments (golden ratio, sqrt(3) - 1)

struct Block {
  uint32_t w[4];
};

FD_HD Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kM0) * c0, p1 = uint64_t(kM1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Block{{c0, c1, c2, c3}};
}

// The block of element index `idx` (the first element e of the call included) of stream (seed, offset).
FD_HD Block block_of(uint64_t idx, uint64_t seed, uint64_t offset) {
  const uint64_t b = idx >> 2;
  return philox4x32_10(uint32_t(b), uint32_t(b >> 32), uint32_t(offset), uint32_t(offset >> 32), uint32_t(seed),
                       uint32_t(seed >> 32));
}

template <typename C> FD_HD C uniform(uint32_t w) { return C(w >> 8) * C(1.0 / 16777216.0); }

// The 4 normals of a block (two Box-Muller pairs: one log, sqrt, sin and cos per pair).
template <typename C> FD_HD void block_normals(const Block& b, C (&n)[4]) {
  using std::cos;
  using std::log;
  using std::sin;
  using std::sqrt;
  for (int p = 0; p < 4; p += 2) {
    const C u1 = C((b.w[p] >> 8) + 1u) * C(1.0 / 16777216.0);
    const C u2 = C(b.w[p + 1] >> 8) * C(1.0 / 16777216.0);
    const C r = sqrt(C(-2) * log(u1));
    const C th = C(6.283185307179586476925) * u2;
    n[p] = r * cos(th);
    n[p + 1] = r * sin(th);
  }
}

// out[k] = the normal of stream element idx0 + k, k < m (any alignment of idx0): the tile helper of
// the fused kernels (q_sample) and of the plain draws.
template <typename C> FD_HD void normals(uint64_t idx0, int64_t m, uint64_t seed, uint64_t offset, C* out) {
  for (uint64_t blk = idx0 >> 2; (blk << 2) < idx0 + uint64_t(m); ++blk) {
    C n[4];
    block_normals<C>(block_of(blk << 2, seed, offset), n);
    for (int j = 0; j < 4; ++j) {
      const uint64_t idx = (blk << 2) + uint64_t(j);
      if (idx >= idx0 && idx < idx0 + uint64_t(m)) out[idx - idx0] = n[j];
    }
  }
}

}  // namespace philox
}  // namespace flashdistill
