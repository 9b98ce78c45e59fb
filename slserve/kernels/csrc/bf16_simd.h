// AVX512-BF16 building blocks shared by the CPU loops (compiled in only where the CPU has them).
//
// vdpbf16ps multiplies bfloat16 pairs straight from memory and accumulates in float32. To use it
// for a sum over rows (y += sum_r h[r] * W[r, :]), two rows are interleaved word by word in
// registers (unpacklo/hi_epi16) so that each 32-bit lane holds the pair (W[r, c], W[r + 1, c]),
// and the pair (h[r], h[r + 1]) is broadcast. The interleave works within 128-bit lanes, so a
// 32-column block's two float32 accumulators hold its columns in the order
//   lo = {0-3, 8-11, 16-19, 24-27},  hi = {4-7, 12-15, 20-23, 28-31};
// `widen_pairs` loads bfloat16 values into that order and `store_pairs` puts them back in place.
#pragma once
#if defined(__AVX512BF16__)
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace slserve::bf16 {

inline __mmask32 mask32(int64_t k) { return k >= 32 ? ~__mmask32(0) : (__mmask32(1) << k) - 1; }

inline __m512i load32i(const c10::BFloat16* p, __mmask32 m) { return _mm512_maskz_loadu_epi16(m, p); }

// Ask for the cache line holding p (no fault if p is past the end of a mapping): into L1, or
// only as far as L2 for data needed later (an L1 prefetch holds one of L1's few miss buffers, and
// a line brought in too early is evicted again before it is read).
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

inline __m512bh bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// Two bfloat16 values as one 32-bit word: the operand vdpbf16ps pairs with an interleaved lane.
inline uint32_t pair(float a, float b) {
  return static_cast<uint32_t>(c10::BFloat16(a).x) | static_cast<uint32_t>(c10::BFloat16(b).x) << 16;
}

// 32 bfloat16 values at p (masked) as float32 in lo/hi order.
inline void widen_pairs(const c10::BFloat16* p, __mmask32 m, __m512& lo, __m512& hi) {
  const __m512i v = load32i(p, m), zero = _mm512_setzero_si512();  // (0, x) is x as float32
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
}

// Round lo/hi (float32, lo/hi order) to bfloat16 and store them in natural order (masked).
inline void store_pairs(c10::BFloat16* p, __mmask32 m, __m512 lo, __m512 hi) {
  static const __m512i unpermute = [] {
    alignas(64) int16_t idx[32];
    for (int c = 0; c < 32; ++c) idx[c] = static_cast<int16_t>((c % 8 < 4 ? 0 : 16) + 4 * (c / 8) + c % 4);
    return _mm512_load_si512(idx);
  }();
  const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  _mm512_mask_storeu_epi16(p, m, _mm512_permutexvar_epi16(unpermute, packed));
}

// Rows r and r + 1 of a 32-column block (w0, w1), interleaved into lo/hi pair lanes.
struct Pairs {
  __m512bh lo, hi;
  Pairs(__m512i w0, __m512i w1)
      : lo(bh(_mm512_unpacklo_epi16(w0, w1))), hi(bh(_mm512_unpackhi_epi16(w0, w1))) {}
};

// acc_lo/hi += h.lo * w0 + h.hi * w1 for the interleaved rows w.
inline void madd_pair(const Pairs& w, __m512i h, __m512& lo, __m512& hi) {
  lo = _mm512_dpbf16_ps(lo, w.lo, bh(h));
  hi = _mm512_dpbf16_ps(hi, w.hi, bh(h));
}

// 16 bfloat16 values at p (masked; the others read as 0) as float32, and back (rounded to
// nearest even, as c10's conversion rounds).
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store16(c10::BFloat16* p, __mmask16 m, __m512 v) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  if (m == __mmask16(0xffff))
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  else
    _mm256_mask_storeu_epi16(p, m, h);
}
// v rounded to bfloat16 precision, as float32.
inline __m512 round16(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v))), 16));
}
inline __mmask16 mask16(int64_t k) { return k >= 16 ? __mmask16(0xffff) : __mmask16((1u << k) - 1); }

// slserve::exp_nonpositive (convert.h) on 16 lanes: the same polynomial, 2^integer part by scalef.
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, fi);
  __m512 p = _mm512_set1_ps(1.8775767e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9893397e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5826318e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015361e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315308e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999994e-1f));
  return _mm512_scalef_ps(p, fi);
}

}  // namespace slserve::bf16
#endif
