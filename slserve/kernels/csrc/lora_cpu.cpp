// Batched mixed-rank LoRA for the CPU path: the loop over adapter segments of
// slserve/kernels/lora.py:apply_lora, in C++.
//
// For segment s (tokens starts[s]:ends[s]) with stacked A [R, in] and expands
// (BT [r, out], h0, y0):   h = x[seg] @ A^T ;   y[seg, y0:y0+out] += h[:, h0:h0+r] @ BT
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
#else
constexpr bool kBf16Simd = false;
#endif

// Everything a short segment needs besides its tokens: A, and one (B^T, rank, out, h0, y0) per
// expand.
template <typename T>
struct Expands {
  std::vector<const T*> bt;
  std::vector<int64_t> rank, out, h0, y0;
};

template <typename T>
void short_segment(const T* x, int64_t x_stride, int64_t n, const T* a, int64_t rank, int64_t in,
                   T* y, int64_t y_stride, const Expands<T>& ex) {
  std::vector<float> xf(n * in);
  for (int64_t t = 0; t < n; ++t) slserve::to_float(x + t * x_stride, xf.data() + t * in, in);
  std::vector<float> h(n * rank), af(in);
  for (int64_t r = 0; r < rank; ++r) {
    slserve::to_float(a + r * in, af.data(), in);
    for (int64_t t = 0; t < n; ++t) h[t * rank + r] = slserve::dot(xf.data() + t * in, af.data(), in);
  }
  for (size_t e = 0; e < ex.bt.size(); ++e) {
    const int64_t out = ex.out[e];
    std::vector<float> acc(n * out), bf(out);
    for (int64_t t = 0; t < n; ++t) slserve::to_float(y + t * y_stride + ex.y0[e], acc.data() + t * out, out);
    for (int64_t r = 0; r < ex.rank[e]; ++r) {
      slserve::to_float(ex.bt[e] + r * out, bf.data(), out);
      for (int64_t t = 0; t < n; ++t) {
        const float hv = h[t * rank + ex.h0[e] + r];
        float* at = acc.data() + t * out;
        for (int64_t j = 0; j < out; ++j) at[j] += hv * bf[j];
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      T* yt = y + t * y_stride + ex.y0[e];
      for (int64_t j = 0; j < out; ++j) yt[j] = static_cast<T>(acc[t * out + j]);
    }
  }
}

#if defined(__AVX512BF16__)
// bfloat16 with AVX512-BF16 (see bf16_simd.h). Decode segments are bound by reading the
// adapter's weights, so both halves stream their weight rows exactly once, straight from memory
// into vdpbf16ps: the shrink as dot products against each token, the expand two B^T rows at a
// time against the broadcast pair (h[r], h[r + 1]) (rounded to bfloat16, as the torch path's
// bfloat16 matmul rounds h), four rows per pass over the float32 accumulators. Tokens go in
// groups of up to four, each with its own accumulators.
namespace bf16 {
using namespace slserve::bf16;

// h[t, r] = x[t] . A[r] for NT tokens.
template <int NT>
void shrink(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* a, int64_t rank, int64_t in,
            float* h, int64_t h_stride) {
  for (int64_t r = 0; r < rank; ++r) {
    const c10::BFloat16* ar = a + r * in;
    __m512 acc[NT];
    for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 32) {
      const __mmask32 m = mask32(in - k);
      const __m512bh av = bh(load32i(ar + k, m));
      for (int i = 0; i < NT; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], av, bh(load32i(x + i * x_stride + k, m)));
    }
    for (int i = 0; i < NT; ++i) h[i * h_stride + r] = _mm512_reduce_add_ps(acc[i]);
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
void expand(const uint32_t* hp, const c10::BFloat16* bt, int64_t rank, int64_t out, float* acc, int64_t acc_stride) {
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
    for (int64_t j = 0; j < out; j += 32) {
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
void group(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* a, int64_t rank, int64_t in,
           c10::BFloat16* y, int64_t y_stride, const Expands<c10::BFloat16>& ex, float* h, uint32_t* hp,
           float* acc) {
  shrink<NT>(x, x_stride, a, rank, in, h, rank);
  for (size_t e = 0; e < ex.bt.size(); ++e) {
    const int64_t out = ex.out[e], acc_stride = (out + 31) / 32 * 32;
    for (int i = 0; i < NT; ++i)
      for (int64_t j = 0; j < out; j += 32) {
        __m512 lo, hi;
        widen_pairs(y + i * y_stride + ex.y0[e] + j, mask32(out - j), lo, hi);
        _mm512_store_ps(acc + i * acc_stride + j, lo);
        _mm512_store_ps(acc + i * acc_stride + j + 16, hi);
      }
    pack_pairs<NT>(h + ex.h0[e], rank, ex.rank[e], hp);
    expand<NT>(hp, ex.bt[e], ex.rank[e], out, acc, acc_stride);
    for (int i = 0; i < NT; ++i)
      for (int64_t j = 0; j < out; j += 32) {
        const float* ai = acc + i * acc_stride + j;
        store_pairs(y + i * y_stride + ex.y0[e] + j, mask32(out - j), _mm512_load_ps(ai), _mm512_load_ps(ai + 16));
      }
  }
}

}  // namespace bf16

template <>
void short_segment<c10::BFloat16>(const c10::BFloat16* x, int64_t x_stride, int64_t n, const c10::BFloat16* a,
                                  int64_t rank, int64_t in, c10::BFloat16* y, int64_t y_stride,
                                  const Expands<c10::BFloat16>& ex) {
  int64_t max_out = 0, max_pairs = 0;
  for (size_t e = 0; e < ex.out.size(); ++e) {
    max_out = std::max(max_out, (ex.out[e] + 31) / 32 * 32);
    max_pairs = std::max(max_pairs, (ex.rank[e] + 1) / 2);
  }
  // Scratch for up to four tokens, kept per thread across calls (the op runs hundreds of times a
  // step); __m512 elements keep the accumulators 64-byte aligned.
  thread_local std::vector<float> h;
  thread_local std::vector<uint32_t> hp;
  thread_local std::vector<__m512> acc_vectors;
  h.resize(4 * rank);
  hp.resize(4 * max_pairs);
  acc_vectors.resize(4 * max_out / 16);
  float* acc = reinterpret_cast<float*>(acc_vectors.data());
  for (int64_t t = 0; t < n; t += 4) {
    const c10::BFloat16* xt = x + t * x_stride;
    c10::BFloat16* yt = y + t * y_stride;
    switch (std::min<int64_t>(4, n - t)) {
      case 4: bf16::group<4>(xt, x_stride, a, rank, in, yt, y_stride, ex, h.data(), hp.data(), acc); break;
      case 3: bf16::group<3>(xt, x_stride, a, rank, in, yt, y_stride, ex, h.data(), hp.data(), acc); break;
      case 2: bf16::group<2>(xt, x_stride, a, rank, in, yt, y_stride, ex, h.data(), hp.data(), acc); break;
      default: bf16::group<1>(xt, x_stride, a, rank, in, yt, y_stride, ex, h.data(), hp.data(), acc); break;
    }
  }
}
#endif

void lora_apply(const at::Tensor& y, const at::Tensor& x, at::IntArrayRef starts, at::IntArrayRef ends,
                at::TensorList a, at::IntArrayRef n_expand, at::TensorList bt, at::IntArrayRef h0,
                at::IntArrayRef y0) {
  const int64_t num_segments = static_cast<int64_t>(starts.size());
  TORCH_CHECK(ends.size() == starts.size() && a.size() == starts.size() && n_expand.size() == starts.size(),
              "lora_apply: one start, end, A and expand count per segment");
  std::vector<int64_t> first(num_segments + 1, 0);
  for (int64_t s = 0; s < num_segments; ++s) first[s + 1] = first[s] + n_expand[s];
  TORCH_CHECK(static_cast<int64_t>(bt.size()) == first[num_segments] && h0.size() == bt.size() &&
                  y0.size() == bt.size(),
              "lora_apply: one BT, h0 and y0 per expand");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "lora_apply: rows of x and y must be contiguous");
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
    const int64_t n = ends[s] - starts[s];
    if (n <= 0) continue;
    if (all_loops || n <= kShortSegment) {
      TORCH_CHECK(a[s].is_contiguous(), "lora_apply: A must be contiguous");
      for (int64_t e = first[s]; e < first[s + 1]; ++e)
        TORCH_CHECK(bt[e].is_contiguous(), "lora_apply: B^T must be contiguous");
      // Tokens are independent, so a long segment splits into pieces that threads share.
      for (int64_t t = 0; t < n; t += kShortSegment)
        pieces.push_back({s, starts[s] + t, std::min(kShortSegment, n - t)});
      continue;
    }
    const at::Tensor h = at::mm(x.narrow(0, starts[s], n), a[s].t());
    for (int64_t e = first[s]; e < first[s + 1]; ++e) {
      at::Tensor out = y.narrow(0, starts[s], n).narrow(1, y0[e], bt[e].size(1));
      out.addmm_(h.narrow(1, h0[e], bt[e].size(0)), bt[e]);
    }
  }
  if (pieces.empty()) return;
  // Contiguous runs of pieces per thread, balanced by cost: a piece reads its weights once from
  // memory and then works from cache for every further token.
  std::vector<double> cost_end(pieces.size());
  double total = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int64_t s = pieces[i].segment;
    int64_t cols = a[s].size(1);
    for (int64_t e = first[s]; e < first[s + 1]; ++e) cols += bt[e].size(1);
    total += static_cast<double>(a[s].size(0)) * cols * (kTokensPerWeightRead + pieces[i].n);
    cost_end[i] = total;
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), pieces.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    std::vector<Expands<scalar_t>> expands(num_segments);
    for (const Piece& piece : pieces) {
      Expands<scalar_t>& ex = expands[piece.segment];
      if (!ex.bt.empty() || first[piece.segment] == first[piece.segment + 1]) continue;
      for (int64_t e = first[piece.segment]; e < first[piece.segment + 1]; ++e) {
        ex.bt.push_back(bt[e].data_ptr<scalar_t>());
        ex.rank.push_back(bt[e].size(0));
        ex.out.push_back(bt[e].size(1));
        ex.h0.push_back(h0[e]);
        ex.y0.push_back(y0[e]);
      }
    }
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      // Part p takes the pieces whose cost midpoint falls in [p, p + 1) * total / parts.
      for (size_t i = 0; i < pieces.size(); ++i) {
        const double mid = (cost_end[i] + (i ? cost_end[i - 1] : 0.0)) / 2 * parts / total;
        if (mid < begin || mid >= end) continue;
        const int64_t s = pieces[i].segment;
        short_segment<scalar_t>(xp + pieces[i].start * x.stride(0), x.stride(0), pieces[i].n,
                                a[s].data_ptr<scalar_t>(), a[s].size(0), a[s].size(1),
                                yp + pieces[i].start * y.stride(0), y.stride(0), expands[s]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) {
  m.def("lora_apply(Tensor(a!) y, Tensor x, int[] starts, int[] ends, Tensor[] a, int[] n_expand, "
        "Tensor[] bt, int[] h0, int[] y0) -> ()");
}

TORCH_LIBRARY_IMPL(slserve, CPU, m) { m.impl("lora_apply", &lora_apply); }
