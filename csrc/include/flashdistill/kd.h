// Logit knowledge distillation (kernels/kd/reference.py, ../shared/research/llm_kd.md Sec. 1): the
// divergence codes of kd_forward and elementwise exp / log1p written with plain arithmetic and bit
// operations, so that gcc vectorizes loops that call them (libm's expf / logf are calls; glibc's
// vector variants need -ffast-math) and the results do not depend on the instruction set.
//
// kd_exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, Taylor polynomial of degree 7 (float,
// truncation < 1.2e-8 relative) or 13 (double, < 5e-18), scaled by 2^n through the exponent bits.
// Arguments below the smallest normal's log give 0 (no subnormal results), above the largest finite
// one +inf; NaN stays NaN. A few ulp (the Horner steps round separately: fp-contract=off).
// kd_log1p(y), y > -1 (finite): log(w), w = 1 + y, from w's exponent and atanh series in s = f/(2+f)
// (|s| <= 0.1716; 5 terms float, 12 double), plus the fdlibm correction (y - (w - 1)) / w for the
// rounding of w.
#pragma once

#include <cstdint>
#include <cstring>

#include "flashdistill/common.h"

namespace flashdistill {

// kd_forward's `kind`.
enum KdKind : int64_t {
  kKdForwardKL = 0,
  kKdReverseKL = 1,
  kKdJSD = 2,
  kKdJSDNormalized = 3,
  kKdTVD = 4,
  kKdSkewForwardKL = 5,
  kKdSkewReverseKL = 6,
  kKdMixed = 7,
  kKdTAID = 8,  // forward KL to p_lam = softmax(lam v + (1 - lam) sg(u)) (TAID); lam is the lam argument
};

// Row r's weights in the row kernels' ABI (csrc/README.md): the soft weight (1 without the array),
// the label (-1 without labels), the hard-CE weight (0 without the array), and whether the row
// has a hard-CE gradient.
template <typename C> struct RowWeights {
  C rw;
  int64_t y;
  C hw;
  bool hard_grad;
};

template <typename C>
FD_HD RowWeights<C> row_weights(const void* row_weight, const void* labels, const void* hard_weight, int64_t r) {
  RowWeights<C> w;
  w.rw = row_weight ? static_cast<const C*>(row_weight)[r] : C(1);
  w.y = labels ? static_cast<const int64_t*>(labels)[r] : int64_t(-1);
  w.hw = hard_weight ? static_cast<const C*>(hard_weight)[r] : C(0);
  w.hard_grad = w.y >= 0 && w.hw != C(0);
  return w;
}

namespace kdmath {

// Forced inline on the host: gcc otherwise keeps the double versions as calls, which stops the
// vectorization of the loops around them.
#if defined(__CUDACC__) || !defined(__GNUC__)
#define FD_KD_INLINE FD_HD
#else
#define FD_KD_INLINE inline __attribute__((always_inline))
#endif

FD_HD uint64_t dbits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
FD_HD double bits_d(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }

FD_KD_INLINE float kd_exp(float x) {
  const float lo = -87.0f, hi = 88.0f, magic = 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float t = xc * 1.44269504088896341f + magic;
  const int32_t n = int32_t(float_to_bits(t) - float_to_bits(magic));
  const float nf = t - magic;
  float r = xc - nf * 0.693359375f;  // ln2 hi (8 bits) + lo
  r = r - nf * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  float res = p * bits_to_float(uint32_t(n + 127) << 23);
  res = x < lo ? 0.0f : res;
  res = x > hi ? __builtin_inff() : res;
  return res;
}

FD_KD_INLINE double kd_exp(double x) {
  const double lo = -708.0, hi = 709.0, magic = 6755399441055744.0;  // 1.5 * 2^52
  double xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const double t = xc * 1.4426950408889634074 + magic;
  const int64_t n = int64_t(dbits(t) - dbits(magic));
  const double nf = t - magic;
  double r = xc - nf * 6.93147180369123816490e-01;
  r = r - nf * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  double res = p * bits_d(uint64_t(n + 1023) << 52);
  res = x < lo ? 0.0 : res;
  res = x > hi ? __builtin_inf() : res;
  return res;
}

FD_KD_INLINE float kd_log1p(float y) {
  const float w = 1.0f + y;
  const uint32_t u = float_to_bits(w);
  int32_t e = int32_t(u >> 23) - 127;
  float m = bits_to_float((u & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, s = f / (2.0f + f), s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float ef = float(e);
  const float c = (y - (w - 1.0f)) / w;
  return ef * 0.693359375f + ((2.0f * s * p + c) + ef * -2.12194440e-4f);
}

FD_KD_INLINE double kd_log1p(double y) {
  const double w = 1.0 + y;
  const uint64_t u = dbits(w);
  int64_t e = int64_t(u >> 52) - 1023;
  double m = bits_d((u & 0xfffffffffffffull) | 0x3ff0000000000000ull);
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  e = big ? e + 1 : e;
  const double f = m - 1.0, s = f / (2.0 + f), s2 = s * s;
  double p = 1.0 / 23.0;
  p = p * s2 + 1.0 / 21.0;
  p = p * s2 + 1.0 / 19.0;
  p = p * s2 + 1.0 / 17.0;
  p = p * s2 + 1.0 / 15.0;
  p = p * s2 + 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  const double ef = double(e);
  const double c = (y - (w - 1.0)) / w;
  return ef * 6.93147180369123816490e-01 + ((2.0 * s * p + c) + ef * 1.90821492927058770002e-10);
}

// log(exp(a) + exp(b)); -inf when both are -inf.
template <typename C> FD_KD_INLINE C kd_logaddexp(C a, C b) {
  const C mx = a > b ? a : b, d = a > b ? b - a : a - b;  // d <= 0 (NaN when both are -inf)
  const C r = mx + kd_log1p(kd_exp(d));
  return mx == -C(__builtin_inf()) ? mx : r;
}

}  // namespace kdmath
}  // namespace flashdistill
