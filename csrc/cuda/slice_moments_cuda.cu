// slice_moments on a GPU: the kernels of slice_moments_kernels.cuh and the host side of
// slice_moments_host.h, with device memory, a pinned pointer table, the current stream and a cache
// of each plan's tables on each device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <list>
#include <mutex>

#include "../ops.h"
#include "slice_moments_kernels.cuh"
#include "slice_moments_host.h"

namespace nmx {
namespace {

// A plan's tables in device memory, made once per (plan, device) and kept while the plan is cached.
struct CachedTables {
  TableBlob tables;
  cudaStream_t made_on = nullptr;  // the stream the blob was allocated on
};

// Returned by value (a tensor reference and a few numbers): a reference into the cache would dangle when
// another thread's call evicts the entry while this one still launches with it.
CachedTables device_tables(const std::shared_ptr<const Plan>& plan, const at::Device& device) {
  static std::mutex mutex;
  static std::list<std::tuple<std::shared_ptr<const Plan>, int, CachedTables>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (std::get<0>(*it) == plan && std::get<1>(*it) == device.index()) {
      cache.splice(cache.begin(), cache, it);  // least recently used goes first
      return std::get<2>(cache.front());
    }
  }
  CachedTables t{make_tables(*plan, device), at::cuda::getCurrentCUDAStream(device.index()).stream()};
  cache.emplace_front(plan, device.index(), std::move(t));
  if (cache.size() > 16) cache.pop_back();
  return std::get<2>(cache.front());
}

struct GpuBackend {
  at::Device dev;
  cudaStream_t stream;

  at::Device device() const { return dev; }

  TableBlob tables(const std::shared_ptr<const Plan>& plan) const {
    CachedTables t = device_tables(plan, dev);
    // The cached tables were allocated on the stream current when they were made; when this call runs
    // on another one, the caching allocator must not hand their memory out again (cache eviction)
    // before this call's kernels are done with it.  (Only then: record_stream goes through the
    // dispatcher.)
    if (stream != t.made_on) t.tables.blob.record_stream(at::cuda::getCurrentCUDAStream(dev.index()));
    return t.tables;
  }

  // Allocated pinned: empty().pin_memory() would allocate twice and copy.  The caching host allocator
  // records the copy in upload(), so the buffer is not reused before the copy has read it.
  at::Tensor pointer_table(int64_t rows) const {
    return at::empty({rows, kTensorFields}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  }

  at::Tensor upload(const at::Tensor& host) const { return host.to(dev, /*non_blocking=*/true); }

  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), unsigned grid, unsigned block, A... args) const {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Any prepared call: slice_moments' or a stream mode's.
at::Tensor run_cuda(const Call& call, const at::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  // Each call uploads its tensors' addresses from a pinned host table: a replayed graph would read
  // whatever that table holds by then.  Refuse capture rather than replay wrong numbers.
  at::cuda::assertNotCapturing(
      "slice_moments (it uploads its tensors' addresses at every call, so a replay would read stale ones) "
      "cannot run");
  GpuBackend backend{device, at::cuda::getCurrentCUDAStream().stream()};
  return run_slice_moments(backend, call);
}

at::Tensor slice_moments_cuda(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                              at::IntArrayRef views) {
  const Call call = prepare_call(xs, ys, zs, views);  // checks that xs is not empty
  return run_cuda(call, xs[0].device());
}

at::Tensor adam_moments_cuda(at::TensorList params, at::TensorList grads, const OptionalTensorList& exp_avgs,
                             const OptionalTensorList& exp_avg_sqs, const OptionalTensorList& max_exp_avg_sqs,
                             at::IntArrayRef views, at::ArrayRef<double> scalars) {
  const Call call =
      prepare_stream_call(kStreamAdam, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, views, scalars);
  return run_cuda(call, params[0].device());
}

at::Tensor lion_moments_cuda(at::TensorList params, at::TensorList grads, const OptionalTensorList& exp_avgs,
                             at::IntArrayRef views, at::ArrayRef<double> scalars) {
  const Call call = prepare_stream_call(kStreamLion, params, grads, exp_avgs, OptionalTensorList(),
                                        OptionalTensorList(), views, scalars);
  return run_cuda(call, params[0].device());
}

}  // namespace
}  // namespace nmx

TORCH_LIBRARY_IMPL(neural_mechanics_ext, CUDA, m) {
  m.impl("slice_moments", &nmx::slice_moments_cuda);
  m.impl("adam_moments", &nmx::adam_moments_cuda);
  m.impl("lion_moments", &nmx::lion_moments_cuda);
}
