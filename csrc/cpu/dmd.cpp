// CPU DMD loss forward: dmd_forward of csrc/README.md, the math of include/flashdistill/dmd.h.
//
// Traffic, per element, with s = sizeof(dtype) (4 fp32, 2 fp16/bf16, 8 fp64):
//   pass 1  reads x, real (+ uncond) from memory                    2s (3s with CFG)
//   pass 2  reads real (+ uncond) again, from L2 (see below), and fake from memory; writes g
//           memory:                                                  s read + s written
//   total   inputs read 3s (4s), output written s: 4s (5s) bytes per element, i.e. 4 (5) passes
//           over B*D*s bytes; B = 64, D = 16*64*64 fp32: 4 x 16.8 = 67.1 MB (83.9 MB with CFG).
//   Not counted: the read-for-ownership of g where the CPU does one; partial sums (16 bytes per
//   2048 elements); the re-read of real (+ uncond) where a sample's rows do not fit in L2.
// Work per element: pass 1 sub, abs, add; pass 2 sub, div, mul, add and nan_to_num's 3 compares
// and 3 selects; CFG adds sub, mul, add to each pass. 7 arithmetic ops (13 with CFG), one a
// division, per 16 (20) bytes of fp32: memory-bound, with the division's throughput next (in L2,
// one core does ~3 elements per ns).
//
// Scheme. n_b needs all of sample b before any g of it: two passes per sample. Rows are cut into
// blocks of kBlock elements (the last block of a row is short); item it = b * nblk + k is block k
// of sample b and has two partial sums, p1 (of |x - r|) and p2 (of g^2).
//  - B >= kSamplesPerThread * threads (the usual case): a task is one sample (several when D is
//    small), running pass 1, n_b, pass 2; tasks go to threads dynamically. No barrier, and while a
//    sample's rows fit in L2 (2 MiB here: D up to ~128K fp32 without CFG) pass 2 re-reads
//    them from there, so memory sees the 4s (5s) bytes above.
//  - fewer samples: their blocks are split evenly across the threads, in chunks of samples whose
//    pass-1 rows take ~kChunkBytesPerThread per thread; pass 1, one barrier, pass 2 on the same
//    blocks by the same thread (its L2 again).
// Within a block, sums run in Lanes<C>::n accumulators of the compute type (lane l takes the
// elements l mod n of the block), which gcc keeps in vector registers; the lanes, the blocks of a
// sample and the samples are then added in double in index order. So every rounding depends on
// (B, D) alone: g and loss are the same bits for any thread count, either scheme, and any
// instruction set (fp contraction is off below); tests check 1-4 threads, SSE2 and AVX-512 builds.
//
// 16-bit rows: bf16 loads widen inline (a shift); fp16 rows are widened per tile of kTile elements
// (F16C, or integer code where the CPU lacks it), and 16-bit g goes through a float tile that is
// then rounded (F16C, or integer code). Every conversion gives the bits of common.h's to_float /
// to_bf16 / to_f16 (checked for all inputs), but NaN payloads, which nan_to_num erases anyway.

// fp-contract=off: a + w * b stays two roundings, as torch computes it, rather than an FMA where
// -march allows one, so the bits do not depend on the instruction set. no-trapping-math: lets gcc
// if-convert the selects of nan_to_num and the conversions without AVX-512 masks (it only drops
// the promise to keep floating-point exception flags; every value is unchanged).
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "flashdistill/common.h"
#include "flashdistill/dmd.h"
#include "ops.h"

namespace flashdistill {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;                     // elements per partial sum; fixes the results
constexpr int64_t kTile = 256;                       // 16-bit rows are widened in tiles this long
constexpr int64_t kParallelMinElems = 1 << 15;       // below this B*D, one thread
constexpr int64_t kSamplesPerThread = 4;             // from B >= this * threads, whole samples per task
constexpr int64_t kTaskElems = 1 << 14;              // ... and at least this many elements per task
constexpr int64_t kChunkBytesPerThread = 768 << 10;  // else: pass-1 bytes per thread kept for pass 2

// Independent accumulators per sum: 4 AVX2 registers of float, 4 of double.
template <typename C> struct Lanes;
template <> struct Lanes<float> { static constexpr int n = 32; };
template <> struct Lanes<double> { static constexpr int n = 16; };
static_assert(kTile % 32 == 0 && kBlock % kTile == 0, "tiles must hold whole lane groups");

// ---- conversions, vectorizable, bit-identical to common.h -----------------------------------

// binary16 -> binary32 with integer ops and one exact int -> float conversion for subnormals.
inline float f16_to_float_vec(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + (112u << 23);   // rebias 15 -> 127
  const uint32_t special = (em << 13) + (224u << 23);  // exponent 31 -> 255: inf / NaN
  const uint32_t sub = float_to_bits(float(int32_t(em)) * 5.9604644775390625e-8f);  // em * 2^-24
  uint32_t mag = em >= 0x0400u ? normal : sub;  // sequential selects: gcc if-converts these
  mag = em >= 0x7c00u ? special : mag;
  return bits_to_float(sign | mag);
}

// binary32 -> binary16, round to nearest even; subnormal results round in the FPU by adding 0.5
// (whose ulp is 2^-24, the half subnormal step) in the default rounding mode.
inline uint16_t float_to_f16_vec(float f) {
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  uint32_t mag = a < 0x38800000u ? sub : normal;
  mag = a >= 0x477ff000u ? big : mag;
  return uint16_t(sign | mag);
}

inline uint16_t float_to_bf16_vec(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t nan = (u >> 16) | 0x40u, rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// fp16 <-> float, 8 at a time, with the F16C instructions: inline where the build targets F16C;
// else (x86 builds for an older baseline) compiled for F16C alone and used when the CPU has it.
// (-DFLASHDISTILL_NO_F16C turns both off, to test the integer conversions.)
#if defined(FLASHDISTILL_NO_F16C)
#elif defined(__F16C__)
#define FD_F16C_TARGET
inline bool use_f16c() { return true; }
#elif (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define FD_F16C_TARGET __attribute__((target("avx,f16c")))
#define FD_F16C_DISPATCH 1
inline bool use_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

#ifdef FD_F16C_TARGET
FD_F16C_TARGET inline void widen8_f16c(const f16_t* __restrict__ src, int64_t n8, float* __restrict__ dst) {
  for (int64_t i = 0; i < n8; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}
FD_F16C_TARGET inline void narrow8_f16c(const float* __restrict__ src, int64_t n8, f16_t* __restrict__ dst) {
  for (int64_t i = 0; i < n8; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}
#endif

// widen: n 16-bit values to float; narrow: n floats to 16-bit values.
inline void widen(const bf16_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(uint32_t(src[i].bits) << 16);
}

inline void widen(const f16_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
  int64_t i = 0;
#ifdef FD_F16C_TARGET
  if (use_f16c()) {
    i = n & ~int64_t(7);
    widen8_f16c(src, i, dst);
  }
#endif
  for (; i < n; ++i) dst[i] = f16_to_float_vec(src[i].bits);
}

inline void narrow(const float* __restrict__ src, int64_t n, bf16_t* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_bf16_vec(src[i]);
}

inline void narrow(const float* __restrict__ src, int64_t n, f16_t* __restrict__ dst) {
  int64_t i = 0;
#ifdef FD_F16C_TARGET
  if (use_f16c()) {
    i = n & ~int64_t(7);
    narrow8_f16c(src, i, dst);
  }
#endif
  for (; i < n; ++i) dst[i].bits = float_to_f16_vec(src[i]);
}

// ---- per-block kernels -----------------------------------------------------------------------
//
// The lane loops take their rows as __restrict__ parameters and the accumulators as a local array
// of the caller, so that gcc keeps the L lanes in vector registers. They load through ld and store
// through st (bf16 loads widen inline; see kInlineLoad).

inline float ld(const float* p, int64_t i) { return p[i]; }
inline double ld(const double* p, int64_t i) { return p[i]; }
inline float ld(const bf16_t* p, int64_t i) { return bits_to_float(uint32_t(p[i].bits) << 16); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(double* p, int64_t i, double v) { p[i] = v; }

template <typename C, int L> inline double lanes_total(const C (&acc)[L]) {
  double s = 0.0;
  for (int l = 0; l < L; ++l) s += double(acc[l]);
  return s;
}

// acc[j mod L] += |x_j - r_j| for j < m (m: a multiple of L except at the end of a block).
template <bool kCfg, typename T, typename C, int L>
inline void abs_lanes(const T* __restrict__ xs, const T* __restrict__ rs, const T* __restrict__ us,
                      C w, int64_t m, C (&acc)[L]) {
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l)
      acc[l] += dmd_abs_term(ld(xs, i + l), dmd_teacher<kCfg>(ld(rs, i + l), ld(us, i + l), w));
  for (int l = 0; i + l < m; ++l)
    acc[l] += dmd_abs_term(ld(xs, i + l), dmd_teacher<kCfg>(ld(rs, i + l), ld(us, i + l), w));
}

// g_j stored to gs and acc[j mod L] += g_j^2 (g_j unrounded) for j < m.
template <bool kCfg, typename T, typename G, typename C, int L>
inline void g_lanes(const T* __restrict__ rs, const T* __restrict__ us, const T* __restrict__ fs,
                    C w, C nb, G* __restrict__ gs, int64_t m, C (&acc)[L]) {
  int64_t i = 0;
  for (; i + L <= m; i += L)
    for (int l = 0; l < L; ++l) {
      const C v = dmd_g(ld(fs, i + l), dmd_teacher<kCfg>(ld(rs, i + l), ld(us, i + l), w), nb);
      st(gs, i + l, v);
      acc[l] += v * v;
    }
  for (int l = 0; i + l < m; ++l) {
    const C v = dmd_g(ld(fs, i + l), dmd_teacher<kCfg>(ld(rs, i + l), ld(us, i + l), w), nb);
    st(gs, i + l, v);
    acc[l] += v * v;
  }
}

// Rows loaded inline by ld, vectorized with the lane loop: all but fp16, which is widened per tile
// (F16C, or the integer conversion, which gcc vectorizes alone but not fused into the lane loop).
// 16-bit g always goes through a float tile and narrow(), for the same reason.
template <typename T> constexpr bool kInlineLoad = !std::is_same<T, f16_t>::value;

// Sum over the block's n elements of |x - r|. Tiles keep lane l on the elements l mod L (kTile is
// a multiple of L), so tiled and untiled loops give the same bits.
template <bool kCfg, typename T, typename C = typename Compute<T>::type>
double pass1_block(const T* x, const T* real, const T* uncond, C w, int64_t n) {
  constexpr int L = Lanes<C>::n;
  C acc[L] = {};
  if constexpr (kInlineLoad<T>) {
    abs_lanes<kCfg>(x, real, kCfg ? uncond : real, w, n, acc);
  } else {
    alignas(64) float bx[kTile], br[kTile], bu[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t m = std::min(kTile, n - t);
      widen(x + t, m, bx);
      widen(real + t, m, br);
      if (kCfg) widen(uncond + t, m, bu);
      abs_lanes<kCfg>(bx, br, kCfg ? bu : br, w, m, acc);
    }
  }
  return lanes_total(acc);
}

// g over the block's n elements; returns the sum of g^2.
template <bool kCfg, typename T, typename C = typename Compute<T>::type>
double pass2_block(const T* real, const T* uncond, const T* fake, C w, C nb, T* g, int64_t n) {
  constexpr int L = Lanes<C>::n;
  C acc[L] = {};
  if constexpr (std::is_same<T, C>::value) {
    g_lanes<kCfg>(real, kCfg ? uncond : real, fake, w, nb, g, n, acc);
  } else {
    alignas(64) float br[kTile], bu[kTile], bf[kTile], bg[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t m = std::min(kTile, n - t);
      if constexpr (kInlineLoad<T>) {
        g_lanes<kCfg>(real + t, kCfg ? uncond + t : real + t, fake + t, w, nb, bg, m, acc);
      } else {
        widen(real + t, m, br);
        if (kCfg) widen(uncond + t, m, bu);
        widen(fake + t, m, bf);
        g_lanes<kCfg>(br, kCfg ? bu : br, bf, w, nb, bg, m, acc);
      }
      narrow(bg, m, g + t);
    }
  }
  return lanes_total(acc);
}

// ---- the op ----------------------------------------------------------------------------------

template <typename T> struct Rows {
  const T* p;
  int64_t bstride;
  const T* row(int64_t b) const { return p + b * bstride; }
};

// One call's arguments and its per-block partial sums: p1 of |x - r| and p2 of g^2, item
// it = b * nblk + k for block k of sample b. Every item is computed the same way whichever thread
// runs it and whenever, and the partials are added in index order, so the schedule never shows.
template <typename T> struct Problem {
  using C = typename Compute<T>::type;
  int64_t B, D, nblk;
  Rows<T> x, real, fake, uncond;  // uncond.p == nullptr: no guidance
  const C* guidance;
  C w_all, eps;
  T* g;
  double* p1;
  double* p2;

  C weight(int64_t b) const { return guidance ? guidance[b] : w_all; }

  void pass1(int64_t it) const {
    const int64_t b = it / nblk, off = (it % nblk) * kBlock, n = std::min(kBlock, D - off);
    const T* xr = x.row(b) + off;
    const T* rr = real.row(b) + off;
    p1[it] = uncond.p ? pass1_block<true>(xr, rr, uncond.row(b) + off, weight(b), n)
                      : pass1_block<false>(xr, rr, rr, C(0), n);
  }

  C norm(int64_t b) const {  // n_b from the pass-1 partials of sample b
    double S = 0.0;
    for (int64_t k = 0; k < nblk; ++k) S += p1[b * nblk + k];
    return dmd_norm(C(S / double(D)), eps);
  }

  void pass2(int64_t it, C nb) const {
    const int64_t b = it / nblk, off = (it % nblk) * kBlock, n = std::min(kBlock, D - off);
    const T* rr = real.row(b) + off;
    const T* fr = fake.row(b) + off;
    T* gr = g + b * D + off;
    p2[it] = uncond.p ? pass2_block<true>(rr, uncond.row(b) + off, fr, weight(b), nb, gr, n)
                      : pass2_block<false>(rr, rr, fr, C(0), nb, gr, n);
  }

  void sample(int64_t b) const {  // both passes of one sample
    for (int64_t it = b * nblk; it < (b + 1) * nblk; ++it) pass1(it);
    const C nb = norm(b);
    for (int64_t it = b * nblk; it < (b + 1) * nblk; ++it) pass2(it, nb);
  }
};

inline int thread_num() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int num_threads() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

template <typename T>
void forward(int64_t B, int64_t D, Rows<T> x, Rows<T> real, Rows<T> fake, Rows<T> uncond,
             const typename Compute<T>::type* guidance, double guidance_scale, double eps,
             T* g, typename Compute<T>::type* loss) {
  using C = typename Compute<T>::type;
  if (B <= 0 || D <= 0) {  // a mean over no elements
    *loss = std::numeric_limits<C>::quiet_NaN();
    return;
  }
  const int64_t nblk = (D + kBlock - 1) / kBlock;
  std::vector<double> p1(static_cast<size_t>(B * nblk)), p2(static_cast<size_t>(B * nblk));
  const Problem<T> P{B, D, nblk, x, real, fake, uncond, guidance, C(guidance_scale), C(eps), g,
                     p1.data(), p2.data()};

  int nthr = 1;
#ifdef _OPENMP
  if (B * D >= kParallelMinElems) nthr = omp_get_max_threads();
#endif
  if (B >= kSamplesPerThread * nthr) {
    // Whole samples per task, several when D is small: no barrier, and a task's rows are read
    // by pass 2 from the L2 that pass 1 filled (when they fit). Dynamic: a thread the OS
    // preempts holds up one task, not the others.
    const int64_t group = std::max<int64_t>(1, kTaskElems / D), ntasks = (B + group - 1) / group;
#pragma omp parallel for num_threads(nthr) if (nthr > 1) schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task)
      for (int64_t b = task * group; b < std::min(B, (task + 1) * group); ++b) P.sample(b);
  } else {
    // Few samples: their blocks are split evenly across the threads, a chunk of samples at a
    // time, sized so that a thread's pass-1 rows stay in its L2 for pass 2 (same blocks, same
    // thread). One barrier per chunk, between its passes.
    const int64_t sample_bytes = (uncond.p ? 3 : 2) * int64_t(sizeof(T)) * D;
    const int64_t spc = std::max<int64_t>(1, std::min<int64_t>(B, nthr * kChunkBytesPerThread / sample_bytes));
#pragma omp parallel num_threads(nthr) if (nthr > 1)
    {
      const int64_t t = thread_num(), nt = num_threads();
      for (int64_t c0 = 0; c0 < B; c0 += spc) {
        const int64_t first = c0 * nblk, items = std::min(spc, B - c0) * nblk;
        const int64_t lo = first + items * t / nt, hi = first + items * (t + 1) / nt;
        for (int64_t it = lo; it < hi; ++it) P.pass1(it);
#pragma omp barrier
        int64_t b = -1;
        C nb = C(0);
        for (int64_t it = lo; it < hi; ++it) {
          if (it / nblk != b) nb = P.norm(b = it / nblk);
          P.pass2(it, nb);
        }
      }
    }
  }

  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double S = 0.0;
    for (int64_t k = 0; k < nblk; ++k) S += p2[size_t(b * nblk + k)];
    total += S;
  }
  *loss = C(0.5 * total / (double(B) * double(D)));
}

template <typename T> Rows<T> rows(uintptr_t p, int64_t bstride) {
  return Rows<T>{reinterpret_cast<const T*>(p), bstride};
}

template <typename T>
void forward_dtype(int64_t B, int64_t D, uintptr_t x, int64_t xs, uintptr_t real, int64_t rs,
                   uintptr_t fake, int64_t fs, uintptr_t uncond, int64_t us, uintptr_t guidance,
                   double guidance_scale, double eps, uintptr_t g, uintptr_t loss) {
  using C = typename Compute<T>::type;
  forward<T>(B, D, rows<T>(x, xs), rows<T>(real, rs), rows<T>(fake, fs), rows<T>(uncond, us),
             reinterpret_cast<const C*>(guidance), guidance_scale, eps, reinterpret_cast<T*>(g),
             reinterpret_cast<C*>(loss));
}

void check_dtype(int64_t dtype, const char* op) {
  if (dtype < kFloat32 || dtype > kFloat64)
    throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype) +
                                " (0 float32, 1 float16, 2 bfloat16, 3 float64)");
}

}  // namespace

void dmd_forward(int64_t dtype, int64_t B, int64_t D,
                 uintptr_t x, int64_t x_bstride,
                 uintptr_t real, int64_t real_bstride,
                 uintptr_t fake, int64_t fake_bstride,
                 uintptr_t real_uncond, int64_t real_uncond_bstride,
                 uintptr_t guidance, double guidance_scale, double eps,
                 uintptr_t g, uintptr_t loss,
                 uintptr_t /*workspace*/, int64_t /*workspace_bytes*/,
                 uintptr_t /*stream*/) {
  check_dtype(dtype, "dmd_forward");
  switch (dtype) {
    case kFloat32:
      return forward_dtype<float>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride,
                                  real_uncond, real_uncond_bstride, guidance, guidance_scale, eps, g, loss);
    case kFloat16:
      return forward_dtype<f16_t>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride,
                                  real_uncond, real_uncond_bstride, guidance, guidance_scale, eps, g, loss);
    case kBFloat16:
      return forward_dtype<bf16_t>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride,
                                   real_uncond, real_uncond_bstride, guidance, guidance_scale, eps, g, loss);
    default:
      return forward_dtype<double>(B, D, x, x_bstride, real, real_bstride, fake, fake_bstride,
                                   real_uncond, real_uncond_bstride, guidance, guidance_scale, eps, g, loss);
  }
}

int64_t dmd_workspace_bytes(int64_t dtype, int64_t /*B*/, int64_t /*D*/) {
  check_dtype(dtype, "dmd_workspace_bytes");
  return 0;
}

}  // namespace cpu
}  // namespace flashdistill
