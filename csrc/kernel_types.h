// Device-neutral records of one slice_moments call, shared by every backend (CPU, CUDA, emulated CUDA).
// No torch headers: the CPU kernels include this under wider instruction sets than the rest.
#pragma once

namespace nmx {

// Storage type of one input tensor, as the kernels dispatch on it.
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// One tensor of xs with its companions of ys / zs: contiguous data and dtype codes.
struct TensorPtrs {
  const void* x;
  const void* y;  // nullptr when absent
  const void* z;  // nullptr when absent
  int dx, dy, dz;
};

}  // namespace nmx
