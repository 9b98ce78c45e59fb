// Paged attention for the CPU path, one query per row, keys and values read in place from the
// paged cache through the block table (no gather, no transposed copies). A row is a decoding
// sequence, or one token of a prompt chunk attending to the keys up to its own position (the
// engine passes every query token of a step as a row: kernels/attention.py, TokenRows).
//
// For row b with query token t = q_index[b] and L = ctx_lens[b] keys:
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

// The sequence a thread runs after this one, whose first key rows this one prefetches.
struct NextSequence {
  const int64_t* table = nullptr;
  int64_t ctx = 0;
};

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
                float scale, NextSequence /*next: prefetched by the bfloat16 loop only*/) {
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
// bfloat16 with head_dim 32, 64, 96 or 128 (see bf16_simd.h); other head sizes take the loop above.
using namespace slserve::bf16;

// Lane t of the result: the sum of the 16 lanes of acc[t] (16 horizontal sums in 15 shuffle-add
// steps instead of 16 separate reductions).
inline __m512 sum16(const __m512* acc) {
  __m512 x[8], z[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                         _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: that lane's sums of tokens 4i .. 4i + 3
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Prefetch distances, in tokens. K and V rows sit in 16-token runs scattered over the pool, so
// the reads are bound by how many misses are in flight, not by compute: the score pass asks for
// key rows kFarKeys tokens ahead into L2 and kNearKeys ahead into L1, and for the value rows of the
// tokens it scores into L2 (the value pass comes after the softmax; into L1 they were evicted
// before use and held L1's miss buffers). The first kNextKeys key rows of the next sequence are
// asked for into L2 during this one's softmax and value pass. Measured on 256 sequences of 64-128
// tokens over 30 layers of a pool much larger than the caches (EPYC with AVX512-BF16): 47.8 ms
// with key rows 16 ahead into L1 and value rows into L1, 33.8 ms with these.
constexpr int64_t kNearKeys = 16, kFarKeys = 48, kNextKeys = 32;

// kB = head_dim / 32 column blocks.
// Scores: 16 tokens at a time per query head, the head's query in registers against each token's
// key row of its kv head (vdpbf16ps), the 16 sums reduced together.
// Output: the softmax weights rounded to bfloat16 (as the torch path's bfloat16 matmul rounds
// them) and paired over consecutive tokens, against those tokens' value rows interleaved; per kv
// head one pass over the token pairs updates all column blocks of (up to) kGroup query heads.
template <int kB>
void decode_one_bf16(c10::BFloat16* out, const c10::BFloat16* q, int64_t q_head_stride, int64_t o_head_stride,
                     const c10::BFloat16* k_cache, const c10::BFloat16* v_cache, const int64_t* k_strides,
                     const int64_t* v_strides, const int64_t* table, int64_t ctx, int64_t page_tokens,
                     int64_t kv_heads, int64_t group, float scale, NextSequence next) {
  constexpr int64_t D = 32 * kB;
  const int64_t heads = kv_heads * group, pairs = (ctx + 1) / 2, padded = (ctx + 15) / 16 * 16;
  // Each token's K and V rows, resolved once, so that the loops never divide by the page size.
  // Rows past the context (the value pass pairs an odd last token; the score pass runs in 16s)
  // point at a zero row.
  thread_local std::vector<const c10::BFloat16*> krows, vrows;
  thread_local std::vector<float> scores;
  thread_local std::vector<uint32_t> p;
  thread_local std::vector<c10::BFloat16> zero_row;
  krows.resize(padded);
  vrows.resize(2 * pairs);
  scores.resize(heads * padded);
  p.resize(heads * pairs);
  if (zero_row.size() < static_cast<size_t>(kv_heads * D)) zero_row.assign(kv_heads * D, c10::BFloat16(0.f));
  for (int64_t i = 0; i < ctx; ++i) {
    const int64_t page = table[i / page_tokens], slot = i % page_tokens;
    krows[i] = k_cache + page * k_strides[0] + slot * k_strides[1];
    vrows[i] = v_cache + page * v_strides[0] + slot * v_strides[1];
  }
  const int64_t row_bytes = kv_heads * D * static_cast<int64_t>(sizeof(c10::BFloat16));
  for (int64_t i = 0; i < std::min(kFarKeys, ctx); ++i)  // the rows before the loop's distances
    for (int64_t c = 0; c < row_bytes; c += 64) {
      const char* row = reinterpret_cast<const char*>(krows[i]) + c;
      i < kNearKeys ? prefetch(row) : prefetch_l2(row);
    }
  for (int64_t i = ctx; i < padded; ++i) krows[i] = zero_row.data();
  if (ctx % 2) vrows[ctx] = zero_row.data();

  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < padded; t0 += 16) {
    // Rows sit in pages scattered over the pool, and the hardware prefetcher stops at every page
    // boundary (distances above).
    for (int64_t i = t0; i < std::min(t0 + 16, ctx); ++i)
      for (int64_t c = 0; c < row_bytes; c += 64) {
        if (i + kFarKeys < ctx) prefetch_l2(reinterpret_cast<const char*>(krows[i + kFarKeys]) + c);
        if (i + kNearKeys < ctx) prefetch(reinterpret_cast<const char*>(krows[i + kNearKeys]) + c);
        prefetch_l2(reinterpret_cast<const char*>(vrows[i]) + c);
      }
    for (int64_t h = 0; h < heads; ++h) {
      __m512bh qv[kB];
      for (int b = 0; b < kB; ++b) qv[b] = bh(_mm512_loadu_si512(q + h * q_head_stride + 32 * b));
      const int64_t col = (h / group) * D;
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) {
        const c10::BFloat16* kh = krows[t0 + t] + col;
        acc[t] = _mm512_dpbf16_ps(_mm512_setzero_ps(), bh(_mm512_loadu_si512(kh)), qv[0]);
        for (int b = 1; b < kB; ++b) acc[t] = _mm512_dpbf16_ps(acc[t], bh(_mm512_loadu_si512(kh + 32 * b)), qv[b]);
      }
      _mm512_storeu_ps(scores.data() + h * padded + t0, _mm512_mul_ps(sum16(acc), vscale));
    }
  }
  if (next.table)
    for (int64_t i = 0; i < std::min(kNextKeys, next.ctx); ++i) {
      const auto* row = reinterpret_cast<const char*>(k_cache + next.table[i / page_tokens] * k_strides[0] +
                                                      i % page_tokens * k_strides[1]);
      for (int64_t c = 0; c < row_bytes; c += 64) prefetch_l2(row + c);
    }
  // Each head's weights rounded to bfloat16 in token order: as 32-bit words, exactly the pairs
  // (token 2j, token 2j + 1) that the value pass broadcasts (a zero after an odd last token).
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = scores.data() + h * padded;
    const __m512 inv = _mm512_set1_ps(softmax_unnormalised(sh, ctx));
    auto* ph = reinterpret_cast<uint16_t*>(p.data() + h * pairs);
    for (int64_t i = 0; i < 2 * pairs; i += 16) {
      const __mmask16 load = i + 16 <= ctx ? __mmask16(0xffff) : __mmask16((1u << (ctx - i)) - 1);
      const __mmask16 store = i + 16 <= 2 * pairs ? __mmask16(0xffff) : __mmask16((1u << (2 * pairs - i)) - 1);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(load, sh + i), inv));
      _mm256_mask_storeu_epi16(ph + i, store, reinterpret_cast<__m256i>(v));
    }
  }
  constexpr int64_t kGroup = 8 / kB;  // accumulators: kGroup x kB x 2 registers
  for (int64_t kvh = 0; kvh < kv_heads; ++kvh)
    for (int64_t g0 = 0; g0 < group; g0 += kGroup) {
      const int64_t ng = std::min(kGroup, group - g0);
      const uint32_t* ph = p.data() + (kvh * group + g0) * pairs;
      __m512 lo[kGroup][kB], hi[kGroup][kB];
      for (int g = 0; g < kGroup; ++g)
        for (int b = 0; b < kB; ++b) lo[g][b] = hi[g][b] = _mm512_setzero_ps();
      const int64_t col = kvh * D;
      for (int64_t j = 0; j < pairs; ++j) {
        const c10::BFloat16 *v0 = vrows[2 * j] + col, *v1 = vrows[2 * j + 1] + col;
        for (int b = 0; b < kB; ++b) {
          const Pairs w(_mm512_loadu_si512(v0 + 32 * b), _mm512_loadu_si512(v1 + 32 * b));
          for (int g = 0; g < kGroup; ++g)
            if (g < ng) madd_pair(w, _mm512_set1_epi32(static_cast<int32_t>(ph[g * pairs + j])), lo[g][b], hi[g][b]);
        }
      }
      for (int g = 0; g < ng; ++g)
        for (int b = 0; b < kB; ++b)
          store_pairs(out + (kvh * group + g0 + g) * o_head_stride + 32 * b, ~__mmask32(0), lo[g][b], hi[g][b]);
    }
}

void decode_one(c10::BFloat16* out, const c10::BFloat16* q, int64_t q_head_stride, int64_t o_head_stride,
                const c10::BFloat16* k_cache, const c10::BFloat16* v_cache, const int64_t* k_strides,
                const int64_t* v_strides, const int64_t* table, int64_t ctx, int64_t page_tokens, int64_t kv_heads,
                int64_t group, int64_t head_dim, float scale, NextSequence next) {
  auto run = [&](auto blocks) {
    decode_one_bf16<decltype(blocks)::value>(out, q, q_head_stride, o_head_stride, k_cache, v_cache, k_strides,
                                             v_strides, table, ctx, page_tokens, kv_heads, group, scale, next);
  };
  switch (head_dim % 32 == 0 ? head_dim / 32 : 0) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    default:
      decode_one<c10::BFloat16>(out, q, q_head_stride, o_head_stride, k_cache, v_cache, k_strides, v_strides, table,
                                ctx, page_tokens, kv_heads, group, head_dim, scale, next);
  }
}
#endif

constexpr int64_t kRowCost = 16;  // a row's fixed work (set-up, softmax, output), in keys read

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
    // Rows cost in proportion to the keys they read: the threads take spans of equal cost, not
    // equal counts (a step's decode rows read whole contexts, its prompt rows a few keys each).
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), batch);
    std::vector<int64_t> bounds(parts + 1, batch);
    bounds[0] = 0;
    int64_t total = 0;
    for (int64_t b = 0; b < batch; ++b) total += lp[b] + kRowCost;
    for (int64_t b = 0, acc = 0, part = 1; b < batch && part < parts; ++b) {
      acc += lp[b] + kRowCost;
      if (acc * parts >= total * part) bounds[part++] = b + 1;
    }
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      const int64_t begin = bounds[first], end = bounds[last];
      for (int64_t b = begin; b < end; ++b) {
        const int64_t t = ip[b];
        const NextSequence next = b + 1 < end ? NextSequence{tp + (b + 1) * tables.size(1), lp[b + 1]} : NextSequence{};
        // The bfloat16 overload, where built, wins over the template.
        decode_one(op + t * out.stride(0), qp + t * q.stride(0), q.stride(1), out.stride(1), kp, vp, k_strides,
                   v_strides, tp + b * tables.size(1), lp[b], page_tokens, kv_heads, heads / kv_heads, head_dim,
                   static_cast<float>(scale), next);
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
