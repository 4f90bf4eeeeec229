// Shared by the device backends: argument checks and the flattened description of one call.
// The op's schema is defined in ops.cpp; each backend registers its implementation in its own file.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "kernel_types.h"

namespace nmx {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

struct Call {
  std::vector<at::Tensor> keep;          // inputs (contiguous copies where needed), kept alive
  std::vector<int64_t> numels;           // per tensor of xs
  std::vector<int64_t> views;            // flat (tensor, A, K, B, offset, a_stride) 6-tuples (plan.h)
  std::vector<TensorPtrs> tensors;       // data pointers and dtype codes per tensor of xs
  int64_t num_rows = 0;                  // output rows: sum of K
};

// Validates the op's arguments (the Python wrapper checks them first, with friendlier messages; these
// checks keep direct calls of torch.ops.neural_mechanics_ext.slice_moments safe).  `op` names the op in
// the messages.
Call prepare_call(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                  at::IntArrayRef views, const char* op = "slice_moments");

// The same for the stream modes (stream_modes.h), whose ops read (params, grads, exp_avgs) as
// (xs, ys, zs), Adam's exp_avg_sqs / max_exp_avg_sqs besides, and per tensor the step's scalars.
Call prepare_stream_call(int mode, at::TensorList params, at::TensorList grads, const OptionalTensorList& exp_avgs,
                         const OptionalTensorList& exp_avg_sqs, const OptionalTensorList& max_exp_avg_sqs,
                         at::IntArrayRef views, at::ArrayRef<double> scalars);

#if defined(NMX_WITH_CUDA_EMULATION)
// The CUDA kernels run on the host SIMT emulation (cuda/emulation.h), threads scheduled in an order drawn
// from schedule_seed: for tests on machines without a GPU.  CPU tensors in, the op's result out.
at::Tensor slice_moments_cuda_emulated(at::TensorList xs, const OptionalTensorList& ys,
                                       const OptionalTensorList& zs, at::IntArrayRef views, uint64_t schedule_seed);
// A prepared call (any stream mode) on the emulated CUDA kernels.
at::Tensor run_cuda_emulated(const Call& call, uint64_t schedule_seed);

// Runs one of the emulation's own test kernels (cuda/emulation_selftest.cpp) and returns what it wrote.
std::vector<double> cuda_emulation_selftest(const std::string& kernel, uint64_t schedule_seed);
#endif

}  // namespace nmx
