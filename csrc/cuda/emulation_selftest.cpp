// Small kernels that check the emulation itself (tests/test_cuda_emulation.py): that it computes what a
// GPU computes for correct code, and that it exposes the mistakes it is meant to expose.
#include <ATen/ATen.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../ops.h"
// After every library header (it defines CUDA's names as macros).
#include "emulation.h"

namespace nmx {
namespace {

constexpr int kBlock = 256;

// Each block sums its 256 values: within warps by shuffles, across warps through shared memory.
__global__ void block_sum(const double* in, double* out, bool barrier) {
  __shared__ double partial[kBlock / 32];
  const int t = threadIdx.x;
  double v = in[blockIdx.x * kBlock + t];
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (t % 32 == 0) partial[t / 32] = v;
  if (barrier) __syncthreads();  // without it, thread 0 may read partial sums not yet written
  if (t == 0) {
    double s = 0.0;
    for (int w = 0; w < kBlock / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

__global__ void divergent_barrier() {
  if (threadIdx.x % 2 == 0) __syncthreads();
}

__global__ void divergent_shuffle(double* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0, 1);
}

__global__ void misaligned_vector(const float* p) {
  emu::check_aligned(p + 1, sizeof(float4));
}

// Lane l receives lane l ^ 5 (xor), and l + 3 within segments of 8 lanes (down; the last 3 keep theirs).
__global__ void shuffles(double* out) {
  const int l = threadIdx.x;
  out[l] = __shfl_xor_sync(0xffffffffu, double(l), 5);
  out[32 + l] = __shfl_down_sync(0xffffffffu, double(l), 3, 8);
}

}  // namespace

std::vector<double> cuda_emulation_selftest(const std::string& kernel, uint64_t seed) {
  const unsigned blocks = 8;
  std::vector<double> in(blocks * kBlock), out(blocks * kBlock, 0.0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = double(i % 977);
  if (kernel == "block_sum" || kernel == "block_sum_without_barrier") {
    const bool barrier = kernel == "block_sum";
    emu::launch(dim3(blocks), dim3(kBlock), seed, [&] { block_sum(in.data(), out.data(), barrier); });
    out.resize(blocks);
  } else if (kernel == "divergent_barrier") {
    emu::launch(dim3(1), dim3(kBlock), seed, [&] { divergent_barrier(); });
  } else if (kernel == "divergent_shuffle") {
    emu::launch(dim3(1), dim3(32), seed, [&] { divergent_shuffle(out.data()); });
  } else if (kernel == "misaligned_vector") {
    const std::vector<float> data(8);
    emu::launch(dim3(1), dim3(32), seed, [&] { misaligned_vector(data.data()); });
  } else if (kernel == "shuffles") {
    emu::launch(dim3(1), dim3(32), seed, [&] { shuffles(out.data()); });
    out.resize(64);
  } else {
    throw std::invalid_argument("cuda_emulation_selftest: no kernel named " + kernel);
  }
  return out;
}

}  // namespace nmx
