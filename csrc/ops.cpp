// The op's schema and the argument checks every backend shares (the backends register their kernels in
// their own files: cpu/slice_moments_cpu.cpp, cuda/slice_moments_cuda.cu).
#include "ops.h"

#include <torch/library.h>

namespace nmx {
namespace {

int dtype_code(const at::Tensor& t, const char* list, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default:
      TORCH_CHECK_TYPE(false, "slice_moments: ", list, "[", i, "] has dtype ", t.scalar_type(),
                       "; supported: float32, float64, float16, bfloat16");
  }
  return -1;
}

// The tensor of ys / zs that goes with xs[i], or an undefined tensor when absent.
at::Tensor companion(const OptionalTensorList& ts, size_t i, const at::Tensor& x, const char* list) {
  if (ts.size() == 0) return at::Tensor();
  std::optional<at::Tensor> t = ts.get(i);
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->sizes() == x.sizes(), "slice_moments: ", list, "[", i, "] has shape ", t->sizes(),
                    " but xs[", i, "] has ", x.sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), "slice_moments: ", list, "[", i, "] is on ", t->device(),
                    " but xs[", i, "] is on ", x.device());
  return *t;
}

}  // namespace

Call prepare_call(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                  at::IntArrayRef views) {
  TORCH_CHECK_VALUE(!xs.empty(), "slice_moments: xs is empty");
  TORCH_CHECK_VALUE(ys.size() == 0 || ys.size() == xs.size(), "slice_moments: ys has ", ys.size(),
                    " entries but xs has ", xs.size());
  TORCH_CHECK_VALUE(zs.size() == 0 || zs.size() == xs.size(), "slice_moments: zs has ", zs.size(),
                    " entries but xs has ", xs.size());
  TORCH_CHECK_VALUE(views.size() % 4 == 0, "slice_moments: views must be (tensor, A, K, B) quadruples");
  Call call;
  const at::Device device = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK_VALUE(x.device() == device, "slice_moments: xs[", i, "] is on ", x.device(), " but xs[0] is on ",
                      device);
    at::Tensor y = companion(ys, i, x, "ys"), z = companion(zs, i, x, "zs");
    TensorPtrs p{};
    p.dx = dtype_code(x, "xs", i);
    call.keep.push_back(x.contiguous());
    p.x = call.keep.back().data_ptr();
    if (y.defined()) {
      p.dy = dtype_code(y, "ys", i);
      call.keep.push_back(y.contiguous());
      p.y = call.keep.back().data_ptr();
    }
    if (z.defined()) {
      p.dz = dtype_code(z, "zs", i);
      call.keep.push_back(z.contiguous());
      p.z = call.keep.back().data_ptr();
    }
    call.tensors.push_back(p);
    call.numels.push_back(x.numel());
  }
  int64_t last = 0;
  for (size_t q = 0; q < views.size(); q += 4) {
    const int64_t t = views[q], A = views[q + 1], K = views[q + 2], B = views[q + 3];
    TORCH_CHECK_INDEX(t >= 0 && t < static_cast<int64_t>(xs.size()), "slice_moments: view ", q / 4,
                      " names tensor ", t, " of ", xs.size());
    TORCH_CHECK_VALUE(t >= last, "slice_moments: views must be ordered by tensor index");
    TORCH_CHECK_VALUE(A >= 0 && K >= 0 && B >= 0, "slice_moments: view (", A, ", ", K, ", ", B, ") of xs[", t,
                      "] has a negative size");
    int64_t ak = 0, akb = 0;
    const bool overflow = __builtin_mul_overflow(A, K, &ak) || __builtin_mul_overflow(ak, B, &akb);
    TORCH_CHECK_VALUE(!overflow && akb == call.numels[t], "slice_moments: view (", A, ", ", K, ", ", B,
                      ") does not cover the ", call.numels[t], " elements of xs[", t, "]");
    last = t;
    call.num_rows += K;
  }
  call.views.assign(views.begin(), views.end());
  return call;
}

}  // namespace nmx

TORCH_LIBRARY(neural_mechanics_ext, m) {
  m.def("slice_moments(Tensor[] xs, Tensor?[] ys, Tensor?[] zs, int[] views) -> Tensor");
}
