// Batched mixed-rank LoRA for the CPU path: slserve/kernels/lora.py:apply_lora in C++.
//
// For segment s (token rows bounds[s]) whose slot-table row names a stacked A [R, in] and expands
// (BT [r, out], h0, y0) in the pool:   h = x[seg] @ A^T ;   y[seg, y0:y0+out] += h[:, h0:h0+r] @ BT
// The table is built once per adapter residency, so a call costs one dispatch whatever the
// number of adapters in the batch.
//
// Decode segments hold a handful of tokens. There a library matmul spends more time setting up
// than computing (tens of microseconds for a bfloat16 call), so short segments use loops that
// read each weight row once and accumulate in float32. In bfloat16 on CPUs with AVX512-BF16 the
// loops are hand-vectorised (below) and also take the prefill segments; elsewhere long segments
// go to at::mm / addmm_. Segments write disjoint rows of y, so they are spread over the intra-op
// threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "bf16_simd.h"
#include "convert.h"

namespace {

// Segments up to this many tokens run as loops on every type; longer ones are cut into pieces of
// this size where they run as loops too.
constexpr int64_t kShortSegment = 32;
// Cost model for splitting pieces over threads: reading a weight from memory costs about as much
// as applying it to this many tokens from cache.
constexpr double kTokensPerWeightRead = 8;
#if defined(__AVX512BF16__)
constexpr bool kBf16Simd = true;
// Pieces of at least this many tokens run through the wide loops.
constexpr int64_t kWideTokens = 8;
#else
constexpr bool kBf16Simd = false;
#endif

// The slot-table row layout of slserve/kernels/lora.py (SLOT_FIELDS):
//   [a_off, rank, in, num_expands, then (b_off, r, out, h0, y0) per expand]
constexpr int kMaxExpands = 3;
constexpr int kExpandFields = 5;
constexpr int kSlotFields = 4 + kMaxExpands * kExpandFields;

// One segment's weights, resolved to pointers: A [rank, in] and each expand's B^T [r, out], the
// h columns it reads (h0) and the y columns it writes (y0).
template <typename T>
struct Slot {
  const T* a;
  int64_t rank, in;
  int n;
  const T* bt[kMaxExpands];
  int64_t r[kMaxExpands], out[kMaxExpands], h0[kMaxExpands], y0[kMaxExpands];
};

template <typename T>
Slot<T> read_slot(const int64_t* row, const T* pool) {
  Slot<T> s;
  s.a = pool + row[0];
  s.rank = row[1];
  s.in = row[2];
  s.n = static_cast<int>(row[3]);
  for (int e = 0; e < s.n; ++e) {
    const int64_t* f = row + 4 + kExpandFields * e;
    s.bt[e] = pool + f[0];
    s.r[e] = f[1];
    s.out[e] = f[2];
    s.h0[e] = f[3];
    s.y0[e] = f[4];
  }
  return s;
}

// The matrices one piece reads, in order (A, each expand's B^T, then the next piece's A), as one
// byte stream for software prefetching: the hardware prefetchers stall at the start of every one
// of the thousands of small matrices a step reads, so each row fetches the bytes kAhead further
// on, across matrix boundaries. (A prefetch never faults, so the span after the next piece's A
// may run past the end of the pool.)
constexpr int64_t kAhead = 4096;
struct Stream {
  const char* p[kMaxExpands + 2];
  int64_t bytes[kMaxExpands + 2];
  int n = 0;
  void add(const void* ptr, int64_t b) {
    p[n] = static_cast<const char*>(ptr);
    bytes[n++] = b;
  }
  // Prefetch bytes [off, off + len) of the concatenation.
  void prefetch(int64_t off, int64_t len) const {
    for (int i = 0; i < n && len > 0; ++i) {
      if (off >= bytes[i]) {
        off -= bytes[i];
        continue;
      }
      const int64_t take = std::min(len, bytes[i] - off);
      for (int64_t b = 0; b < take; b += 64) __builtin_prefetch(p[i] + off + b);
      len -= take;
      off = 0;
    }
  }
};

// Eight floats as one value: a 256-bit register with AVX, two SSE registers on older targets (the
// compiler lowers it), so one loop serves every build.
typedef float Vec8 __attribute__((vector_size(32)));
inline Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline float sum8(Vec8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// out[b * NT + i] = w[b] . x[i] for RB weight rows and NT tokens, in RB * NT independent
// accumulators: one running sum would wait on the previous multiply-add at every step, a
// latency-bound chain several times slower than the memory the rows stream from.
template <int RB, int NT>
inline void dots(const float* const* w, const float* const* x, int64_t in, float* out) {
  Vec8 acc[RB][NT] = {};
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    Vec8 xv[NT];
    for (int i = 0; i < NT; ++i) xv[i] = load8(x[i] + k);
    for (int b = 0; b < RB; ++b) {
      const Vec8 wv = load8(w[b] + k);
      for (int i = 0; i < NT; ++i) acc[b][i] += wv * xv[i];
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int i = 0; i < NT; ++i) {
      float s = sum8(acc[b][i]);
      for (int64_t j = k; j < in; ++j) s += w[b][j] * x[i][j];
      out[b * NT + i] = s;
    }
}

// h[t, r0 + b] = A[r0 + b] . x[t] for RB rows of A and every token (two at a time).
template <int RB>
inline void shrink_rows(const float* const* w, const float* xf, int64_t n, int64_t in, float* h, int64_t rank,
                        int64_t r0) {
  float out[RB * 2];
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) {
    const float* x[2] = {xf + t * in, xf + (t + 1) * in};
    dots<RB, 2>(w, x, in, out);
    for (int b = 0; b < RB; ++b) {
      h[t * rank + r0 + b] = out[b * 2];
      h[(t + 1) * rank + r0 + b] = out[b * 2 + 1];
    }
  }
  if (t < n) {
    const float* x[1] = {xf + t * in};
    dots<RB, 1>(w, x, in, out);
    for (int b = 0; b < RB; ++b) h[t * rank + r0 + b] = out[b];
  }
}

// acc[t] += sum_b h[t, b] * w[b] for RB rows of B^T, two tokens per pass: each pass over the
// weight rows (from L1) updates two accumulator rows, RB multiply-adds per accumulator load.
template <int RB>
inline void expand_rows(const float* const* w, const float* h, int64_t h_stride, int64_t n, float* acc, int64_t out) {
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) {
    float c0[RB], c1[RB];
    for (int b = 0; b < RB; ++b) {
      c0[b] = h[t * h_stride + b];
      c1[b] = h[(t + 1) * h_stride + b];
    }
    float* a0 = acc + t * out;
    float* a1 = a0 + out;
    for (int64_t j = 0; j < out; ++j) {
      float s0 = a0[j], s1 = a1[j];
      for (int b = 0; b < RB; ++b) {
        s0 += c0[b] * w[b][j];
        s1 += c1[b] * w[b][j];
      }
      a0[j] = s0;
      a1[j] = s1;
    }
  }
  if (t < n) {
    float c[RB];
    for (int b = 0; b < RB; ++b) c[b] = h[t * h_stride + b];
    float* at = acc + t * out;
    for (int64_t j = 0; j < out; ++j) {
      float s = at[j];
      for (int b = 0; b < RB; ++b) s += c[b] * w[b][j];
      at[j] = s;
    }
  }
}

// Rows of a weight matrix in blocks of up to four: each block's rows as float32 (in place for
// float32, converted into `buf` otherwise), with the stream prefetched ahead of them.
constexpr int kRowBlock = 4;
template <typename T, typename F>
void row_blocks(const T* m, int64_t rows, int64_t width, float* buf, const Stream& stream, int64_t& read, F&& f) {
  const int64_t row_bytes = width * sizeof(T);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
    const float* w[kRowBlock];
    for (int b = 0; b < nb; ++b, read += row_bytes) {
      stream.prefetch(read + kAhead, row_bytes);
      w[b] = slserve::float_row(m + (r0 + b) * width, buf + b * width, width);
    }
    f(w, r0, nb);
  }
}

template <typename T>
void short_segment(const T* x, int64_t x_stride, int64_t n, T* y, int64_t y_stride, const Slot<T>& sl,
                   const T* after) {
  const T* a = sl.a;
  const int64_t rank = sl.rank, in = sl.in;
  Stream stream;
  stream.add(a, rank * in * sizeof(T));
  for (int e = 0; e < sl.n; ++e) stream.add(sl.bt[e], sl.r[e] * sl.out[e] * sizeof(T));
  stream.add(after, kAhead);
  // Scratch kept per thread across calls (the op runs thousands of times a step).
  thread_local std::vector<float> xf, h, wbuf, acc;
  xf.resize(n * in);
  h.resize(n * rank);
  for (int64_t t = 0; t < n; ++t) slserve::to_float(x + t * x_stride, xf.data() + t * in, in);
  int64_t read = 0;  // bytes of the stream consumed so far
  wbuf.resize(kRowBlock * in);
  row_blocks(a, rank, in, wbuf.data(), stream, read, [&](const float* const* w, int64_t r0, int nb) {
    switch (nb) {
      case 4: shrink_rows<4>(w, xf.data(), n, in, h.data(), rank, r0); break;
      case 3: shrink_rows<3>(w, xf.data(), n, in, h.data(), rank, r0); break;
      case 2: shrink_rows<2>(w, xf.data(), n, in, h.data(), rank, r0); break;
      default: shrink_rows<1>(w, xf.data(), n, in, h.data(), rank, r0); break;
    }
  });
  for (int e = 0; e < sl.n; ++e) {
    const int64_t out = sl.out[e];
    acc.resize(n * out);
    wbuf.resize(kRowBlock * std::max<int64_t>(in, out));
    for (int64_t t = 0; t < n; ++t) slserve::to_float(y + t * y_stride + sl.y0[e], acc.data() + t * out, out);
    row_blocks(sl.bt[e], sl.r[e], out, wbuf.data(), stream, read, [&](const float* const* w, int64_t r0, int nb) {
      const float* hr = h.data() + sl.h0[e] + r0;
      switch (nb) {
        case 4: expand_rows<4>(w, hr, rank, n, acc.data(), out); break;
        case 3: expand_rows<3>(w, hr, rank, n, acc.data(), out); break;
        case 2: expand_rows<2>(w, hr, rank, n, acc.data(), out); break;
        default: expand_rows<1>(w, hr, rank, n, acc.data(), out); break;
      }
    });
    for (int64_t t = 0; t < n; ++t) {
      T* yt = y + t * y_stride + sl.y0[e];
      for (int64_t j = 0; j < out; ++j) yt[j] = static_cast<T>(acc[t * out + j]);
    }
  }
}

#if defined(__AVX512BF16__)
// bfloat16 with AVX512-BF16 (see bf16_simd.h). Decode segments are bound by reading the
// adapter's weights, so both halves stream their weight rows exactly once, straight from memory
// into vdpbf16ps: the shrink as dot products against each token, four A rows at a time so that
// independent accumulator chains keep loads in flight; the expand two B^T rows at a time against
// the broadcast pair (h[r], h[r + 1]) (rounded to bfloat16, as the torch path's bfloat16 matmul
// rounds h), four rows per pass over the float32 accumulators. Tokens go in groups of up to four,
// each with its own accumulators.
namespace bf16 {
using namespace slserve::bf16;

// Each pass over a weight matrix prefetches as many bytes of what comes next as it reads: the
// next pass's rows, and during the last pass the start of `after`, the matrix read next. The
// hardware prefetchers alone stall at every one of the thousands of small matrices a step reads.
// The lines go to L2 only, and kLead bytes further on than the rows they are named by (the first
// kLead bytes of the next matrix are left to the hardware): an L1 prefetch holds one of L1's few
// miss buffers until its line arrives, which capped a core's stream well below what it reads
// from memory otherwise. On a captured 256-row decode step (1.3-1.6 GB of adapter weights) this
// took a quarter off the op's time (benchmarks/lora_ab.py; leads of 1-4 KiB measured alike).
constexpr int64_t kLead = 2048;
inline void prefetch_ahead(const void* p) { prefetch_l2(static_cast<const char*>(p) + kLead); }

// h[t, r] = x[t] . A[r] for NT tokens, RB rows of A per pass.
template <int NT>
void shrink(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* a, int64_t rank, int64_t in,
            float* h, int64_t h_stride, const c10::BFloat16* after) {
  constexpr int RB = NT <= 2 ? 4 : 2;
  for (int64_t r0 = 0; r0 < rank; r0 += RB) {
    const int rows = static_cast<int>(std::min<int64_t>(RB, rank - r0));
    __m512 acc[RB][NT];
    for (int b = 0; b < RB; ++b)
      for (int i = 0; i < NT; ++i) acc[b][i] = _mm512_setzero_ps();
    const c10::BFloat16* next = r0 + RB < rank ? a + (r0 + RB) * in : after;
    for (int64_t k = 0; k < in; k += 32) {
      for (int b = 0; b < RB; ++b) prefetch_ahead(next + RB * k + 32 * b);
      const __mmask32 m = mask32(in - k);
      __m512bh xv[NT];
      for (int i = 0; i < NT; ++i) xv[i] = bh(load32i(x + i * x_stride + k, m));
      for (int b = 0; b < RB; ++b) {
        if (b >= rows) break;
        const __m512bh av = bh(load32i(a + (r0 + b) * in + k, m));
        for (int i = 0; i < NT; ++i) acc[b][i] = _mm512_dpbf16_ps(acc[b][i], av, xv[i]);
      }
    }
    for (int b = 0; b < rows; ++b)
      for (int i = 0; i < NT; ++i) h[i * h_stride + r0 + b] = _mm512_reduce_add_ps(acc[b][i]);
  }
}

// hp[i * pairs + p] = (h[i, 2p], h[i, 2p + 1]) as a bfloat16 pair; 0 past the rank.
template <int NT>
void pack_pairs(const float* h, int64_t h_stride, int64_t rank, uint32_t* hp) {
  const int64_t pairs = (rank + 1) / 2;
  for (int i = 0; i < NT; ++i)
    for (int64_t p = 0; p < pairs; ++p)
      hp[i * pairs + p] = pair(h[i * h_stride + 2 * p], 2 * p + 1 < rank ? h[i * h_stride + 2 * p + 1] : 0.f);
}

// acc (lo/hi order, 32 floats per block) += sum_r h[t, r] * BT[r, :] for NT tokens.
template <int NT>
void expand(const uint32_t* hp, const c10::BFloat16* bt, int64_t rank, int64_t out, float* acc, int64_t acc_stride,
            const c10::BFloat16* after) {
  const int64_t pairs = (rank + 1) / 2;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t p = 0; p < pairs; p += 2) {
    const bool two = p + 1 < pairs;
    const c10::BFloat16* b = bt + 2 * p * out;
    const bool r1 = 2 * p + 1 < rank, r2 = two, r3 = 2 * p + 3 < rank;
    __m512i h0[NT], h1[NT];
    for (int i = 0; i < NT; ++i) {
      h0[i] = _mm512_set1_epi32(static_cast<int32_t>(hp[i * pairs + p]));
      h1[i] = two ? _mm512_set1_epi32(static_cast<int32_t>(hp[i * pairs + p + 1])) : zero;
    }
    const c10::BFloat16* next = p + 2 < pairs ? b + 4 * out : after;
    for (int64_t j = 0; j < out; j += 32) {
      for (int q = 0; q < 4; ++q) prefetch_ahead(next + 4 * j + 32 * q);
      const __mmask32 m = mask32(out - j);
      const __m512i w0 = load32i(b + j, m), w1 = r1 ? load32i(b + out + j, m) : zero;
      const __m512i w2 = r2 ? load32i(b + 2 * out + j, m) : zero, w3 = r3 ? load32i(b + 3 * out + j, m) : zero;
      const Pairs w01(w0, w1), w23(w2, w3);
      for (int i = 0; i < NT; ++i) {
        float* ai = acc + i * acc_stride + j;
        __m512 lo = _mm512_load_ps(ai), hi = _mm512_load_ps(ai + 16);
        madd_pair(w01, h0[i], lo, hi);
        madd_pair(w23, h1[i], lo, hi);
        _mm512_store_ps(ai, lo);
        _mm512_store_ps(ai + 16, hi);
      }
    }
  }
}

template <int NT>
void group(const c10::BFloat16* x, int64_t x_stride, c10::BFloat16* y, int64_t y_stride,
           const Slot<c10::BFloat16>& sl, float* h, uint32_t* hp, float* acc, const c10::BFloat16* after) {
  shrink<NT>(x, x_stride, sl.a, sl.rank, sl.in, h, sl.rank, sl.n ? sl.bt[0] : after);
  for (int e = 0; e < sl.n; ++e) {
    const int64_t out = sl.out[e], acc_stride = (out + 31) / 32 * 32;
    for (int i = 0; i < NT; ++i)
      for (int64_t j = 0; j < out; j += 32) {
        __m512 lo, hi;
        widen_pairs(y + i * y_stride + sl.y0[e] + j, mask32(out - j), lo, hi);
        _mm512_store_ps(acc + i * acc_stride + j, lo);
        _mm512_store_ps(acc + i * acc_stride + j + 16, hi);
      }
    pack_pairs<NT>(h + sl.h0[e], sl.rank, sl.r[e], hp);
    expand<NT>(hp, sl.bt[e], sl.r[e], out, acc, acc_stride, e + 1 < sl.n ? sl.bt[e + 1] : after);
    for (int i = 0; i < NT; ++i)
      for (int64_t j = 0; j < out; j += 32) {
        const float* ai = acc + i * acc_stride + j;
        store_pairs(y + i * y_stride + sl.y0[e] + j, mask32(out - j), _mm512_load_ps(ai), _mm512_load_ps(ai + 16));
      }
  }
}

// Prompt segments and popular adapters give a piece many tokens; the weights then come from cache
// after the first few, and the loops above are bound by their own instructions instead: the
// shrink's horizontal sums, the expand's accumulators loaded and stored at every pair of rank
// rows, and its interleaving of every row pair for every group of tokens. The wide loops below
// interleave the expand's rows once per piece (pack_expand), keep every accumulator in registers
// (16 dot products of four tokens by four A rows; a 32-column block of four tokens through all
// rank rows), and reduce 16 dot products with one shuffle tree: a prompt-shaped batch (64 tokens
// per adapter) takes 2.2x less time than in the loops above. They add in exactly the same order
// (per lane over k or r, then the same tree as _mm512_reduce_add_ps), so a token's result does
// not depend on which loop ran it.

// out[j] = the sum of v[j]'s lanes, for 16 vectors at once: lanes j and j + 8, then j and j + 4,
// j and j + 2, then the last two, as _mm512_reduce_add_ps adds them.
inline void sum16(const __m512* v, float* out) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // a[i]: 128-bit lanes 0-1 hold v[i]'s 8 partial sums, 2-3 v[i + 8]'s
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // b[i]: lanes hold v[i], v[i + 8], v[i + 4], v[i + 12], 4 partials each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // c[i], per lane: (b[i], b[i + 2]) partial 0, then partial 1
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
  alignas(64) float s[16];  // per lane: b[0], b[2], b[1], b[3]
  _mm512_store_ps(s, _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE)));
  constexpr int lane_vector[4] = {0, 8, 4, 12}, element_b[4] = {0, 2, 1, 3};
  for (int l = 0; l < 4; ++l)
    for (int e = 0; e < 4; ++e) out[lane_vector[l] + element_b[e]] = s[4 * l + e];
}

// h[t, r] = x[t] . A[r] for NT tokens, 16 / NT rows of A per pass. `stream`: A comes from memory
// (the piece's first group), so each pass prefetches the next pass's rows.
template <int NT>
void shrink_wide(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* a, int64_t rank, int64_t in,
                 float* h, int64_t h_stride, bool stream) {
  constexpr int RB = 16 / NT;
  for (int64_t r0 = 0; r0 < rank; r0 += RB) {
    const int rows = static_cast<int>(std::min<int64_t>(RB, rank - r0));
    // Past the rank, a pass repeats its last row (the sums are dropped): a fixed count of rows
    // keeps all 16 accumulators in registers.
    const c10::BFloat16* ar[RB];
    for (int b = 0; b < RB; ++b) ar[b] = a + (r0 + std::min(b, rows - 1)) * in;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 32) {
      const __mmask32 m = mask32(in - k);
      __m512bh xv[NT];
      for (int i = 0; i < NT; ++i) xv[i] = bh(load32i(x + i * x_stride + k, m));
      for (int b = 0; b < RB; ++b) {
        if (stream) prefetch_ahead(ar[b] + RB * in + k);  // the next pass's row (first group: from memory)
        const __m512bh av = bh(load32i(ar[b] + k, m));
        for (int i = 0; i < NT; ++i) acc[b * NT + i] = _mm512_dpbf16_ps(acc[b * NT + i], av, xv[i]);
      }
    }
    float s[16];
    sum16(acc, s);
    for (int b = 0; b < rows; ++b)
      for (int i = 0; i < NT; ++i) h[i * h_stride + r0 + b] = s[b * NT + i];
  }
}

// BT [rank, out] repacked for the wide expand: for each 32-column block, then each pair of rank
// rows, the two rows interleaved into their lo and hi pair lanes (64 values, see Pairs). Reading
// BT itself a column block at a time would walk its rows `out` apart, a stride that maps them all
// onto a few sets of the L1 cache; the packed copy is read straight through, and only once
// interleaved. Returns the number of __m512 vectors written.
int64_t pack_expand(const c10::BFloat16* bt, int64_t rank, int64_t out, __m512i* packed) {
  const int64_t pairs = (rank + 1) / 2, blocks = (out + 31) / 32;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t p = 0; p < pairs; ++p) {
    const c10::BFloat16* b = bt + 2 * p * out;
    const bool second = 2 * p + 1 < rank;
    for (int64_t jb = 0; jb < blocks; ++jb) {
      prefetch_ahead(b + 2 * out + 32 * jb);  // the next pair of rows
      prefetch_ahead(b + 3 * out + 32 * jb);
      const __mmask32 m = mask32(out - 32 * jb);
      const Pairs w(load32i(b + 32 * jb, m), second ? load32i(b + out + 32 * jb, m) : zero);
      __m512i* dst = packed + 2 * (jb * pairs + p);
      _mm512_store_si512(dst, reinterpret_cast<__m512i>(w.lo));
      _mm512_store_si512(dst + 1, reinterpret_cast<__m512i>(w.hi));
    }
  }
  return 2 * pairs * blocks;
}

// y[t, :out] += sum_r h[t, r] * BT[r, :] for NT tokens from the packed BT, one 32-column block at
// a time, its accumulators in registers across all rank rows.
template <int NT>
void expand_wide(const uint32_t* hp, const __m512i* packed, int64_t rank, int64_t out, c10::BFloat16* y,
                 int64_t y_stride) {
  const int64_t pairs = (rank + 1) / 2;
  for (int64_t j = 0; j < out; j += 32) {
    const __mmask32 m = mask32(out - j);
    __m512 lo[NT], hi[NT];
    for (int i = 0; i < NT; ++i) widen_pairs(y + i * y_stride + j, m, lo[i], hi[i]);
    const __m512i* w = packed + 2 * (j / 32) * pairs;
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh wl = bh(_mm512_load_si512(w + 2 * p)), wh = bh(_mm512_load_si512(w + 2 * p + 1));
      for (int i = 0; i < NT; ++i) {
        const __m512bh hv = bh(_mm512_set1_epi32(static_cast<int32_t>(hp[i * pairs + p])));
        lo[i] = _mm512_dpbf16_ps(lo[i], wl, hv);
        hi[i] = _mm512_dpbf16_ps(hi[i], wh, hv);
      }
    }
    for (int i = 0; i < NT; ++i) store_pairs(y + i * y_stride + j, m, lo[i], hi[i]);
  }
}

// NT tokens through the wide loops; packed[e]: expand e's packed BT.
template <int NT>
void wide_group(const c10::BFloat16* x, int64_t x_stride, c10::BFloat16* y, int64_t y_stride,
                const Slot<c10::BFloat16>& sl, const __m512i* const* packed, float* h, uint32_t* hp, bool first) {
  shrink_wide<NT>(x, x_stride, sl.a, sl.rank, sl.in, h, sl.rank, first);
  for (int e = 0; e < sl.n; ++e) {
    pack_pairs<NT>(h + sl.h0[e], sl.rank, sl.r[e], hp);
    expand_wide<NT>(hp, packed[e], sl.r[e], sl.out[e], y + sl.y0[e], y_stride);
  }
}

// n >= kWideTokens tokens of one segment: pack the expands once, then four tokens at a time (two,
// one for the rest).
void wide_segment(const c10::BFloat16* x, int64_t x_stride, int64_t n, c10::BFloat16* y, int64_t y_stride,
                  const Slot<c10::BFloat16>& sl) {
  thread_local std::vector<float> h;
  thread_local std::vector<uint32_t> hp;
  thread_local std::vector<__m512i> packed;
  int64_t vectors = 0, max_pairs = 0;
  for (int e = 0; e < sl.n; ++e) {
    vectors += 2 * ((sl.r[e] + 1) / 2) * ((sl.out[e] + 31) / 32);
    max_pairs = std::max(max_pairs, (sl.r[e] + 1) / 2);
  }
  h.resize(4 * sl.rank);
  hp.resize(4 * max_pairs);
  packed.resize(vectors);
  const __m512i* starts[kMaxExpands];
  int64_t at = 0;
  for (int e = 0; e < sl.n; ++e) {
    starts[e] = packed.data() + at;
    at += pack_expand(sl.bt[e], sl.r[e], sl.out[e], packed.data() + at);
  }
  for (int64_t t = 0; t < n;) {
    const int64_t left = n - t, g = left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const c10::BFloat16* xt = x + t * x_stride;
    c10::BFloat16* yt = y + t * y_stride;
    switch (g) {
      case 4: wide_group<4>(xt, x_stride, yt, y_stride, sl, starts, h.data(), hp.data(), t == 0); break;
      case 2: wide_group<2>(xt, x_stride, yt, y_stride, sl, starts, h.data(), hp.data(), t == 0); break;
      default: wide_group<1>(xt, x_stride, yt, y_stride, sl, starts, h.data(), hp.data(), t == 0); break;
    }
    t += g;
  }
}

}  // namespace bf16

template <>
void short_segment<c10::BFloat16>(const c10::BFloat16* x, int64_t x_stride, int64_t n, c10::BFloat16* y,
                                  int64_t y_stride, const Slot<c10::BFloat16>& sl, const c10::BFloat16* after) {
  if (n >= kWideTokens) return bf16::wide_segment(x, x_stride, n, y, y_stride, sl);
  int64_t max_out = 0, max_pairs = 0;
  for (int e = 0; e < sl.n; ++e) {
    max_out = std::max(max_out, (sl.out[e] + 31) / 32 * 32);
    max_pairs = std::max(max_pairs, (sl.r[e] + 1) / 2);
  }
  // Scratch for up to four tokens, kept per thread across calls (the op runs hundreds of times a
  // step); __m512 elements keep the accumulators 64-byte aligned.
  thread_local std::vector<float> h;
  thread_local std::vector<uint32_t> hp;
  thread_local std::vector<__m512> acc_vectors;
  h.resize(4 * sl.rank);
  hp.resize(4 * max_pairs);
  acc_vectors.resize(4 * max_out / 16);
  float* acc = reinterpret_cast<float*>(acc_vectors.data());
  for (int64_t t = 0; t < n; t += 4) {
    const c10::BFloat16* xt = x + t * x_stride;
    c10::BFloat16* yt = y + t * y_stride;
    const c10::BFloat16* then = t + 4 < n ? sl.a : after;  // the same weights again, from cache
    switch (std::min<int64_t>(4, n - t)) {
      case 4: bf16::group<4>(xt, x_stride, yt, y_stride, sl, h.data(), hp.data(), acc, then); break;
      case 3: bf16::group<3>(xt, x_stride, yt, y_stride, sl, h.data(), hp.data(), acc, then); break;
      case 2: bf16::group<2>(xt, x_stride, yt, y_stride, sl, h.data(), hp.data(), acc, then); break;
      default: bf16::group<1>(xt, x_stride, yt, y_stride, sl, h.data(), hp.data(), acc, then); break;
    }
  }
}
#endif

// y[seg] += LoRA(x[seg]) for every segment; see slserve/kernels/lora.py:apply_lora.
void lora_apply(const at::Tensor& y, const at::Tensor& x, const at::Tensor& pool, const at::Tensor& bounds,
                const at::Tensor& slots) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "lora_apply: x and y are [tokens, features]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "lora_apply: rows of x and y must be contiguous");
  TORCH_CHECK(pool.dim() == 1 && pool.is_contiguous() && pool.scalar_type() == x.scalar_type() &&
                  y.scalar_type() == x.scalar_type(),
              "lora_apply: the pool is one flat tensor of x's dtype");
  TORCH_CHECK(bounds.scalar_type() == at::kLong && bounds.dim() == 2 && bounds.size(1) == 2 && bounds.is_contiguous(),
              "lora_apply: bounds is int64 [segments, 2]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 2 && slots.size(0) == bounds.size(0) &&
                  slots.size(1) == kSlotFields && slots.stride(1) == 1,
              "lora_apply: slots is int64 [segments, ", kSlotFields, "] with contiguous rows");
  const int64_t num_segments = bounds.size(0), pool_size = pool.numel();
  const int64_t* bp = bounds.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t slot_stride = slots.stride(0);
  auto row_of = [&](int64_t s) { return sp + s * slot_stride; };
  // Validate every segment that will run before touching memory: the rows sit inside x and y,
  // and every matrix inside the pool and its columns inside y.
  int64_t cols_total = 0;
  std::vector<int64_t> cols(num_segments, 0);
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t s0 = bp[2 * s], s1 = bp[2 * s + 1];
    const int64_t* row = row_of(s);
    if (s1 <= s0 || row[1] == 0) continue;
    TORCH_CHECK(s0 >= 0 && s1 <= x.size(0), "lora_apply: segment rows outside the batch");
    TORCH_CHECK(row[1] > 0 && row[2] == x.size(1) && row[0] >= 0 && row[0] + row[1] * row[2] <= pool_size &&
                    row[3] >= 0 && row[3] <= kMaxExpands,
                "lora_apply: segment ", s, " has a bad A slot");
    cols[s] = row[2];
    for (int64_t e = 0; e < row[3]; ++e) {
      const int64_t* f = row + 4 + kExpandFields * e;
      TORCH_CHECK(f[1] >= 0 && f[2] > 0 && f[0] >= 0 && f[0] + f[1] * f[2] <= pool_size && f[3] >= 0 &&
                      f[3] + f[1] <= row[1] && f[4] >= 0 && f[4] + f[2] <= y.size(1),
                  "lora_apply: segment ", s, " has a bad expand slot");
      cols[s] += f[2];
    }
    cols_total += cols[s];
  }
  if (cols_total == 0) return;
  // Which segments run as loops here: all of them for bfloat16 with AVX512-BF16 (the loops
  // beat a library matmul at every segment length these adapters have), otherwise the short ones.
  // The rest go through ATen's matmuls, which bring their own threading, on this thread (ATen ops
  // on an OpenMP worker would also lose this thread's inference-mode state).
  const bool all_loops = kBf16Simd && x.scalar_type() == at::kBFloat16;
  struct Piece {
    int64_t segment, start, n;
  };
  std::vector<Piece> pieces;
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t s0 = bp[2 * s], n = bp[2 * s + 1] - s0;
    if (cols[s] == 0) continue;
    if (all_loops || n <= kShortSegment) {
      // Tokens are independent, so a long segment splits into pieces that threads share.
      for (int64_t t = 0; t < n; t += kShortSegment) pieces.push_back({s, s0 + t, std::min(kShortSegment, n - t)});
      continue;
    }
    const int64_t* row = row_of(s);
    const at::Tensor a = pool.narrow(0, row[0], row[1] * row[2]).view({row[1], row[2]});
    const at::Tensor h = at::mm(x.narrow(0, s0, n), a.t());
    for (int64_t e = 0; e < row[3]; ++e) {
      const int64_t* f = row + 4 + kExpandFields * e;
      const at::Tensor bt = pool.narrow(0, f[0], f[1] * f[2]).view({f[1], f[2]});
      y.narrow(0, s0, n).narrow(1, f[4], f[2]).addmm_(h.narrow(1, f[3], f[1]), bt);
    }
  }
  if (pieces.empty()) return;
  // Contiguous runs of pieces per thread, balanced by cost: a piece reads its weights once from
  // memory and then works from cache for every further token.
  std::vector<double> cost_end(pieces.size());
  double total = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int64_t s = pieces[i].segment;
    total += static_cast<double>(row_of(s)[1]) * cols[s] * (kTokensPerWeightRead + pieces[i].n);
    cost_end[i] = total;
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), pieces.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* pp = pool.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      // Part p takes the pieces whose cost midpoint falls in [p, p + 1) * total / parts.
      for (size_t i = 0; i < pieces.size(); ++i) {
        const double mid = (cost_end[i] + (i ? cost_end[i - 1] : 0.0)) / 2 * parts / total;
        if (mid < begin || mid >= end) continue;
        const Slot<scalar_t> sl = read_slot(row_of(pieces[i].segment), pp);
        // This part's next piece, whose weights the last pass prefetches (else this one's again).
        const bool has_next = i + 1 < pieces.size() && (cost_end[i] + cost_end[i + 1]) / 2 * parts / total < end;
        const scalar_t* after = has_next ? pp + row_of(pieces[i + 1].segment)[0] : sl.a;
        short_segment<scalar_t>(xp + pieces[i].start * x.stride(0), x.stride(0), pieces[i].n,
                                yp + pieces[i].start * y.stride(0), y.stride(0), sl, after);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) {
  m.def("lora_apply(Tensor(a!) y, Tensor x, Tensor pool, Tensor bounds, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(slserve, CPU, m) { m.impl("lora_apply", &lora_apply); }
