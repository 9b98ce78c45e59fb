// Quantized linears for the CPU path (slserve/model/quant.py):
//
//   int8_linear: out[t, n] = sum_k x[t, k] * (float(q[n, k]) * scale[n])
//   q4_linear:   out[t, n] = sum_k x[t, k] * (code[n, k] * scale[n, k / G] + zero[n, k / G])
//                                                              accumulated in float32
//   quantize_rows, dequantize_rows: the two element-wise ends of the w8a8 matmul, around
//                torch's int8 x int8 -> int32 matmul (one pass each instead of four torch ops)
//
// Decode reads every base weight once per step for a handful of rows, so the step is bound by
// weight bytes: int8 weights are a quarter of float32's, 4-bit codes with their group scales
// under a fifth. torch's own _weight_int8pack_mm is vectorised for bfloat16 activations only (on
// AVX2 its float32 path is ~15x slower than a float32 matmul, its CPU int4 matmul 25-50x), so
// float32 activations come here. Each weight row is widened and scaled once into a float32 tile
// (the dequantized weight the reference multiplies by, to a rounding), then applied
// to every row of x from cache. A tile holds kTileN output channels and x is walked kTileT rows
// at a time, so each vector load feeds several multiply-adds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <vector>

#include "convert.h"

namespace {

constexpr int64_t kTileN = 4;  // output channels sharing each load of x
constexpr int64_t kTileT = 2;  // rows of x sharing each load of the weight tile

// out[r * out_stride + c] = dot(x row r, tile row c) for r < RT, c < NC; a tile row is k floats.
#if defined(__AVX2__) && defined(__FMA__)
// One 8-float register per partial sum: RT x NC sums plus the RT + NC loads feeding them fit
// AVX2's 16 registers (the compiler's own vectorisation of the same loop spills them).
template <int64_t RT, int64_t NC>
inline void dot_tile(const float* x, int64_t x_stride, const float* w, int64_t k, float* out,
                     int64_t out_stride) {
  __m256 acc[RT][NC];
  for (int64_t r = 0; r < RT; ++r)
    for (int64_t c = 0; c < NC; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t k_vec = k - k % 8;
  for (int64_t k0 = 0; k0 < k_vec; k0 += 8) {
    __m256 wv[NC];
    for (int64_t c = 0; c < NC; ++c) wv[c] = _mm256_loadu_ps(w + c * k + k0);
    for (int64_t r = 0; r < RT; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * x_stride + k0);
      for (int64_t c = 0; c < NC; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < RT; ++r) {
    for (int64_t c = 0; c < NC; ++c) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[r][c]);
      float s = 0.f;
      for (int64_t l = 0; l < 8; ++l) s += lanes[l];
      for (int64_t j = k_vec; j < k; ++j) s += x[r * x_stride + j] * w[c * k + j];
      out[r * out_stride + c] = s;
    }
  }
}
#else
template <int64_t RT, int64_t NC>
inline void dot_tile(const float* x, int64_t x_stride, const float* w, int64_t k, float* out,
                     int64_t out_stride) {
  for (int64_t r = 0; r < RT; ++r)
    for (int64_t c = 0; c < NC; ++c) out[r * out_stride + c] = slserve::dot(x + r * x_stride, w + c * k, k);
}
#endif

template <int64_t NC>
void rows_times_tile(const float* x, int64_t T, int64_t k, const float* w, float* out, int64_t n_out) {
  int64_t t = 0;
  for (; t + kTileT <= T; t += kTileT) dot_tile<kTileT, NC>(x + t * k, k, w, k, out + t * n_out, n_out);
  for (; t < T; ++t) dot_tile<1, NC>(x + t * k, k, w, k, out + t * n_out, n_out);
}

// out[t, n] = dot(x[t], W'[n]) for x [T, K] float32; widen(n, row) writes W'[n] (K floats).
template <typename Widen>
void tiled_linear(float* op, const float* xp, int64_t T, int64_t K, int64_t N, const Widen& widen) {
  if (T == 0 || N == 0) return;
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  // Enough tiles per task that a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kTileN * K * T));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> w(kTileN * K);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTileN, nc = std::min(kTileN, N - n0);
      for (int64_t c = 0; c < nc; ++c) widen(n0 + c, w.data() + c * K);
      if (nc == kTileN) {
        rows_times_tile<kTileN>(xp, T, K, w.data(), op + n0, N);
      } else {
        for (int64_t c = 0; c < nc; ++c) rows_times_tile<1>(xp, T, K, w.data() + c * K, op + n0 + c, N);
      }
    }
  });
}

void check_x_out(const at::Tensor& out, const at::Tensor& x, int64_t n, int64_t k, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) == k, name,
              ": x is [T, K] float32, contiguous");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == x.size(0) &&
                  out.size(1) == n,
              name, ": out is [T, N] float32, contiguous");
}

// q: [N, K] int8, contiguous; scale: [N] float32. W'[n, k] = q[n, k] * scale[n].
void int8_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar,
              "int8_linear: q is [N, K] int8, contiguous");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "int8_linear: scale is [N] float32");
  const int64_t N = q.size(0), K = q.size(1);
  check_x_out(out, x, N, K, "int8_linear");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  tiled_linear(out.data_ptr<float>(), x.data_ptr<float>(), x.size(0), K, N, [&](int64_t n, float* row) {
    const int8_t* qr = qp + n * K;
    const float s = sp[n];
    for (int64_t j = 0; j < K; ++j) row[j] = static_cast<float>(qr[j]) * s;
  });
}

// codes: [N, K / 2] uint8, two 4-bit codes a byte (column 2j in the low nibble, 2j + 1 in the
// high one); scale, zero: [N, K / group] float32. W'[n, k] = code * scale[n, g] + zero[n, g],
// g = k / group.
void q4_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
               const at::Tensor& zero, int64_t group) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte,
              "q4_linear: codes is [N, K / 2] uint8, contiguous");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 2 == 0 && K % group == 0, "q4_linear: the group size divides K and is even");
  const int64_t groups = K / group;
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == groups,
                "q4_linear: scale and zero are [N, K / group] float32");
  check_x_out(out, x, N, K, "q4_linear");
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  tiled_linear(out.data_ptr<float>(), x.data_ptr<float>(), x.size(0), K, N, [&](int64_t n, float* row) {
    const uint8_t* cr = cp + n * (K / 2);
    for (int64_t g = 0; g < groups; ++g) {
      const float s = sp[n * groups + g], z = zp[n * groups + g];
      const uint8_t* cg = cr + g * group / 2;
      float* rg = row + g * group;
      for (int64_t j = 0; j < group / 2; ++j) {
        rg[2 * j] = static_cast<float>(cg[j] & 15) * s + z;
        rg[2 * j + 1] = static_cast<float>(cg[j] >> 4) * s + z;
      }
    }
  });
}

// w8a8: the activations quantized per row, as the int8 matmul takes them (model/quant.py):
//   amax = max_k |x[m, k]|, xq[m, k] = clamp(round_half_even(x[m, k] * inv), -127, 127),
//   inv = float(127 / amax), scale[m] = float(amax / 127) (in double; a zero row: codes 0, scale 1).
void quantize_rows(const at::Tensor& xq, const at::Tensor& scale, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quantize_rows: x is [M, K] with contiguous rows");
  TORCH_CHECK(xq.is_contiguous() && xq.scalar_type() == at::kChar && xq.sizes() == x.sizes(),
              "quantize_rows: xq is [M, K] int8, contiguous");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == x.size(0),
              "quantize_rows: scale is [M] float32");
  const int64_t M = x.size(0), K = x.size(1), stride = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int8_t* qp = xq.data_ptr<int8_t>();
    float* sp = scale.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(K);
      for (int64_t m = begin; m < end; ++m) {
        const float* row = slserve::float_row(xp + m * stride, buf.data(), K);
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
        // The two row constants in double, then rounded (as quant.py's torch path computes them):
        // float32 division would be turned into a multiply by a rounded reciprocal (-ffast-math).
        const double a = amax;
        const float inv = amax > 0.f ? static_cast<float>(127.0 / a) : 0.f;
        sp[m] = amax > 0.f ? static_cast<float>(a / 127.0) : 1.f;
        int8_t* q = qp + m * K;
        int64_t k = 0;
#if defined(__AVX512F__)
        // Rounds to nearest even (the default MXCSR mode), then clamps and narrows.
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (; k + 16 <= K; k += 16) {
          const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), vinv));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(r, lo), hi)));
        }
#endif
        for (; k < K; ++k)
          q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[k] * inv))));
      }
    });
  });
}

// out[m, n] = acc[m, n] * (row_scale[m] * col_scale[n]), in out's dtype (round to nearest even).
// out may be a block of columns of a wider output (contiguous rows, any row stride).
void dequantize_rows(const at::Tensor& out, const at::Tensor& acc, const at::Tensor& row_scale,
                     const at::Tensor& col_scale) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == at::kInt,
              "dequantize_rows: acc is [M, N] int32, contiguous");
  TORCH_CHECK(out.dim() == 2 && out.sizes() == acc.sizes() && out.stride(1) == 1 && out.stride(0) >= acc.size(1),
              "dequantize_rows: out is [M, N] with contiguous rows");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(row_scale.is_contiguous() && row_scale.scalar_type() == at::kFloat && row_scale.numel() == M &&
                  col_scale.is_contiguous() && col_scale.scalar_type() == at::kFloat && col_scale.numel() == N,
              "dequantize_rows: row_scale [M], col_scale [N], float32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_rows", [&] {
    const int32_t* ap = acc.data_ptr<int32_t>();
    const float* rs = row_scale.data_ptr<float>();
    const float* cs = col_scale.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t out_stride = out.stride(0);
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const int32_t* a = ap + m * N;
        scalar_t* o = op + m * out_stride;
        const float r = rs[m];
        for (int64_t n = 0; n < N; ++n) o[n] = slserve::round_to<scalar_t>(static_cast<float>(a[n]) * (r * cs[n]));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) {
  m.def("int8_linear(Tensor(a!) out, Tensor x, Tensor q, Tensor scale) -> ()");
  m.def("q4_linear(Tensor(a!) out, Tensor x, Tensor codes, Tensor scale, Tensor zero, int group) -> ()");
  m.def("quantize_rows(Tensor(a!) xq, Tensor(b!) scale, Tensor x) -> ()");
  m.def("dequantize_rows(Tensor(a!) out, Tensor acc, Tensor row_scale, Tensor col_scale) -> ()");
}

TORCH_LIBRARY_IMPL(slserve, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("q4_linear", &q4_linear);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("dequantize_rows", &dequantize_rows);
}
