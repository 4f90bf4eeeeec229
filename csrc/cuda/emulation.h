// A host emulation of the CUDA execution model, for running CUDA kernel source without a GPU (tests).
//
// Include it after every other header (it defines CUDA's names as macros) and before the kernel source
// (*.cuh): the kernels then compile with the host compiler as ordinary functions.
// `launch(grid, block, seed, body)` runs every block of a grid, one block at a time; the threads of a
// block are cooperative fibers on one OS thread (a register-saving stack switch on x86-64, glibc
// ucontext elsewhere):
//   * threadIdx / blockIdx / blockDim / gridDim are set for the fiber that runs;
//   * __shared__ variables are static thread_local: one copy, shared by the fibers of the running block;
//   * __syncthreads() is a barrier of the block's fibers, __shfl_xor_sync / __shfl_down_sync a
//     rendezvous of the 32 lanes of a warp that exchanges their values (full masks only);
//   * every time a fiber reaches a barrier or a shuffle, the next fiber to run is drawn from a
//     generator seeded by (seed, block), and blocks run in a seeded order.  A missing barrier, a read of
//     shared memory before its writer's barrier, or a warp-synchronous assumption therefore gives a
//     result that changes with the seed (or is wrong for every seed); kernels that are deterministic
//     by design give bit-identical results under every seed;
//   * a barrier or shuffle that not all threads (lanes) reach, a vector load from a misaligned address
//     (check_aligned below, which the kernels' vector loads call) and a partial shuffle mask stop the
//     launch with an error (a GPU would hang, fault or compute garbage).
// tests/test_cuda_emulation.py checks these properties on small kernels (emulation_selftest.cpp).
//
// What the emulation cannot see (bench/gpu_check.sh on a machine with a GPU remains the check):
//   * the memory model between blocks and between threads: blocks run one after another, and a
//     thread runs without interruption from one barrier or shuffle to the next, so an unsynchronised
//     read-modify-write of one location by two threads looks atomic; a race between plain writers
//     shows only as a seed-dependent order;
//   * shared memory is not uninitialised at block start: it holds the previous block's values (zeros at
//     first), so a read of shared memory that no thread of the block wrote is not caught;
//   * out-of-bounds reads and writes (no bounds checks; a sanitizer build of the host code would see
//     those of global memory);
//   * timing: warp divergence, occupancy, register pressure and spills, __launch_bounds__, coalescing;
//   * device arithmetic: the host compiler may contract a*b+c into an FMA where nvcc does or does not,
//     so the last bits of a result can differ from the GPU's (both are within rounding of the exact
//     value); conversions of 16-bit floats are exact on both.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#if !defined(__CUDACC__)

namespace nmx {
namespace emu {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The CUDA vector types the kernels use, with CUDA's sizes and alignments.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

// Coordinates of the fiber that runs (set by the scheduler before it resumes a fiber).
extern thread_local uint3 thread_idx, block_idx;
extern thread_local dim3 block_dim, grid_dim;

// Runs body() once per thread of every block of the grid (see the top of this file); throws
// std::runtime_error with the reason when the launch fails.
void launch(dim3 grid, dim3 block, uint64_t seed, const std::function<void()>& body);

// Stops the running launch with an error (called from a fiber; does not return).
[[noreturn]] void fail(const char* what);

void syncthreads();

enum class Shuffle { kXor, kDown };
uint64_t shuffle_bits(unsigned mask, uint64_t bits, Shuffle kind, int arg, int width);

template <typename T>
T shuffle(unsigned mask, T v, Shuffle kind, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles exchange up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle_bits(mask, bits, kind, arg, width);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// A GPU faults on a vector load from an address that is not a multiple of its size; the host would not.
inline void check_aligned(const void* p, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) fail("vector load from a misaligned address");
}

}  // namespace emu

// The names kernel source uses, in the kernels' namespace.
using emu::dim3;
using emu::double2;
using emu::float2;
using emu::float4;
using emu::uint2;
using emu::uint3;
using emu::uint4;
using std::max;
using std::min;

}  // namespace nmx

#define NMX_SIMT_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define threadIdx (::nmx::emu::thread_idx)
#define blockIdx (::nmx::emu::block_idx)
#define blockDim (::nmx::emu::block_dim)
#define gridDim (::nmx::emu::grid_dim)
#define __syncthreads() ::nmx::emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::nmx::emu::shuffle((mask), (v), ::nmx::emu::Shuffle::kXor, (lane_mask), NMX_EMU_WIDTH(__VA_ARGS__))
#define __shfl_down_sync(mask, v, delta, ...) \
  ::nmx::emu::shuffle((mask), (v), ::nmx::emu::Shuffle::kDown, (delta), NMX_EMU_WIDTH(__VA_ARGS__))
#define NMX_EMU_WIDTH(...) (32 __VA_OPT__(* 0 + (__VA_ARGS__)))

#endif  // !__CUDACC__
