// Weight-only quantized linears for the CPU path (slserve/model/quant.py):
//
//   int8_linear: out[t, n] = sum_k x[t, k] * (float(q[n, k]) * scale[n])
//   q4_linear:   out[t, n] = sum_k x[t, k] * (code[n, k] * scale[n, k / G] + zero[n, k / G])
//                                                              accumulated in float32
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) {
  m.def("int8_linear(Tensor(a!) out, Tensor x, Tensor q, Tensor scale) -> ()");
  m.def("q4_linear(Tensor(a!) out, Tensor x, Tensor codes, Tensor scale, Tensor zero, int group) -> ()");
}

TORCH_LIBRARY_IMPL(slserve, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("q4_linear", &q4_linear);
}
