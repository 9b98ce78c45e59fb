// float32 x @ W^T through OpenBLAS's sgemm, for CPUs where it beats torch's BLAS (MKL).
//
// MKL's sgemm is tuned for Intel's cores; on an AMD EPYC (Zen 3, AVX2) it ran the decoder's
// projections 1.1-1.3x and the 49k-row lm_head 1.6x slower than OpenBLAS's Haswell kernels
// (benchmarks/blas.py). OpenBLAS comes as the scipy-openblas32 wheel and is loaded here at run
// time with dlopen, so the rest of the extension neither links it nor depends on it.
//
// OpenBLAS keeps its own pthread pool, and two pools on the same cores fight: after each call
// one spins while the other works (an engine step ran 2.6x slower that way). So OpenBLAS is set
// to one thread and called from inside torch's own OpenMP region instead: each thread computes
// its share of W's rows (the output columns) with one single-threaded sgemm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace {

// cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

SgemmFn sgemm = nullptr;

// Load the library at `path` once; `prefix` is its symbol prefix ("scipy_" for the wheel).
bool openblas_load(const std::string& path, const std::string& prefix) {
  if (sgemm != nullptr) return true;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return false;
  auto gemm = reinterpret_cast<SgemmFn>(dlsym(lib, (prefix + "cblas_sgemm").c_str()));
  auto set_threads = reinterpret_cast<void (*)(int)>(dlsym(lib, (prefix + "openblas_set_num_threads").c_str()));
  if (gemm == nullptr || set_threads == nullptr) return false;
  set_threads(1);
  sgemm = gemm;
  return true;
}

// out[M, N] = x[M, K] @ w[N, K]^T. x's rows may be strided (a view into a wider buffer); w and
// out are contiguous. Every thread takes a contiguous block of w's rows, a multiple of 16 so
// that each block starts on a cache line of w and of out.
void openblas_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(sgemm != nullptr, "openblas_linear: OpenBLAS is not loaded");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat, "openblas_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && x.size(1) == w.size(1) &&
                  out.size(0) == x.size(0) && out.size(1) == w.size(0), "openblas_linear: shapes");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous() && out.is_contiguous(),
              "openblas_linear: x needs unit column stride, w and out contiguous");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  if (m == 0 || n == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t lda = std::max<int64_t>(x.stride(0), k);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 16));
  const int64_t block = ((n + threads - 1) / threads + 15) / 16 * 16;  // at most `threads` blocks
  const int64_t blocks = (n + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * block, rows = std::min(n, n0 + block) - n0;
      sgemm(kRowMajor, kNoTrans, kTrans, m, rows, k, 1.0f, xp, lda, wp + n0 * k, k, 0.0f, op + n0, n);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slserve, m) {
  m.def("openblas_load(str path, str prefix) -> bool",
        [](std::string path, std::string prefix) { return openblas_load(path, prefix); });
  m.def("openblas_linear(Tensor(a!) out, Tensor x, Tensor w) -> ()");
}

TORCH_LIBRARY_IMPL(slserve, CPU, m) { m.impl("openblas_linear", &openblas_linear); }
