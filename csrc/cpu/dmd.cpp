// CPU DMD loss forward: dmd_forward of csrc/README.md, the math of include/flashdistill/dmd.h.
//
// Traffic and work, per element, with s = sizeof(dtype) (4 fp32, 2 fp16/bf16, 8 fp64):
//   pass 1  reads x, real (+ uncond)                     2s (3s with CFG) bytes
//   pass 2  reads real (+ uncond) again and fake, writes g; real (+ uncond) come from L2 (below),
//           so only fake and g reach memory              2s bytes
//   DRAM total: 3 reads + 1 write = 4s bytes (no CFG), 4 reads + 1 write = 5s bytes (CFG);
//   e.g. B = 64, D = 16*64*64 fp32: 4 x 16.8 MB = 67.1 MB (no CFG), 5 x 16.8 MB = 83.9 MB (CFG).
//   (g's write-allocate read, if the CPU does one, is not counted.) Nothing else is read or
//   written but 2 doubles per 2048 elements of partial sums.
//   flops: pass 1 sub, abs, add (+ sub, mul, add for CFG); pass 2 sub, div, 3 compare/selects
//   (nan_to_num), mul, add (+ sub, mul, add for CFG): ~11 (~17 with CFG), one of them a division.
//   At ~4-5 bytes per flop this is bound by memory bandwidth, the division's throughput second.
//
// Scheme. n_b needs all of sample b before any g of it, so the op is two passes over each sample.
// Samples are processed in chunks of consecutive samples sized so that the pass-1 rows of a chunk
// fit in the threads' L2 caches (kChunkBytesPerThread each): a chunk is one sample when D is large,
// many when D is small. A chunk's rows are cut into blocks of kBlock elements (a short last block
// per sample), and its (sample, block) items are split across the threads by a static schedule:
// pass 1 over all items, barrier, n_b per sample, barrier, pass 2 over the same items (so each
// thread re-reads from its own L2 what it read in pass 1), barrier, sum of g^2 per sample. Within
// a block, sums run in Lanes<C>::n independent accumulators of the compute type (lane l takes the
// elements i = l mod n of the block), which gcc vectorizes; the lanes and then the blocks are added
// in double in index order. Every rounding is therefore fixed by (B, D) alone: g and loss are the
// same bits whatever the thread count, chunking or instruction set (fp contraction is off below).
//
// 16-bit rows are widened to float in tiles of kTile elements (F16C for fp16 when compiled in,
// else branch-free integer code; bf16 is a shift) and g is narrowed the same way; every conversion
// gives the same bits as common.h's to_float / to_bf16 / to_f16 (NaN payloads aside, which
// nan_to_num erases before any output).

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
constexpr int64_t kChunkBytesPerThread = 768 << 10;  // pass-1 bytes per thread kept for pass 2
constexpr int64_t kParallelMinElems = 1 << 15;       // below this B*D, one thread

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
#if defined(__F16C__)
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

template <typename T>
void forward(int64_t B, int64_t D, Rows<T> x, Rows<T> real, Rows<T> fake, Rows<T> uncond,
             const typename Compute<T>::type* guidance, double guidance_scale, double eps_in,
             T* g, typename Compute<T>::type* loss) {
  using C = typename Compute<T>::type;
  if (B <= 0 || D <= 0) {  // mean over no elements
    *loss = std::numeric_limits<C>::quiet_NaN();
    return;
  }
  const bool cfg = uncond.p != nullptr;
  const C eps = C(eps_in), w_all = C(guidance_scale);
  const int64_t nblk = (D + kBlock - 1) / kBlock;

  int nthr = 1;
#ifdef _OPENMP
  if (B * D >= kParallelMinElems) nthr = omp_get_max_threads();
#endif
  // Samples per chunk: their pass-1 rows fill about kChunkBytesPerThread of L2 per thread.
  const int64_t sample_bytes = (cfg ? 3 : 2) * int64_t(sizeof(T)) * D;
  const int64_t spc = std::max<int64_t>(1, std::min<int64_t>(B, nthr * kChunkBytesPerThread / sample_bytes));

  std::vector<double> part(static_cast<size_t>(spc * nblk)), sumsq(static_cast<size_t>(B));
  std::vector<C> nbv(static_cast<size_t>(spc));

  auto weight = [&](int64_t b) { return guidance ? guidance[b] : w_all; };

#pragma omp parallel num_threads(nthr) if (nthr > 1)
  for (int64_t c0 = 0; c0 < B; c0 += spc) {
    const int64_t cs = std::min(spc, B - c0), items = cs * nblk;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = c0 + it / nblk, off = (it % nblk) * kBlock, n = std::min(kBlock, D - off);
      const T* xr = x.row(b) + off;
      const T* rr = real.row(b) + off;
      part[size_t(it)] = cfg ? pass1_block<true>(xr, rr, uncond.row(b) + off, weight(b), n)
                             : pass1_block<false>(xr, rr, rr, C(0), n);
    }
#pragma omp for schedule(static)
    for (int64_t s = 0; s < cs; ++s) {
      double S = 0.0;
      for (int64_t k = 0; k < nblk; ++k) S += part[size_t(s * nblk + k)];
      nbv[size_t(s)] = dmd_norm(C(S / double(D)), eps);
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t s = it / nblk, b = c0 + s, off = (it % nblk) * kBlock, n = std::min(kBlock, D - off);
      const T* rr = real.row(b) + off;
      const T* fr = fake.row(b) + off;
      T* gr = g + b * D + off;
      const C nb = nbv[size_t(s)];
      part[size_t(it)] = cfg ? pass2_block<true>(rr, uncond.row(b) + off, fr, weight(b), nb, gr, n)
                             : pass2_block<false>(rr, rr, fr, C(0), nb, gr, n);
    }
#pragma omp for schedule(static)
    for (int64_t s = 0; s < cs; ++s) {
      double S = 0.0;
      for (int64_t k = 0; k < nblk; ++k) S += part[size_t(s * nblk + k)];
      sumsq[size_t(c0 + s)] = S;
    }
  }

  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) total += sumsq[size_t(b)];
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
