// The element-wise work between the matmuls of a decoder layer, fused for the CPU path:
// residual add + RMSNorm, rotary embedding + KV-cache write, and SiLU(gate) * up; and the argmax
// of greedy sampling over a step's float32 logits.
//
// At decode batch sizes each of these is a few microseconds of arithmetic behind a chain of
// torch ops (casts, reductions, temporaries), each with its own dispatch and memory pass. Here
// each is one pass over a row. They round exactly where the torch path (slserve/model/ops.py)
// rounds, so in bfloat16 norm and RoPE agree bit for bit and SiLU*up to a unit or two in the last
// place in rare elements (a different exponential); in float32 they agree to the last bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_simd.h"
#include "convert.h"

namespace {

// Rows per task: enough elements that a thread's share outweighs waking it.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

// out[t] = w * T(x[t] / rms(x[t])), after x[t] = T(x[t] + delta[t]) when delta is given.
template <typename T>
void add_rms_norm_rows(T* x, int64_t x_stride, const T* delta, int64_t d_stride, T* out, int64_t o_stride,
                       const T* w, int64_t n, int64_t begin, int64_t end, float eps) {
  std::vector<float> row(n), wf(n);
  slserve::to_float(w, wf.data(), n);
  for (int64_t t = begin; t < end; ++t) {
    T* xt = x + t * x_stride;
    if (delta != nullptr) {
      const T* dt = delta + t * d_stride;
      for (int64_t j = 0; j < n; ++j) xt[j] = slserve::round_to<T>(static_cast<float>(xt[j]) + static_cast<float>(dt[j]));
    }
    slserve::to_float(xt, row.data(), n);
    float ss = 0.f;
    for (int64_t j = 0; j < n; ++j) ss += row[j] * row[j];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    T* ot = out + t * o_stride;
    for (int64_t j = 0; j < n; ++j)
      ot[j] = slserve::round_to<T>(wf[j] * static_cast<float>(slserve::round_to<T>(row[j] * inv)));
  }
}

#if defined(__AVX512BF16__)
// The bfloat16 rows 16 lanes at a time (the overload wins over the template): the same roundings.
void add_rms_norm_rows(c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* delta, int64_t d_stride,
                       c10::BFloat16* out, int64_t o_stride, const c10::BFloat16* w, int64_t n, int64_t begin,
                       int64_t end, float eps) {
  using namespace slserve::bf16;
  for (int64_t t = begin; t < end; ++t) {
    c10::BFloat16* xt = x + t * x_stride;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = mask16(n - j);
      __m512 v = load16(xt + j, m);
      if (delta != nullptr) {
        v = round16(_mm512_add_ps(v, load16(delta + t * d_stride + j, m)));
        store16(xt + j, m, v);
      }
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps));
    c10::BFloat16* ot = out + t * o_stride;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = mask16(n - j);
      store16(ot + j, m, _mm512_mul_ps(load16(w + j, m), round16(_mm512_mul_ps(load16(xt + j, m), inv))));
    }
  }
}
#endif

void add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& out,
                  const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes() && x.stride(1) == 1 && out.stride(1) == 1,
              "add_rms_norm: x and out are [T, n] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "add_rms_norm: weight is [n]");
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta)
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->stride(1) == 1, "add_rms_norm: delta is like x");
  const int64_t T = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = has_delta ? delta->data_ptr<scalar_t>() : nullptr;
    const int64_t ds = has_delta ? delta->stride(0) : 0;
    at::parallel_for(0, T, grain(n), [&](int64_t begin, int64_t end) {
      add_rms_norm_rows(xp, x.stride(0), dp, ds, out.data_ptr<scalar_t>(), out.stride(0),
                        weight.data_ptr<scalar_t>(), n, begin, end, static_cast<float>(eps));
    });
  });
}

// One head x [2 * half] rotated in place by cos c and sin s [2 * half].
template <typename T>
void rotate_half(T* x, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
    const float a1 = static_cast<float>(slserve::round_to<T>(x1 * c[i]));
    const float b1 = static_cast<float>(slserve::round_to<T>(-x2 * s[i]));
    const float a2 = static_cast<float>(slserve::round_to<T>(x2 * c[i + half]));
    const float b2 = static_cast<float>(slserve::round_to<T>(x1 * s[i + half]));
    x[i] = slserve::round_to<T>(a1 + b1);
    x[i + half] = slserve::round_to<T>(a2 + b2);
  }
}

#if defined(__AVX512BF16__)
// bfloat16, 16 lanes at a time where the half head is a multiple of 16: the same roundings.
void rotate_half(c10::BFloat16* x, const float* c, const float* s, int64_t half) {
  if (half % 16 != 0) return rotate_half<c10::BFloat16>(x, c, s, half);
  using namespace slserve::bf16;
  const __m512 neg = _mm512_set1_ps(-1.f);
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = load16(x + i, 0xffff), x2 = load16(x + half + i, 0xffff);
    const __m512 a1 = round16(_mm512_mul_ps(x1, _mm512_loadu_ps(c + i)));
    const __m512 b1 = round16(_mm512_mul_ps(_mm512_mul_ps(x2, neg), _mm512_loadu_ps(s + i)));
    const __m512 a2 = round16(_mm512_mul_ps(x2, _mm512_loadu_ps(c + half + i)));
    const __m512 b2 = round16(_mm512_mul_ps(x1, _mm512_loadu_ps(s + half + i)));
    store16(x + i, 0xffff, _mm512_add_ps(a1, b1));
    store16(x + half + i, 0xffff, _mm512_add_ps(a2, b2));
  }
}
#endif

// Rotate-half RoPE on the q and k heads of each row of qkv, in place, then copy the row's k and
// v heads to the cache rows k_index[t] and v_index[t]. cos and sin are [T, D] in the model
// dtype; like the torch path, x * cos and rotated * sin are rounded before they are added.
void rotary_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                     int64_t num_kv_heads, const at::Tensor& cache_rows, const at::Tensor& k_index,
                     const at::Tensor& v_index) {
  const int64_t T = qkv.size(0), D = cos.size(1), half = D / 2;
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * D,
              "rotary_write_kv: qkv is [T, (H + 2 KVH) D] with contiguous rows");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == T && sin.sizes() == cos.sizes(),
              "rotary_write_kv: cos and sin are [T, D]");
  TORCH_CHECK(cache_rows.is_contiguous() && cache_rows.numel() % (num_kv_heads * D) == 0,
              "rotary_write_kv: cache rows of KVH * D elements");
  const auto ki = k_index.to(at::kLong).contiguous(), vi = v_index.to(at::kLong).contiguous();
  TORCH_CHECK(ki.numel() == T && vi.numel() == T, "rotary_write_kv: one k and one v row per token");
  const int64_t width = num_kv_heads * D, num_rows = cache_rows.numel() / width;
  const int64_t* kp = ki.data_ptr<int64_t>();
  const int64_t* vp = vi.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(kp[t] >= 0 && kp[t] < num_rows && vp[t] >= 0 && vp[t] < num_rows,
                "rotary_write_kv: cache row out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_write_kv", [&] {
    using T_ = scalar_t;
    T_* base = qkv.data_ptr<T_>();
    T_* rows = cache_rows.data_ptr<T_>();
    const T_* cp = cos.data_ptr<T_>();
    const T_* sp = sin.data_ptr<T_>();
    at::parallel_for(0, T, grain(qkv.size(1)), [&](int64_t begin, int64_t end) {
      std::vector<float> c(D), s(D);
      for (int64_t t = begin; t < end; ++t) {
        slserve::to_float(cp + t * D, c.data(), D);
        slserve::to_float(sp + t * D, s.data(), D);
        T_* row = base + t * qkv.stride(0);
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) rotate_half(row + h * D, c.data(), s.data(), half);
        std::memcpy(rows + kp[t] * width, row + num_heads * D, width * sizeof(T_));
        std::memcpy(rows + vp[t] * width, row + (num_heads + num_kv_heads) * D, width * sizeof(T_));
      }
    });
  });
}

// o = T(silu(g)) * u for one row.
template <typename T>
void silu_mul_row(T* o, const T* g, const T* u, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    // silu(x) = x / (1 + e^-x), with the exponential of -|x| only (it never overflows).
    const float x = static_cast<float>(g[j]);
    const float e = slserve::exp_nonpositive(-std::fabs(x));
    const float silu = x >= 0.f ? x / (1.f + e) : x * e / (1.f + e);
    o[j] = slserve::round_to<T>(static_cast<float>(slserve::round_to<T>(silu)) * static_cast<float>(u[j]));
  }
}

#if defined(__AVX512BF16__)
// bfloat16, 16 lanes at a time (the overload wins over the template): the same arithmetic.
void silu_mul_row(c10::BFloat16* o, const c10::BFloat16* g, const c10::BFloat16* u, int64_t n) {
  using namespace slserve::bf16;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512 x = load16(g + j, m);
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mul_ps(x, negative, x, e);  // x, or x e where x < 0
    // 1 / (1 + e) by the 14-bit reciprocal and one Newton step (~23 bits): a division per 16 lanes
    // would take longer than all the rest.
    const __m512 d = _mm512_add_ps(one, e), r0 = _mm512_rcp14_ps(d);
    const __m512 r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.f)));
    const __m512 silu = _mm512_mul_ps(num, r);
    store16(o + j, m, _mm512_mul_ps(round16(silu), load16(u + j, m)));
  }
}
#endif

// out[t] = T(silu(gate[t])) * up[t] where gu[t] = [gate | up].
void silu_mul(const at::Tensor& out, const at::Tensor& gu) {
  const int64_t T = gu.size(0), n = gu.size(1) / 2;
  TORCH_CHECK(gu.dim() == 2 && gu.stride(1) == 1 && out.dim() == 2 && out.size(0) == T && out.size(1) == n &&
                  out.stride(1) == 1,
              "silu_mul: gu is [T, 2n] and out [T, n], with contiguous rows");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gu.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(2 * n), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = gp + t * gu.stride(0);
        silu_mul_row(op + t * out.stride(0), g, g + n, n);
      }
    });
  });
}

bool is_nan_bits(uint32_t bits) { return (bits & 0x7fffffffu) > 0x7f800000u; }

// The largest of row[0..n) and whether any of it is NaN. -ffast-math lets the compiler assume
// there is no NaN, so NaN is found from the bits. Four independent maxima: one alone is a chain
// of dependent instructions that runs at a fraction of the rate the row streams from cache.
float row_max(const float* row, int64_t n, bool* nan) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
  float top = row[0];
  uint32_t any_nan = 0;
  int64_t j = 0;
#if defined(__AVX2__)
  __m256 t0 = _mm256_set1_ps(top), t1 = t0, t2 = t0, t3 = t0;
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  __m256i nans = _mm256_setzero_si256();
  for (; j + 32 <= n; j += 32) {
    const __m256 a = _mm256_loadu_ps(row + j), b = _mm256_loadu_ps(row + j + 8);
    const __m256 c = _mm256_loadu_ps(row + j + 16), d = _mm256_loadu_ps(row + j + 24);
    t0 = _mm256_max_ps(t0, a);
    t1 = _mm256_max_ps(t1, b);
    t2 = _mm256_max_ps(t2, c);
    t3 = _mm256_max_ps(t3, d);
    for (__m256 v : {a, b, c, d})
      nans = _mm256_or_si256(nans, _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(v), magnitude), inf));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(t0, t1), _mm256_max_ps(t2, t3)));
  for (float v : lanes) top = v > top ? v : top;
  any_nan = !_mm256_testz_si256(nans, nans);
#endif
  for (; j < n; ++j) {
    top = row[j] > top ? row[j] : top;
    any_nan |= static_cast<uint32_t>(is_nan_bits(bits[j]));
  }
  *nan = any_nan != 0;
  return top;
}

// The index of row[0..n)'s largest value, the first one where several are equal; a row that holds
// NaN gives its first NaN, as torch.argmax does.
int64_t argmax_float(const float* row, int64_t n) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
  bool nan = false;
  const float top = row_max(row, n, &nan);
  int64_t j = 0;
  if (nan) {
    while (!is_nan_bits(bits[j])) ++j;
  } else {
    while (row[j] != top) ++j;
  }
  return j;
}

// Each row's argmax (see argmax_float). torch's own argmax over a step's [128, 49152] float32
// logits is a scalar loop (~7 ms); this is one vectorised pass for the maximum and a scan for its
// first index. bfloat16 rows are widened (exactly) a row at a time into a buffer that stays in
// cache, instead of converting the whole step's logits to float32 in memory first.
at::Tensor row_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.stride(1) == 1 && x.size(1) > 0,
              "row_argmax: x is float32 or bfloat16 [R, n], n > 0, with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) op[r] = argmax_float(xp + r * stride, n);
    });
    return out;
  }
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> wide;
    wide.resize(n);
    for (int64_t r = begin; r < end; ++r) {
      slserve::to_float(xp + r * stride, wide.data(), n);
      op[r] = argmax_float(wide.data(), n);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? delta, Tensor(b!) out, Tensor weight, float eps) -> ()");
  m.def("rotary_write_kv(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, "
        "Tensor(b!) cache_rows, Tensor k_index, Tensor v_index) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gu) -> ()");
  m.def("row_argmax(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(slserve, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_write_kv", &rotary_write_kv);
  m.impl("silu_mul", &silu_mul);
  m.impl("row_argmax", &row_argmax);
}
