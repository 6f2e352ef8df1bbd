// CPU only (g++): element loads, stores and 16-bit conversions written so that gcc vectorizes them,
// each bit-identical to common.h's to_float / to_bf16 / to_f16 (NaN payloads aside). Taken from
// cpu/dmd.cpp, where they were checked against common.h for all 2^16 inputs and every rounding case.
//
// Include this after the kernel file's `#pragma GCC optimize("fp-contract=off", "no-trapping-math")`,
// as score_identity.cpp and regression.cpp do: gcc does not inline across functions of different
// optimize attributes.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "flashdistill/common.h"

namespace flashdistill {
namespace simd {

// ---- scalar conversions, vectorizable ---------------------------------------------------------

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

// ---- fp16 <-> float, 8 at a time, with F16C ----------------------------------------------------
// Inline where the build targets F16C; else (x86 builds for an older baseline) compiled for F16C
// alone and used when the CPU has it. -DFLASHDISTILL_NO_F16C turns both off (tests the integer code).
#if defined(FLASHDISTILL_NO_F16C)
#elif defined(__F16C__)
#define FD_SIMD_F16C_TARGET
inline bool use_f16c() { return true; }
#elif (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define FD_SIMD_F16C_TARGET __attribute__((target("avx,f16c")))
inline bool use_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

#ifdef FD_SIMD_F16C_TARGET
FD_SIMD_F16C_TARGET inline void widen8_f16c(const f16_t* __restrict__ src, int64_t n8, float* __restrict__ dst) {
  for (int64_t i = 0; i < n8; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}
FD_SIMD_F16C_TARGET inline void narrow8_f16c(const float* __restrict__ src, int64_t n8, f16_t* __restrict__ dst) {
  for (int64_t i = 0; i < n8; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}
#endif

// ---- whole tiles: widen n 16-bit values to float; narrow n floats to 16-bit values ------------

inline void widen(const bf16_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(uint32_t(src[i].bits) << 16);
}

inline void widen(const f16_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
  int64_t i = 0;
#ifdef FD_SIMD_F16C_TARGET
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
#ifdef FD_SIMD_F16C_TARGET
  if (use_f16c()) {
    i = n & ~int64_t(7);
    narrow8_f16c(src, i, dst);
  }
#endif
  for (; i < n; ++i) dst[i].bits = float_to_f16_vec(src[i]);
}

// ---- streaming (non-temporal) stores ----------------------------------------------------------
// An ordinary store to a line that is not in cache first reads the line (read-for-ownership), so
// writing an output that the cache cannot keep costs a read and a write of memory. A streaming store
// writes whole 64-byte lines without reading them and without keeping them in cache. They only
// change how the bits get to memory, never which bits.
//
// Kernels write an output tile by tile: into a tile in L1, then stream_copy to memory, when the call
// moves more bytes than the cache holds (stream_outputs); else with ordinary stores, so that the
// output stays in cache for the op that reads it next. Threads that streamed end with stream_fence()
// before their parallel region ends (streaming stores are weakly ordered). Needs AVX (-march): else
// (other architectures, older x86 baselines) stream_copy is a plain copy and stream_outputs false.

#if defined(__AVX__)
#define FD_SIMD_STREAM 1
#endif

// A call that reads and writes more than this many bytes in all streams its outputs. Tuning only
// (the bits are the same either way), for a 32 MiB L3: half of it. Zen 4 VM, 2 threads, fp32,
// streaming / ordinary time of sid backward, regression backward and grad_scale:
//  - the same call repeated on the same buffers (what fits stays in L3): 6-12 MiB moved 1.5-2.7x
//    (the ordinary stores hit in L3), 24-100 MiB 0.55-0.75x; in between it depends on the kernel
//    (16-20 MiB: sid 0.5-0.8x, regression 1.0x; grad_scale 21-25 MiB 1.2x, 29 MiB 0.8x);
//  - the inputs cold (96 MiB read between calls, as in a training step): 1.0x at 16 MiB and below,
//    0.65-1.0x above (bf16 0.8-1.0x: its rounding, not memory, is the limit of sid and regression).
// glibc's sysconf reports the host's L3 in a VM (320 MiB here), so the size is not read at run time.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

inline bool stream_outputs(int64_t bytes_moved) {
#ifdef FD_SIMD_STREAM
  return bytes_moved > kStreamMinBytes;
#else
  (void)bytes_moved;
  return false;
#endif
}

// dst[i] = src[i] for i < n: the whole 64-byte lines of dst with streaming stores, the partial lines
// at either end (dst needs only T's alignment) with ordinary ones.
template <typename T> inline void stream_copy(const T* __restrict__ src, int64_t n, T* __restrict__ dst) {
  int64_t i = 0;
#ifdef FD_SIMD_STREAM
  static_assert(64 % sizeof(T) == 0, "elements must tile a cache line");
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 64 != 0; ++i) dst[i] = src[i];
  for (; i + kLine <= n; i += kLine) {
    const char* s = reinterpret_cast<const char*>(src + i);
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(s));
#else
    __m256i* d = reinterpret_cast<__m256i*>(dst + i);
    _mm256_stream_si256(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    _mm256_stream_si256(d + 1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32)));
#endif
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// Orders this thread's streaming stores before what follows (the end of a parallel region).
inline void stream_fence() {
#ifdef FD_SIMD_STREAM
  _mm_sfence();
#endif
}

// ---- square roots of a tile ----------------------------------------------------------------------
// p[i] = sqrt(p[i]), i < n, correctly rounded like std::sqrt (so the same bits), in vector
// instructions: gcc 12 keeps sqrt's errno branch, which blocks vectorization, even under
// `#pragma GCC optimize("no-math-errno")` (only the command-line flag removes it). 256-bit even
// where AVX-512 is there: gcc 12 warns (-Wmaybe-uninitialized, a false positive) in _mm512_sqrt_ps,
// and Zen 4 splits 512-bit square roots in two anyway.

inline void sqrt_inplace(float* p, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, _mm256_sqrt_ps(_mm256_loadu_ps(p + i)));
#elif defined(__SSE2__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(p + i, _mm_sqrt_ps(_mm_loadu_ps(p + i)));
#endif
  for (; i < n; ++i) p[i] = std::sqrt(p[i]);
}

inline void sqrt_inplace(double* p, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(p + i, _mm256_sqrt_pd(_mm256_loadu_pd(p + i)));
#elif defined(__SSE2__)
  for (; i + 2 <= n; i += 2) _mm_storeu_pd(p + i, _mm_sqrt_pd(_mm_loadu_pd(p + i)));
#endif
  for (; i < n; ++i) p[i] = std::sqrt(p[i]);
}

// ---- per-element loads inside vectorized loops --------------------------------------------------
// fp32, fp64 and bf16 (a shift) load inline and vectorize fused into the caller's loop; fp16 does not
// (gcc vectorizes f16_to_float_vec alone, not fused), so fp16 rows are widened per tile first.

inline float ld(const float* p, int64_t i) { return p[i]; }
inline double ld(const double* p, int64_t i) { return p[i]; }
inline float ld(const bf16_t* p, int64_t i) { return bits_to_float(uint32_t(p[i].bits) << 16); }

template <typename T> constexpr bool kInlineLoad = !std::is_same<T, f16_t>::value;

// Lanes<C>::n independent accumulators per sum (lane l takes the elements l mod n): 64 bytes of
// float (one AVX-512 register, two AVX2), 128 of double. Part of the result's definition (it fixes
// the order of the additions), so it must not depend on the instruction set. (16 doubles, not 8:
// with 8, gcc 12 -march=znver4 vectorizes score_identity's three-sum lane loop across i instead,
// with ~550 permutes per block, 0.8 instead of 2+ Gelem/s in L2.)
template <typename C> struct Lanes;
template <> struct Lanes<float> { static constexpr int n = 16; };
template <> struct Lanes<double> { static constexpr int n = 16; };

template <typename C, int L> inline double lanes_total(const C (&acc)[L]) {
  double s = 0.0;
  for (int l = 0; l < L; ++l) s += double(acc[l]);
  return s;
}

}  // namespace simd
}  // namespace flashdistill
