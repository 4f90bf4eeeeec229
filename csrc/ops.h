// Shared by the device backends: argument checks and the flattened description of one call.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "cpu/kernels.h"

namespace nmx {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

struct Call {
  std::vector<at::Tensor> keep;          // inputs (contiguous copies where needed), kept alive
  std::vector<int64_t> numels;           // per tensor of xs
  std::vector<int64_t> views;            // flat (tensor, A, K, B) quadruples
  std::vector<cpu::TensorPtrs> tensors;  // data pointers and dtype codes per tensor of xs
  int64_t num_rows = 0;                  // output rows: sum of K
};

// Validates the op's arguments (the Python wrapper checks them first, with friendlier messages; these
// checks keep direct calls of torch.ops.neural_mechanics_ext.slice_moments safe).
Call prepare_call(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                  at::IntArrayRef views);

at::Tensor slice_moments_cpu(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                             at::IntArrayRef views);

}  // namespace nmx
