// Weight-only int8 linear for the CPU path (slserve/model/quant.py):
//
//   out[t, n] = sum_k x[t, k] * (float(q[n, k]) * scale[n])        accumulated in float32
//
// Decode reads every base weight once per step for a handful of rows, so the step is bound by
// weight bytes: int8 weights are a quarter of float32's. torch's own _weight_int8pack_mm is
// vectorised for bfloat16 activations only (on AVX2 its float32 path is ~15x slower than a
// float32 matmul), so float32 activations come here. Each weight row is widened and scaled once
// into a float32 tile (exactly the dequantized weight the reference multiplies by), then applied
// to every row of x from cache. A tile holds kTileN output channels and x is walked kTileT rows
// at a time, so each vector load feeds several multiply-adds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// x: [T, K] float32, contiguous; q: [N, K] int8, contiguous; scale: [N] float32; out: [T, N] float32.
void int8_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "int8_linear: x is [T, K] float32, contiguous");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar && q.size(1) == x.size(1),
              "int8_linear: q is [N, K] int8, contiguous");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "int8_linear: scale is [N] float32");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == x.size(0) &&
                  out.size(1) == q.size(0),
              "int8_linear: out is [T, N] float32, contiguous");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0);
  if (T == 0 || N == 0) return;
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  // Enough tiles per task that a thread's share outweighs waking it.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kTileN * K * T));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> w(kTileN * K);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTileN, nc = std::min(kTileN, N - n0);
      for (int64_t c = 0; c < nc; ++c) {
        const int8_t* qr = qp + (n0 + c) * K;
        float* wr = w.data() + c * K;
        const float s = sp[n0 + c];
        for (int64_t j = 0; j < K; ++j) wr[j] = static_cast<float>(qr[j]) * s;
      }
      if (nc == kTileN) {
        rows_times_tile<kTileN>(xp, T, K, w.data(), op + n0, N);
      } else {
        for (int64_t c = 0; c < nc; ++c) rows_times_tile<1>(xp, T, K, w.data() + c * K, op + n0 + c, N);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) { m.def("int8_linear(Tensor(a!) out, Tensor x, Tensor q, Tensor scale) -> ()"); }

TORCH_LIBRARY_IMPL(slserve, CPU, m) { m.impl("int8_linear", &int8_linear); }
