// Batched mixed-rank LoRA for the CPU path: the loop over adapter segments of
// slserve/kernels/lora.py:apply_lora, in C++.
//
// For segment s (tokens starts[s]:ends[s]) with stacked A [R, in] and expands
// (BT [r, out], h0, y0):   h = x[seg] @ A^T ;   y[seg, y0:y0+out] += h[:, h0:h0+r] @ BT
//
// Decode segments hold a handful of tokens. There a library matmul spends more time setting up
// than computing (tens of microseconds for a bfloat16 call), so short segments use plain loops
// that read each weight row once, accumulate in float32 and let the compiler vectorise.
// Long (prefill) segments go to at::mm / addmm_. Segments write disjoint rows of y, so they are
// spread over the intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "convert.h"

namespace {

constexpr int64_t kShortSegment = 32;

template <typename T>
void short_segment(const T* x, int64_t x_stride, int64_t n, const T* a, int64_t rank, int64_t in,
                   T* y, int64_t y_stride, const std::vector<const T*>& bt, const std::vector<int64_t>& rk,
                   const std::vector<int64_t>& outs, const std::vector<int64_t>& h0,
                   const std::vector<int64_t>& y0) {
  std::vector<float> xf(n * in);
  for (int64_t t = 0; t < n; ++t) slserve::to_float(x + t * x_stride, xf.data() + t * in, in);
  std::vector<float> h(n * rank), af(in);
  for (int64_t r = 0; r < rank; ++r) {
    slserve::to_float(a + r * in, af.data(), in);
    for (int64_t t = 0; t < n; ++t) h[t * rank + r] = slserve::dot(xf.data() + t * in, af.data(), in);
  }
  for (size_t e = 0; e < bt.size(); ++e) {
    const int64_t out = outs[e];
    std::vector<float> acc(n * out), bf(out);
    for (int64_t t = 0; t < n; ++t) slserve::to_float(y + t * y_stride + y0[e], acc.data() + t * out, out);
    for (int64_t r = 0; r < rk[e]; ++r) {
      slserve::to_float(bt[e] + r * out, bf.data(), out);
      for (int64_t t = 0; t < n; ++t) {
        const float hv = h[t * rank + h0[e] + r];
        float* at = acc.data() + t * out;
        for (int64_t j = 0; j < out; ++j) at[j] += hv * bf[j];
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      T* yt = y + t * y_stride + y0[e];
      for (int64_t j = 0; j < out; ++j) yt[j] = static_cast<T>(acc[t * out + j]);
    }
  }
}

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
  // Long segments go through ATen's matmuls, which bring their own threading, on this thread
  // (ATen ops on an OpenMP worker would also lose this thread's inference-mode state). Short
  // segments are plain loops over disjoint rows of y, spread over the intra-op threads.
  std::vector<int64_t> short_segments;
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t n = ends[s] - starts[s];
    if (n <= 0) continue;
    if (n <= kShortSegment) {
      short_segments.push_back(s);
      continue;
    }
    const at::Tensor h = at::mm(x.narrow(0, starts[s], n), a[s].t());
    for (int64_t e = first[s]; e < first[s + 1]; ++e) {
      at::Tensor out = y.narrow(0, starts[s], n).narrow(1, y0[e], bt[e].size(1));
      out.addmm_(h.narrow(1, h0[e], bt[e].size(0)), bt[e]);
    }
  }
  for (int64_t s : short_segments)
    TORCH_CHECK(a[s].is_contiguous(), "lora_apply: A must be contiguous");
  for (int64_t e = 0; e < first[num_segments]; ++e)
    TORCH_CHECK(bt[e].is_contiguous(), "lora_apply: B^T must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(short_segments.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = short_segments[i];
        std::vector<const scalar_t*> bts;
        std::vector<int64_t> rks, outs, h0s, y0s;
        for (int64_t e = first[s]; e < first[s + 1]; ++e) {
          bts.push_back(bt[e].data_ptr<scalar_t>());
          rks.push_back(bt[e].size(0));
          outs.push_back(bt[e].size(1));
          h0s.push_back(h0[e]);
          y0s.push_back(y0[e]);
        }
        short_segment<scalar_t>(xp + starts[s] * x.stride(0), x.stride(0), ends[s] - starts[s],
                                a[s].data_ptr<scalar_t>(), a[s].size(0), a[s].size(1),
                                yp + starts[s] * y.stride(0), y.stride(0), bts, rks, outs, h0s, y0s);
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
