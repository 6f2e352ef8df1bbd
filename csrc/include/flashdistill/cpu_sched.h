// CPU only (g++, OpenMP): how the CPU kernels of the score-loss skeletons split B rows of D elements
// into work, so that no result depends on the thread count.
//
// A row is cut into blocks of kBlock elements (the last one short); item it = b * nblk + k is block
// k of sample b. A reduction computes fixed partial sums per item (within a block: simd::Lanes
// accumulators of the compute type) into its own slot of a partials array, and sum_partials adds
// them in double in block order afterwards: every rounding depends on (B, D) alone, never on which
// thread ran an item or when. Elementwise passes have no such question; they use the same items.
// Within a block, 16-bit rows are widened (and outputs rounded, or streamed) in tiles of kTile.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "flashdistill/common.h"
#include "flashdistill/cpu_simd.h"

namespace flashdistill {
namespace sched {

constexpr int64_t kBlock = 2048;                // elements per partial sum: fixes the results
constexpr int64_t kTile = 256;                  // elements per tile within a block (tuning only)
constexpr int64_t kParallelMinElems = 1 << 15;  // below this B*D, one thread (fork/join ~ 5 us)
constexpr int64_t kSamplesPerThread = 4;        // reductions: whole samples per task from this many
constexpr int64_t kTaskElems = 1 << 14;         // elements per scheduling chunk, at least (tuning only)

// A tile holds whole groups of simd::Lanes, so that tiled and untiled loops give each lane the same
// elements: the same bits.
static_assert(kBlock % kTile == 0 && kTile % simd::Lanes<float>::n == 0 && kTile % simd::Lanes<double>::n == 0,
              "a block must hold whole tiles, a tile whole lane groups");

inline int64_t num_blocks(int64_t D) { return D > 0 ? (D + kBlock - 1) / kBlock : 0; }

// Item it: its index, sample, offset in the row and length.
struct Item {
  int64_t idx, b, off, n;
};
inline Item item_of(int64_t it, int64_t nblk, int64_t D) {
  const int64_t b = it / nblk, off = (it - b * nblk) * kBlock;
  return Item{it, b, off, std::min(kBlock, D - off)};
}

inline int threads_for(int64_t elems) {
#ifdef _OPENMP
  return elems >= kParallelMinElems ? omp_get_max_threads() : 1;
#else
  (void)elems;
  return 1;
#endif
}

// Reduction pass: run(Item) once for every item of B rows of D elements.
//  - B >= kSamplesPerThread * threads: a task is one sample (several when D is small), tasks go to
//    the threads dynamically (a preempted thread holds up one task, not a static share);
//  - fewer samples: all items split evenly, in index order, across the threads (static).
template <typename F> void for_reduce_items(int64_t B, int64_t D, const F& run) {
  const int64_t nblk = num_blocks(D);
  if (B <= 0 || nblk == 0) return;
  const int nthr = threads_for(B * D);
  if (B >= kSamplesPerThread * nthr) {
    const int64_t group = std::max<int64_t>(1, kTaskElems / D), ntasks = (B + group - 1) / group;
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t hi = std::min(B, (task + 1) * group) * nblk;
      for (int64_t it = task * group * nblk; it < hi; ++it) run(item_of(it, nblk, D));
    }
  } else {
    const int64_t n = B * nblk;
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(static)
    for (int64_t it = 0; it < n; ++it) run(item_of(it, nblk, D));
  }
}

// Elementwise pass: run(Item) once for every item, in dynamic chunks of >= kTaskElems elements.
// Each thread ends with simd::stream_fence(), so run may write with streaming stores.
template <typename F> void for_elementwise_items(int64_t B, int64_t D, const F& run) {
  const int64_t nblk = num_blocks(D);
  if (B <= 0 || nblk == 0) return;
  const int nthr = threads_for(B * D);
  const int64_t n = B * nblk, chunk = std::max<int64_t>(1, kTaskElems / std::min(D, kBlock));
#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t it = 0; it < n; ++it) run(item_of(it, nblk, D));
    simd::stream_fence();
  }
}

// out[b * NS + j] = sum over k, in order, of p[(b * nblk + k) * NS + j], added in double and
// rounded once to C (0 for D = 0).
template <int NS, typename C> void sum_partials(const double* p, int64_t B, int64_t D, C* out) {
  const int64_t nblk = num_blocks(D);
  for (int64_t b = 0; b < B; ++b)
    for (int j = 0; j < NS; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < nblk; ++k) s += p[(b * nblk + k) * NS + j];
      out[b * NS + j] = C(s);
    }
}

// A whole reduction: sums(item, slot) writes the NS partial sums of an item to slot[0..NS); out[b *
// NS + j] is their total over sample b (sum_partials). Nothing for B <= 0.
template <int NS, typename C, typename F> void reduce(int64_t B, int64_t D, C* out, const F& sums) {
  if (B <= 0) return;
  std::vector<double> partials(size_t(NS * B * num_blocks(D)));
  double* p = partials.data();
  for_reduce_items(B, D, [&](const Item& it) { sums(it, p + NS * it.idx); });
  sum_partials<NS>(p, B, D, out);
}

// ---- dispatch ---------------------------------------------------------------------------------

template <typename T> struct Tag { using type = T; };

// f(Tag<T>{}) for the storage type T of a dtype code; std::invalid_argument for an unknown code.
template <typename F> void dispatch_dtype(int64_t dtype, const char* op, const F& f) {
  switch (dtype) {
    case kFloat32: return f(Tag<float>{});
    case kFloat16: return f(Tag<f16_t>{});
    case kBFloat16: return f(Tag<bf16_t>{});
    case kFloat64: return f(Tag<double>{});
    default:
      throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype) +
                                  " (0 float32, 1 float16, 2 bfloat16, 3 float64)");
  }
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F> void dispatch_bool(bool v, const F& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

// Row b of a batch-strided input: ptr + b * bstride, D contiguous elements.
template <typename T> struct Rows {
  const T* p;
  int64_t bstride;
  const T* row(int64_t b) const { return p + b * bstride; }
  explicit operator bool() const { return p != nullptr; }
};

template <typename T> Rows<T> rows(uintptr_t p, int64_t bstride) {
  return Rows<T>{reinterpret_cast<const T*>(p), bstride};
}

}  // namespace sched
}  // namespace flashdistill
