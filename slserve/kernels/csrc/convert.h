// Row conversion to float32 that the compiler can vectorise: a bfloat16 is the top half of a
// float32, so widening is a shift (c10's scalar conversion does not vectorise as well).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace slserve {

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// A row as float32: float32 rows are read in place, others converted into `buf`.
template <typename T>
inline const float* float_row(const T* src, float* buf, int64_t n) {
  to_float(src, buf, n);
  return buf;
}
inline const float* float_row(const float* src, float*, int64_t) { return src; }

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

// float32 -> bfloat16, round to nearest even (NaN stays a quiet NaN), as c10's conversion does,
// in integer arithmetic that vectorises.
template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// kN > 0 fixes the length at compile time (e.g. head_dim 64 or 128), so that the loop unrolls
// into straight vector code; kN = 0 takes n at run time.
template <int64_t kN = 0>
inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < (kN ? kN : n); ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
template <int64_t kN = 0>
inline void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < (kN ? kN : n); ++i) y[i] += a * x[i];
}

// exp for x <= 0 (softmax after subtracting the max): 2^(x log2 e), the integer part in the
// exponent bits and the fraction by a degree-5 polynomial; relative error ~2e-7, and unlike
// std::exp it vectorises.
inline float exp_nonpositive(float x) {
  const float t = (x < -87.f ? -87.f : x) * 1.44269504088896341f;
  const float fi = __builtin_floorf(t);
  const float f = t - fi;
  float p = 1.8775767e-3f;
  p = p * f + 8.9893397e-3f;
  p = p * f + 5.5826318e-2f;
  p = p * f + 2.4015361e-1f;
  p = p * f + 6.9315308e-1f;
  p = p * f + 9.9999994e-1f;
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<uint32_t>(static_cast<int32_t>(fi)) << 23;
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

}  // namespace slserve
