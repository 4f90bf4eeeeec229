// slice_moments' CUDA kernels on the host SIMT emulation (emulation.h), for the tests of machines
// without a GPU: the same kernel source and host side as slice_moments_cuda.cu, with host memory for
// device memory and a seeded schedule of the threads.  Not an op: the tests call it through
// neural_mechanics_ext.testing.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../ops.h"
#include "../plan.h"
// After every library header (it defines CUDA's names as macros), before the kernel source.
#include "emulation.h"

#include "slice_moments_kernels.cuh"
#include "slice_moments_host.h"

namespace nmx {
namespace {

struct EmulatedBackend {
  uint64_t seed;

  at::Device device() const { return at::Device(at::kCPU); }
  TableBlob tables(const std::shared_ptr<const Plan>& plan) const { return make_tables(*plan, device()); }
  at::Tensor pointer_table(int64_t rows) const {
    return at::empty({rows, kTensorFields}, at::TensorOptions().dtype(at::kLong));
  }
  at::Tensor upload(const at::Tensor& host) const { return host; }

  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), unsigned grid, unsigned block, A... args) const {
    emu::launch(dim3(grid), dim3(block), seed, [&] { kernel(args...); });
  }
};

}  // namespace

at::Tensor slice_moments_cuda_emulated(at::TensorList xs, const OptionalTensorList& ys,
                                       const OptionalTensorList& zs, at::IntArrayRef views, uint64_t schedule_seed) {
  TORCH_CHECK_VALUE(!xs.empty(), "slice_moments_cuda_emulated: xs is empty");
  TORCH_CHECK_VALUE(xs[0].device().is_cpu(), "slice_moments_cuda_emulated: the emulation reads CPU tensors, got ",
                    xs[0].device());
  return run_cuda_emulated(prepare_call(xs, ys, zs, views), schedule_seed);
}

at::Tensor run_cuda_emulated(const Call& call, uint64_t schedule_seed) {
  for (const at::Tensor& t : call.keep)
    TORCH_CHECK_VALUE(t.device().is_cpu(), "the CUDA emulation reads CPU tensors, got one on ", t.device());
  EmulatedBackend backend{schedule_seed};
  return run_slice_moments(backend, call);
}

}  // namespace nmx
