// CPU philox_fill: a stream of Philox4x32-10 bits, uniforms or normals (include/flashdistill/philox.h
// has the generator and the stream layout; kernels/rng/reference.py the spec). Each task computes
// whole 4-element blocks, so the bits of every element are independent of the thread count.
//
// Work per element: a quarter of a Philox block (10 rounds of 2 32x32->64 multiplies, ~40 integer
// ops per block); normals add a log, a sqrt and a sin/cos per pair. Traffic: the output only (4 or 8
// bytes per element written; the offset is one 8-byte read). Compute bound: ~10 ns per block
// predicted for bits on one core, so ~1 GB/s of float32 normals per core -- far below bandwidth; the
// samplers fuse the generation into their step so that no noise tensor is ever written.

// fp-contract=off: the bits do not depend on the instruction set (no FMAs where -march has them).
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flashdistill/common.h"
#include "flashdistill/cpu_sched.h"
#include "flashdistill/cpu_noise.h"
#include "flashdistill/philox.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

enum Kind : int64_t { kBits = 0, kUniform = 1, kNormal = 2 };

template <typename T>
void fill(int64_t n, uint64_t seed, uint64_t offset, uint64_t start, int64_t kind, T* out) {
  using C = typename Compute<T>::type;
  constexpr int64_t kTileElems = 1024;  // a tile of the stream, generated into the stack then stored
  const int64_t n_tiles = (n + kTileElems - 1) / kTileElems;
  const int nthr = sched::threads_for(n * 8);
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(static)
  for (int64_t ti = 0; ti < n_tiles; ++ti) {
    const int64_t i0 = ti * kTileElems, m = std::min(kTileElems, n - i0);
    C v[kTileElems];
    if (kind == kNormal) {
      cpu_noise::normals(start + uint64_t(i0), m, seed, offset, v);
    } else {
      for (uint64_t blk = (start + uint64_t(i0)) >> 2; (blk << 2) < start + uint64_t(i0 + m); ++blk) {
        const philox::Block b = philox::block_of(blk << 2, seed, offset);
        for (int j = 0; j < 4; ++j) {
          const int64_t k = int64_t((blk << 2) + uint64_t(j) - start) - i0;
          if (k >= 0 && k < m) v[k] = philox::uniform<C>(b.w[j]);
        }
      }
    }
    for (int64_t k = 0; k < m; ++k) store(out, i0 + k, v[k]);
  }
}

void fill_bits(int64_t n, uint64_t seed, uint64_t offset, uint64_t start, int64_t* out) {
  const uint64_t first = start >> 2, last = (start + uint64_t(n) + 3) >> 2;
  const int64_t n_blocks = int64_t(last - first);
  const int nthr = sched::threads_for(n * 8);
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(static)
  for (int64_t bi = 0; bi < n_blocks; ++bi) {
    const uint64_t blk = first + uint64_t(bi);
    const philox::Block b = philox::block_of(blk << 2, seed, offset);
    for (int j = 0; j < 4; ++j) {
      const uint64_t idx = (blk << 2) + uint64_t(j);
      if (idx >= start && idx < start + uint64_t(n)) out[idx - start] = int64_t(b.w[j]);
    }
  }
}

}  // namespace

void philox_fill(int64_t dtype, int64_t n, uint64_t seed, uintptr_t offset_ptr, uint64_t start, int64_t kind,
                 uintptr_t out) {
  if (n <= 0) return;
  const uint64_t offset = uint64_t(*reinterpret_cast<const int64_t*>(offset_ptr));
  if (kind == kBits) return fill_bits(n, seed, offset, start, reinterpret_cast<int64_t*>(out));
  if (kind != kUniform && kind != kNormal)
    throw std::invalid_argument("philox_fill: unknown kind " + std::to_string(kind) + " (0 bits, 1 uniform, 2 normal)");
  sched::dispatch_dtype(dtype, "philox_fill", [&](auto tag) {
    using T = typename decltype(tag)::type;
    fill<T>(n, seed, offset, start, kind, reinterpret_cast<T*>(out));
  });
}

}  // namespace cpu
}  // namespace flashdistill
