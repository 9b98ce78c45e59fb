// Paged decode attention for the CPU path: one query per sequence, keys and values read in
// place from the paged cache through the block table (no gather, no transposed copies).
//
// For decode sequence b with query token t = q_index[b] and context length L = ctx_lens[b]:
//   out[t, h] = softmax(scale * q[t, h] . K[b, 0:L, h / group]) @ V[b, 0:L, h / group]
// where K[b, i] lives at k_cache[block_tables[b, i / P], i % P]. The batched-matmul alternative
// spends most of its time on tiny GEMM set-up and on copying the gathered cache into matmul
// layout; this loop reads every key and value once and accumulates in float32. Slots at or past
// L are never read: a reused page may hold its earlier owner's NaN/inf there, and 0 * NaN = NaN.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "bf16_simd.h"
#include "convert.h"

namespace {

// s[i] = exp(s[i] - max s) in place; returns 1 / sum of the results.
float softmax_unnormalised(float* s, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = slserve::exp_nonpositive(s[i] - m);
    sum += s[i];
  }
  return 1.f / sum;
}

template <typename T, int64_t kD>
void decode_one_d(T* out, const T* q, int64_t q_head_stride, int64_t o_head_stride, const T* k_cache,
                  const T* v_cache, const int64_t* k_strides, const int64_t* v_strides, const int64_t* table,
                  int64_t ctx, int64_t page_tokens, int64_t kv_heads, int64_t group, int64_t head_dim,
                  float scale) {
  // One token's K (or V) row holds every kv head back to back: it is read once and serves all
  // query heads, so the cache is walked once per sequence, a page at a time. kD > 0 fixes
  // head_dim at compile time (the common 64 and 128); kD = 0 takes it at run time.
  const int64_t D = kD ? kD : head_dim;
  const int64_t heads = kv_heads * group, width = kv_heads * D;
  std::vector<float> qf(heads * D), scores(heads * ctx), acc(heads * D, 0.f), buf(width);
  for (int64_t h = 0; h < heads; ++h) {
    slserve::to_float(q + h * q_head_stride, qf.data() + h * D, D);
    for (int64_t d = 0; d < D; ++d) qf[h * D + d] *= scale;
  }
  for (int64_t p0 = 0; p0 < ctx; p0 += page_tokens) {
    const T* page = k_cache + table[p0 / page_tokens] * k_strides[0];
    for (int64_t i = p0; i < std::min(ctx, p0 + page_tokens); ++i) {
      const float* row = slserve::float_row(page + (i - p0) * k_strides[1], buf.data(), width);
      for (int64_t h = 0; h < heads; ++h)
        scores[h * ctx + i] = slserve::dot<kD>(qf.data() + h * D, row + (h / group) * D, D);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = scores.data() + h * ctx;
    const float inv = softmax_unnormalised(sh, ctx);
    for (int64_t i = 0; i < ctx; ++i) sh[i] *= inv;
  }
  for (int64_t p0 = 0; p0 < ctx; p0 += page_tokens) {
    const T* page = v_cache + table[p0 / page_tokens] * v_strides[0];
    for (int64_t i = p0; i < std::min(ctx, p0 + page_tokens); ++i) {
      const float* row = slserve::float_row(page + (i - p0) * v_strides[1], buf.data(), width);
      for (int64_t h = 0; h < heads; ++h)
        slserve::axpy<kD>(acc.data() + h * D, scores[h * ctx + i], row + (h / group) * D, D);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    T* oh = out + h * o_head_stride;
    for (int64_t d = 0; d < D; ++d) oh[d] = static_cast<T>(acc[h * D + d]);
  }
}

template <typename T>
void decode_one(T* out, const T* q, int64_t q_head_stride, int64_t o_head_stride, const T* k_cache,
                const T* v_cache, const int64_t* k_strides, const int64_t* v_strides, const int64_t* table,
                int64_t ctx, int64_t page_tokens, int64_t kv_heads, int64_t group, int64_t head_dim,
                float scale) {
  auto run = [&](auto fixed) {
    decode_one_d<T, decltype(fixed)::value>(out, q, q_head_stride, o_head_stride, k_cache, v_cache, k_strides,
                                           v_strides, table, ctx, page_tokens, kv_heads, group, head_dim, scale);
  };
  if (head_dim == 64)
    run(std::integral_constant<int64_t, 64>{});
  else if (head_dim == 128)
    run(std::integral_constant<int64_t, 128>{});
  else
    run(std::integral_constant<int64_t, 0>{});
}

#if defined(__AVX512BF16__)
// bfloat16 with head_dim a multiple of 32 (see bf16_simd.h); other head sizes take the loop above.
// Scores: per key token, each kv head's key row meets its query heads in vdpbf16ps dot products.
// Output: the softmax weights rounded to bfloat16 (as the torch path's bfloat16 matmul rounds
// them) and paired over consecutive tokens, against those tokens' value rows interleaved, all
// accumulators of one kv head's query heads updated per token pair.
void decode_one(c10::BFloat16* out, const c10::BFloat16* q, int64_t q_head_stride, int64_t o_head_stride,
                const c10::BFloat16* k_cache, const c10::BFloat16* v_cache, const int64_t* k_strides,
                const int64_t* v_strides, const int64_t* table, int64_t ctx, int64_t page_tokens, int64_t kv_heads,
                int64_t group, int64_t head_dim, float scale) {
  if (head_dim % 32 != 0) {
    decode_one<c10::BFloat16>(out, q, q_head_stride, o_head_stride, k_cache, v_cache, k_strides, v_strides, table,
                              ctx, page_tokens, kv_heads, group, head_dim, scale);
    return;
  }
  using namespace slserve::bf16;
  const int64_t heads = kv_heads * group, blocks = head_dim / 32, pairs = (ctx + 1) / 2;
  std::vector<float> scores(heads * ctx);
  for (int64_t i = 0; i < ctx; ++i) {
    const c10::BFloat16* krow = k_cache + table[i / page_tokens] * k_strides[0] + (i % page_tokens) * k_strides[1];
    for (int64_t h = 0; h < heads; ++h) {
      const c10::BFloat16* kh = krow + (h / group) * head_dim;
      const c10::BFloat16* qh = q + h * q_head_stride;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b)
        acc = _mm512_dpbf16_ps(acc, bh(_mm512_loadu_si512(kh + 32 * b)), bh(_mm512_loadu_si512(qh + 32 * b)));
      scores[h * ctx + i] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  std::vector<uint32_t> p(heads * pairs);
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = scores.data() + h * ctx;
    const float inv = softmax_unnormalised(sh, ctx);
    for (int64_t j = 0; j < pairs; ++j)
      p[h * pairs + j] = pair(sh[2 * j] * inv, 2 * j + 1 < ctx ? sh[2 * j + 1] * inv : 0.f);
  }
  // Per 32-column block of a kv head's value rows: its query heads' accumulators (group <= 8 stay
  // in registers), one pass over the token pairs.
  constexpr int64_t kMaxGroup = 8;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t kvh = 0; kvh < kv_heads; ++kvh)
    for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
      const int64_t ng = std::min(kMaxGroup, group - g0);
      const uint32_t* ph = p.data() + (kvh * group + g0) * pairs;
      for (int64_t b = 0; b < blocks; ++b) {
        __m512 lo[kMaxGroup], hi[kMaxGroup];
        for (int64_t g = 0; g < ng; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
        const int64_t col = kvh * head_dim + 32 * b;
        for (int64_t j = 0; j < pairs; ++j) {
          const int64_t i = 2 * j;
          const c10::BFloat16* v0 = v_cache + table[i / page_tokens] * v_strides[0] + (i % page_tokens) * v_strides[1];
          const __m512i w1 = i + 1 < ctx ? _mm512_loadu_si512(v_cache + table[(i + 1) / page_tokens] * v_strides[0] +
                                                              ((i + 1) % page_tokens) * v_strides[1] + col)
                                         : zero;
          const Pairs w(_mm512_loadu_si512(v0 + col), w1);
          for (int64_t g = 0; g < ng; ++g)
            madd_pair(w, _mm512_set1_epi32(static_cast<int32_t>(ph[g * pairs + j])), lo[g], hi[g]);
        }
        for (int64_t g = 0; g < ng; ++g)
          store_pairs(out + (kvh * group + g0 + g) * o_head_stride + 32 * b, ~__mmask32(0), lo[g], hi[g]);
      }
    }
}
#endif

void paged_decode_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& q_index, const at::Tensor& block_tables,
                            const at::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out: [T, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 &&
                  k_cache.stride(2) == k_cache.size(3) && v_cache.stride(2) == v_cache.size(3),
              "caches: [pages, P, KVH, D] with each token's heads contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out need a contiguous head_dim");
  const auto idx = q_index.to(at::kLong).contiguous();
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto lens = ctx_lens.to(at::kLong).contiguous();
  const int64_t batch = idx.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t page_tokens = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  const int64_t k_strides[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t v_strides[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t t = ip[b];
        // The bfloat16 overload, where built, wins over the template.
        decode_one(op + t * out.stride(0), qp + t * q.stride(0), q.stride(1), out.stride(1), kp, vp,
                             k_strides, v_strides, tp + b * tables.size(1), lp[b], page_tokens, kv_heads,
                             heads / kv_heads, head_dim, static_cast<float>(scale));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor q_index, "
        "Tensor block_tables, Tensor ctx_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(slserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
