// The op's schema and the argument checks every backend shares (the backends register their kernels in
// their own files: cpu/slice_moments_cpu.cpp, cuda/slice_moments_cuda.cu).
#include "ops.h"
#include "plan.h"

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

// A view (A, K, B, offset, a_stride) must address elements of the tensor only, each slice's elements once.
void check_view(at::IntArrayRef f, int64_t numel, int64_t t) {
  const int64_t A = f[0], K = f[1], B = f[2], offset = f[3], a_stride = f[4];
  const auto name = [&] {
    return c10::str("view (A, K, B, offset, a_stride) = (", A, ", ", K, ", ", B, ", ", offset, ", ", a_stride,
                    ") of xs[", t, "]");
  };
  TORCH_CHECK_VALUE(A >= 0 && K >= 0 && B >= 0, "slice_moments: ", name(), " has a negative size");
  TORCH_CHECK_VALUE(offset >= 0 && a_stride >= 0, "slice_moments: ", name(), " has a negative offset or a_stride");
  int64_t kb = 0, ak = 0, akb = 0;
  bool overflow = __builtin_mul_overflow(K, B, &kb) || __builtin_mul_overflow(A, K, &ak) ||
                  __builtin_mul_overflow(ak, B, &akb);
  TORCH_CHECK_VALUE(!overflow, "slice_moments: ", name(), " is too large");
  TORCH_CHECK_VALUE(A <= 1 || a_stride >= kb, "slice_moments: ", name(), " has a_stride < K*B = ", kb,
                    ", so its rows a overlap");
  // One past the last element: offset + (A-1)*a_stride + K*B (just offset for an empty view).
  int64_t end = offset, step = 0;
  if (akb > 0)
    overflow = __builtin_mul_overflow(A - 1, a_stride, &step) || __builtin_add_overflow(end, step, &end) ||
               __builtin_add_overflow(end, kb, &end);
  TORCH_CHECK_VALUE(!overflow && end <= numel, "slice_moments: ", name(), " runs past the end of the tensor (",
                    numel, " elements)");
}

}  // namespace

Call prepare_call(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                  at::IntArrayRef views) {
  TORCH_CHECK_VALUE(!xs.empty(), "slice_moments: xs is empty");
  TORCH_CHECK_VALUE(ys.size() == 0 || ys.size() == xs.size(), "slice_moments: ys has ", ys.size(),
                    " entries but xs has ", xs.size());
  TORCH_CHECK_VALUE(zs.size() == 0 || zs.size() == xs.size(), "slice_moments: zs has ", zs.size(),
                    " entries but xs has ", xs.size());
  TORCH_CHECK_VALUE(views.size() % kViewFields == 0,
                    "slice_moments: views must be (tensor, A, K, B, offset, a_stride) 6-tuples");
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
  for (size_t q = 0; q < views.size(); q += kViewFields) {
    const int64_t t = views[q];
    TORCH_CHECK_INDEX(t >= 0 && t < static_cast<int64_t>(xs.size()), "slice_moments: view ", q / kViewFields,
                      " names tensor ", t, " of ", xs.size());
    TORCH_CHECK_VALUE(t >= last, "slice_moments: views must be ordered by tensor index");
    check_view(views.slice(q + 1, kViewFields - 1), call.numels[t], t);
    last = t;
    call.num_rows += views[q + 2];
  }
  call.views.assign(views.begin(), views.end());
  return call;
}

}  // namespace nmx

TORCH_LIBRARY(neural_mechanics_ext, m) {
  m.def("slice_moments(Tensor[] xs, Tensor?[] ys, Tensor?[] zs, int[] views) -> Tensor");
}
