// Shared by the CPU (g++) and CUDA (nvcc) builds: the scalar types we load and store, their
// conversion to the compute type, and the per-element helpers every op uses. Nothing here may use
// device-only features (shared memory, shuffles, atomics); those live in the .cu files.
#pragma once

#include <cstdint>
#include <cstring>
#include <cfloat>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace flashdistill {

// Dtype codes passed from Python (flashdistill/kernels/native.py keeps the inverse table).
enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Storage types for the two 16-bit formats: raw bits, converted by hand so that the host and the
// device code share one definition and no vendor header is needed on the CPU.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

FD_HD float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
FD_HD uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

FD_HD float to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }

FD_HD bf16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16_t{uint16_t(u >> 16)};
}

// IEEE binary16 <-> binary32, round to nearest even, subnormals and inf/NaN handled.
FD_HD float to_float(f16_t v) {
  uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float f = float(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

FD_HD f16_t to_f16(float f) {
  uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {                                          // subnormal or zero in half
    // half subnormal = round(|f| * 2^24); compute on the float's significand to round once.
    if (a < 0x33000000u) return f16_t{uint16_t(sign)};            // < 2^-25 rounds to 0
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;                                     // 14..24 for this range
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return f16_t{uint16_t(sign | r)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits, ties to even
  r -= 0x38000000u;                             // rebias exponent 127 -> 15
  return f16_t{uint16_t(sign | (r >> 13))};
}

FD_HD float to_float(float v) { return v; }
FD_HD double to_double(double v) { return v; }

// Per-element load/store in the compute type: float for the 16-bit and 32-bit formats, double for
// double. Accumulators follow the compute type.
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

FD_HD float load(const float* p, int64_t i) { return p[i]; }
FD_HD double load(const double* p, int64_t i) { return p[i]; }
FD_HD float load(const bf16_t* p, int64_t i) { return to_float(p[i]); }
FD_HD float load(const f16_t* p, int64_t i) { return to_float(p[i]); }

FD_HD void store(float* p, int64_t i, float v) { p[i] = v; }
FD_HD void store(double* p, int64_t i, double v) { p[i] = v; }
FD_HD void store(bf16_t* p, int64_t i, float v) { p[i] = to_bf16(v); }
FD_HD void store(f16_t* p, int64_t i, float v) { p[i] = to_f16(v); }

// torch.nan_to_num with its defaults, in the compute type: NaN -> 0, +-inf -> +-max finite.
template <typename C> struct Limits;
template <> struct Limits<float> { static constexpr float max = FLT_MAX; };
template <> struct Limits<double> { static constexpr double max = DBL_MAX; };

template <typename C> FD_HD C nan_to_num(C v) {
  const C big = Limits<C>::max;
  if (v != v) return C(0);
  if (v > big) return big;
  if (v < -big) return -big;
  return v;
}

// Classifier-free guidance, Ho & Salimans 2022 convention: uncond + w (cond - uncond).
template <typename C> FD_HD C cfg(C cond, C uncond, C w) { return uncond + w * (cond - uncond); }

// clamp_min that lets NaN through, as torch.clamp does (std::fmax would return eps for NaN).
template <typename C> FD_HD C clamp_min_nan(C v, C lo) { return v < lo ? lo : v; }

}  // namespace flashdistill
