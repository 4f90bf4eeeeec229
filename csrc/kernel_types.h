// Device-neutral records of one slice_moments call, shared by every backend (CPU, CUDA, emulated CUDA).
// No torch headers but c10's macros: the CPU kernels include this under wider instruction sets than the
// rest.
#pragma once

#include "stream_modes.h"

namespace nmx {

// Storage type of one input tensor, as the kernels dispatch on it.
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// One tensor of xs with its companions of ys / zs: contiguous data and dtype codes.  In a stream mode
// (stream_modes.h) x, y, z are θ, g and exp_avg, and v, vmax the further state the mode reads.
struct TensorPtrs {
  const void* x;
  const void* y;  // nullptr when absent
  const void* z;  // nullptr when absent
  int dx, dy, dz;
  int mode = kStreamPlain;
  const void* v = nullptr;     // kStreamAdam: exp_avg_sq (nullptr: fresh state)
  const void* vmax = nullptr;  // kStreamAdam: max_exp_avg_sq (nullptr: no amsgrad, or fresh state)
  int dv = 0, dvmax = 0;
  StreamCoef<double> coef{};  // the step's constants, from the op's scalars (StreamCoef::make)
};

// Whether a stream mode computes in double (any input float64) or in float (stream_modes.h).
inline bool stream_in_double(const TensorPtrs& p) {
  return p.dx == kF64 || p.dy == kF64 || (p.z && p.dz == kF64) || (p.v && p.dv == kF64) ||
         (p.vmax && p.dvmax == kF64);
}

}  // namespace nmx
