// The op's schema and the argument checks every backend shares (the backends register their kernels in
// their own files: cpu/slice_moments_cpu.cpp, cuda/slice_moments_cuda.cu).
#include "ops.h"
#include "plan.h"

#include <torch/library.h>

#include <cmath>

namespace nmx {
namespace {

int dtype_code(const at::Tensor& t, const char* list, size_t i, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
                       "; supported: float32, float64, float16, bfloat16");
  }
  return -1;
}

// The tensor of ys / zs that goes with xs[i], or an undefined tensor when absent.
at::Tensor companion(const OptionalTensorList& ts, size_t i, const at::Tensor& x, const char* list, const char* op) {
  if (ts.size() == 0) return at::Tensor();
  std::optional<at::Tensor> t = ts.get(i);
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->sizes() == x.sizes(), op, ": ", list, "[", i, "] has shape ", t->sizes(),
                    " but xs[", i, "] has ", x.sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", list, "[", i, "] is on ", t->device(),
                    " but xs[", i, "] is on ", x.device());
  return *t;
}

// A view (A, K, B, offset, a_stride) must address elements of the tensor only, each slice's elements once.
void check_view(at::IntArrayRef f, int64_t numel, int64_t t, const char* op) {
  const int64_t A = f[0], K = f[1], B = f[2], offset = f[3], a_stride = f[4];
  const auto name = [&] {
    return c10::str("view (A, K, B, offset, a_stride) = (", A, ", ", K, ", ", B, ", ", offset, ", ", a_stride,
                    ") of xs[", t, "]");
  };
  TORCH_CHECK_VALUE(A >= 0 && K >= 0 && B >= 0, op, ": ", name(), " has a negative size");
  TORCH_CHECK_VALUE(offset >= 0 && a_stride >= 0, op, ": ", name(), " has a negative offset or a_stride");
  int64_t kb = 0, ak = 0, akb = 0;
  bool overflow = __builtin_mul_overflow(K, B, &kb) || __builtin_mul_overflow(A, K, &ak) ||
                  __builtin_mul_overflow(ak, B, &akb);
  TORCH_CHECK_VALUE(!overflow, op, ": ", name(), " is too large");
  TORCH_CHECK_VALUE(A <= 1 || a_stride >= kb, op, ": ", name(), " has a_stride < K*B = ", kb,
                    ", so its rows a overlap");
  // One past the last element: offset + (A-1)*a_stride + K*B (just offset for an empty view).
  int64_t end = offset, step = 0;
  if (akb > 0)
    overflow = __builtin_mul_overflow(A - 1, a_stride, &step) || __builtin_add_overflow(end, step, &end) ||
               __builtin_add_overflow(end, kb, &end);
  TORCH_CHECK_VALUE(!overflow && end <= numel, op, ": ", name(), " runs past the end of the tensor (",
                    numel, " elements)");
}

}  // namespace

Call prepare_call(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                  at::IntArrayRef views, const char* op) {
  TORCH_CHECK_VALUE(!xs.empty(), op, ": xs is empty");
  TORCH_CHECK_VALUE(ys.size() == 0 || ys.size() == xs.size(), op, ": ys has ", ys.size(),
                    " entries but xs has ", xs.size());
  TORCH_CHECK_VALUE(zs.size() == 0 || zs.size() == xs.size(), op, ": zs has ", zs.size(),
                    " entries but xs has ", xs.size());
  TORCH_CHECK_VALUE(views.size() % kViewFields == 0, op, ": views must be (tensor, A, K, B, offset, a_stride) 6-tuples");
  Call call;
  const at::Device device = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK_VALUE(x.device() == device, op, ": xs[", i, "] is on ", x.device(), " but xs[0] is on ",
                      device);
    at::Tensor y = companion(ys, i, x, "ys", op), z = companion(zs, i, x, "zs", op);
    TensorPtrs p{};
    p.dx = dtype_code(x, "xs", i, op);
    call.keep.push_back(x.contiguous());
    p.x = call.keep.back().data_ptr();
    if (y.defined()) {
      p.dy = dtype_code(y, "ys", i, op);
      call.keep.push_back(y.contiguous());
      p.y = call.keep.back().data_ptr();
    }
    if (z.defined()) {
      p.dz = dtype_code(z, "zs", i, op);
      call.keep.push_back(z.contiguous());
      p.z = call.keep.back().data_ptr();
    }
    call.tensors.push_back(p);
    call.numels.push_back(x.numel());
  }
  int64_t last = 0;
  for (size_t q = 0; q < views.size(); q += kViewFields) {
    const int64_t t = views[q];
    TORCH_CHECK_INDEX(t >= 0 && t < static_cast<int64_t>(xs.size()), op, ": view ", q / kViewFields,
                      " names tensor ", t, " of ", xs.size());
    TORCH_CHECK_VALUE(t >= last, op, ": views must be ordered by tensor index");
    check_view(views.slice(q + 1, kViewFields - 1), call.numels[t], t, op);
    last = t;
    call.num_rows += views[q + 2];
  }
  call.views.assign(views.begin(), views.end());
  return call;
}

Call prepare_stream_call(int mode, at::TensorList params, at::TensorList grads, const OptionalTensorList& exp_avgs,
                         const OptionalTensorList& exp_avg_sqs, const OptionalTensorList& max_exp_avg_sqs,
                         at::IntArrayRef views, at::ArrayRef<double> scalars) {
  const char* op = mode == kStreamAdam ? "adam_moments" : "lion_moments";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, op, ": grads has ", grads.size(), " entries but params has ", n);
  OptionalTensorList gs;
  for (const at::Tensor& g : grads) gs.push_back(g);
  // (params, grads, exp_avgs) are checked, and read, as slice_moments' (xs, ys, zs).
  Call call = prepare_call(params, gs, exp_avgs, views, op);
  const int stride = mode == kStreamAdam ? kAdamScalars : kLionScalars;
  TORCH_CHECK_VALUE(scalars.size() == n * stride, op, ": scalars must hold ", stride, " numbers per tensor (",
                    n * stride, "), got ", scalars.size());
  for (const OptionalTensorList* ts : {&exp_avg_sqs, &max_exp_avg_sqs})
    TORCH_CHECK_VALUE(ts->size() == 0 || ts->size() == n, op, ": the state lists must be empty or hold one entry per "
                      "tensor (", n, "), got ", ts->size());
  for (size_t i = 0; i < n; ++i) {
    TensorPtrs& p = call.tensors[i];
    TORCH_CHECK_VALUE(p.y != nullptr, op, ": grads[", i, "] is undefined");
    p.mode = mode;
    const double* s = scalars.data() + i * stride;
    for (int k = 0; k < stride; ++k)
      TORCH_CHECK_VALUE(std::isfinite(s[k]), op, ": scalar ", k, " of tensor ", i, " is ", s[k]);
    TORCH_CHECK_VALUE(s[kBeta1] >= 0.0 && s[kBeta1] < 1.0, op, ": beta1 of tensor ", i, " is ", s[kBeta1],
                      ", not in [0, 1)");
    p.coef = StreamCoef<double>::make(s, mode);
    if (mode != kStreamAdam) continue;
    TORCH_CHECK_VALUE(s[kBeta2] >= 0.0 && s[kBeta2] < 1.0 && s[kEps] >= 0.0 && s[kBc1] > 0.0 && s[kBc1] <= 1.0 &&
                      s[kBc2] > 0.0 && s[kBc2] <= 1.0 && (s[kMaximize] == 0.0 || s[kMaximize] == 1.0),
                      op, ": the scalars of tensor ", i, " are out of range (beta2 in [0, 1), eps >= 0, bias "
                      "corrections in (0, 1], maximize 0 or 1)");
    const at::Tensor& x = params[i];
    at::Tensor v = companion(exp_avg_sqs, i, x, "exp_avg_sqs", op), vmax = companion(max_exp_avg_sqs, i, x,
                                                                                   "max_exp_avg_sqs", op);
    // A fresh optimizer has neither moment; torch creates both (and max_exp_avg_sq) at its first step.
    TORCH_CHECK_VALUE((p.z != nullptr) == v.defined(), op, ": tensor ", i, " has ",
                      v.defined() ? "exp_avg_sq but no exp_avg" : "exp_avg but no exp_avg_sq",
                      " (pass both, or neither for a fresh optimizer)");
    TORCH_CHECK_VALUE(!vmax.defined() || v.defined(), op, ": tensor ", i, " has max_exp_avg_sq but no exp_avg_sq");
    if (v.defined()) {
      p.dv = dtype_code(v, "exp_avg_sqs", i, op);
      call.keep.push_back(v.contiguous());
      p.v = call.keep.back().data_ptr();
    }
    if (vmax.defined()) {
      p.dvmax = dtype_code(vmax, "max_exp_avg_sqs", i, op);
      call.keep.push_back(vmax.contiguous());
      p.vmax = call.keep.back().data_ptr();
    }
  }
  return call;
}

}  // namespace nmx

TORCH_LIBRARY(neural_mechanics_ext, m) {
  m.def("slice_moments(Tensor[] xs, Tensor?[] ys, Tensor?[] zs, int[] views) -> Tensor");
  // The fused stream modes (stream_modes.h); scalars per tensor: adam (beta1, beta2, eps, bc1, bc2,
  // coupled weight decay, maximize 0/1), lion (beta1).
  m.def("adam_moments(Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, "
        "Tensor?[] max_exp_avg_sqs, int[] views, float[] scalars) -> Tensor");
  m.def("lion_moments(Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, int[] views, float[] scalars) -> Tensor");
}
