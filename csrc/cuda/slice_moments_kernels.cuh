// The device code of slice_moments on CUDA, compiled twice from this one source: by nvcc for the GPU
// (slice_moments_cuda.cu) and by the host compiler against the SIMT emulation in emulation.h
// (slice_moments_emulated.cpp), which runs it in the tests of machines without a GPU.  Only CUDA
// constructs that emulation.h models may appear here.
//
// One block per item (plan.h: a rectangle rows [r0, r1) x cols [c0, c1) of a tensor's [R, L] layout).
// Every lane owns four columns of the item and walks down its rows: per-column sums stay in registers
// (COL views), per-row totals are reduced across the lanes of a row with warp shuffles and kept in
// shared memory until they are folded into the item's slots (RUN views).  Loads are 16-byte vectors
// where alignment allows; all arithmetic is in double.  A second, tiny kernel sums every output row's
// slots in the plan's order, so results are deterministic and the data is read exactly once.
//
// Items that fold into COL views need 36 accumulators per lane; the others need none, so the two
// kinds run as two launches of one templated kernel and the register-light one keeps more loads in
// flight.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../kernel_types.h"
#include "../moments.h"
#include "../plan.h"

namespace nmx {
// Internal linkage: each file that includes this compiles it for its own back end (GPU or emulation).
namespace {

constexpr int kThreads = 256;
constexpr int kColsPerLane = 4;
constexpr int kTile = kThreads * kColsPerLane;  // widest item with COL views (PlanConfig.col_width)
constexpr int kRowBuf = 256;                    // row totals (per warp) buffered before a flush
constexpr int kTensorFields = 7;                // x, y, z, dx, dy, dz, aligned4

struct Tables {
  const EntryRec* entries;
  const ViewRec* views;
  const ItemRec* items;
  const int64_t* item_views;  // plan.item_views
  const int64_t* item_ids;  // the items this launch processes
  int64_t num_items;
  const int64_t* tensors;   // [T, kTensorFields], this call's pointers
  double* slots;
};

__device__ __forceinline__ double to_double(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(p)[i];
    case kF64: return static_cast<const double*>(p)[i];
    case kF16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  }
}

// One vector load (the GPU faults on a misaligned one; the emulation says so instead).
template <typename V, typename T>
__device__ __forceinline__ V load_vector(const T* p) {
#if defined(NMX_SIMT_EMULATION)
  emu::check_aligned(p, sizeof(V));
#endif
  return *reinterpret_cast<const V*>(p);
}

// Four 16-bit floats packed in a uint2, lowest address first (the bits, not a reinterpreted pointer).
template <typename H>
__device__ __forceinline__ void unpack4(uint2 u, double v[4]) {
  v[0] = static_cast<float>(H(static_cast<unsigned short>(u.x & 0xffffu), H::from_bits()));
  v[1] = static_cast<float>(H(static_cast<unsigned short>(u.x >> 16), H::from_bits()));
  v[2] = static_cast<float>(H(static_cast<unsigned short>(u.y & 0xffffu), H::from_bits()));
  v[3] = static_cast<float>(H(static_cast<unsigned short>(u.y >> 16), H::from_bits()));
}

// Four consecutive elements at a 4-element-aligned index, in one or two 16-byte (8-byte) loads.
__device__ __forceinline__ void load4_vec(const void* p, int dtype, int64_t i, double v[4]) {
  switch (dtype) {
    case kF32: {
      const float4 f = load_vector<float4>(static_cast<const float*>(p) + i);
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
      break;
    }
    case kF64: {
      const double2 a = load_vector<double2>(static_cast<const double*>(p) + i);
      const double2 b = load_vector<double2>(static_cast<const double*>(p) + i + 2);
      v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
      break;
    }
    case kF16: unpack4<c10::Half>(load_vector<uint2>(static_cast<const c10::Half*>(p) + i), v); break;
    default: unpack4<c10::BFloat16>(load_vector<uint2>(static_cast<const c10::BFloat16*>(p) + i), v); break;
  }
}

// The lane's four columns of one row: consecutive (vector path) or lpr apart (scalar path, still
// coalesced across lanes).  Columns at or past c1, and absent tensors, read as zero.
__device__ __forceinline__ void load_lane(const void* p, int dtype, bool vec, int64_t row_base, int64_t col,
                                          int64_t c1, int lane_stride, double v[4]) {
  if (p == nullptr) {
    v[0] = v[1] = v[2] = v[3] = 0.0;
  } else if (vec) {
    if (col < c1) load4_vec(p, dtype, row_base + col, v);
    else v[0] = v[1] = v[2] = v[3] = 0.0;
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int64_t c = col + int64_t(t) * lane_stride;
      v[t] = c < c1 ? to_double(p, dtype, row_base + c) : 0.0;
    }
  }
}

__device__ __forceinline__ double shfl_xor(double v, int offset) { return __shfl_xor_sync(0xffffffffu, v, offset); }

// One element's terms, leaving out those of an absent y / z as the CPU kernels do (moments.h): adding
// x * 0 instead would turn an Inf or NaN of x into a NaN in xy / xz (and of y into one in yz).  hy / hz
// are the same for the whole block, so the branch does not diverge.
__device__ __forceinline__ void accumulate_present(Moments<double>& a, double x, double y, double z, bool hy,
                                                   bool hz) {
  if (hy && hz) accumulate<true, true>(a, x, y, z);
  else if (hy) accumulate<true, false>(a, x, y, z);
  else if (hz) accumulate<false, true>(a, x, y, z);
  else accumulate<false, false>(a, x, y, z);
}

// a.m[m] for a moment index m known only at run time, without indexing the array: a dynamic index would
// move the per-column accumulators of the whole kernel from registers to local memory.
__device__ __forceinline__ double moment_at(const Moments<double>& a, int m) {
  double v = a.m[0];
#pragma unroll
  for (int i = 1; i < kMoments; ++i)
    if (m == i) v = a.m[i];
  return v;
}

template <bool HAS_COL>
__global__ void __launch_bounds__(kThreads) items_kernel(Tables tb) {
  __shared__ double rowbuf[kRowBuf][kMoments];
  __shared__ double colbuf[kTile];

  const int tid = threadIdx.x;
  const ItemRec it = tb.items[tb.item_ids[blockIdx.x]];
  const EntryRec e = tb.entries[it.entry];
  const int64_t* tp = tb.tensors + e.tensor * kTensorFields;
  const void* px = reinterpret_cast<const void*>(tp[0]);
  const void* py = reinterpret_cast<const void*>(tp[1]);
  const void* pz = reinterpret_cast<const void*>(tp[2]);
  const int dx = int(tp[3]), dy = int(tp[4]), dz = int(tp[5]);
  const bool hy = py != nullptr, hz = pz != nullptr;
  const bool vec = tp[6] != 0 && e.L % 4 == 0;
  const bool has_run = it.has_run != 0;

  // Lane geometry: lanes_per_row (a power of two) lanes share a row, groups = rows per pass.
  const int64_t width = it.c1 - it.c0;
  const int64_t quads = (width + kColsPerLane - 1) / kColsPerLane;
  int lpr = 1;
  while (lpr < quads && lpr < kThreads) lpr *= 2;
  const int groups = kThreads / lpr;
  const int g = tid / lpr, lane = tid % lpr;
  const int warps_per_row = lpr > 32 ? lpr / 32 : 1;
  const int rows_per_flush = kRowBuf / (groups * warps_per_row) * groups;  // a multiple of groups
  const int64_t tile = int64_t(kColsPerLane) * lpr;
  const int64_t first_col = vec ? int64_t(lane) * kColsPerLane : lane;
  const int lane_stride = vec ? 1 : lpr;

  for (int64_t s = it.run_slot_begin * kMoments + tid; s < it.run_slot_end * kMoments; s += kThreads)
    tb.slots[s] = 0.0;
  __syncthreads();

  Moments<double> col[kColsPerLane];
  if (HAS_COL)
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) zero(col[t]);

  const int64_t rows = it.r1 - it.r0;
  const int64_t passes = (rows + groups - 1) / groups;
  const int passes_per_flush = rows_per_flush / groups;
  for (int64_t pass0 = 0; pass0 < passes; pass0 += passes_per_flush) {
    const int64_t pass_end = min(passes, pass0 + passes_per_flush);
    for (int64_t pass = pass0; pass < pass_end; ++pass) {
      const int64_t r = it.r0 + pass * groups + g;
      const bool valid = r < it.r1;
      Moments<double> row;
      zero(row);
      if (valid) {
        const int64_t row_base = r * e.L;
        for (int64_t tc = it.c0; tc < it.c1; tc += tile) {  // one tile when HAS_COL
          double x[4], y[4], z[4];
          load_lane(px, dx, vec, row_base, tc + first_col, it.c1, lane_stride, x);
          load_lane(py, dy, vec, row_base, tc + first_col, it.c1, lane_stride, y);
          load_lane(pz, dz, vec, row_base, tc + first_col, it.c1, lane_stride, z);
#pragma unroll
          for (int t = 0; t < kColsPerLane; ++t) {
            if (HAS_COL) accumulate_present(col[t], x[t], y[t], z[t], hy, hz);
            if (has_run) accumulate_present(row, x[t], y[t], z[t], hy, hz);
          }
        }
      }
      if (has_run) {
        // Sum the row over the lanes that share it (aligned groups of min(lpr, 32) lanes of a warp).
        for (int off = min(lpr, 32) / 2; off > 0; off /= 2)
#pragma unroll
          for (int m = 0; m < kMoments; ++m) row.m[m] += shfl_xor(row.m[m], off);
        if (valid && lane % 32 == 0) {
          const int64_t slot = ((pass - pass0) * groups + g) * warps_per_row + lane / 32;
#pragma unroll
          for (int m = 0; m < kMoments; ++m) rowbuf[slot][m] = row.m[m];
        }
      }
    }
    if (!has_run) continue;
    __syncthreads();
    // Fold the buffered rows into the RUN slots.  Each slot is owned by one thread here.
    const int64_t rs = it.r0 + pass0 * groups, re = min(it.r1, it.r0 + pass_end * groups);
    int64_t voff = 0;
    for (int64_t q = it.view_begin; q < it.view_end; ++q) {
      const ViewRec v = tb.views[tb.item_views[q]];
      int64_t k0 = 0;
      const int64_t count = slots_in_item(v, it.r0, it.r1, it.c0, it.c1, &k0);
      int64_t bs = 0, be = 0;
      // The blocks (a, k) of the view among the buffered rows; thread u sums those of one slice.
      const int64_t blocks = v.kind == kRun ? run_blocks(v, rs, re, bs, be) : 0;
      const int64_t distinct = min(blocks, v.K);
      for (int64_t u = tid; u < distinct; u += kThreads) {
        double acc[kMoments] = {};
        for (int64_t b = bs + u; b <= be; b += v.K) {
          const int64_t start = v.row0 + (b / v.K) * v.stride + (b % v.K) * v.period;
          const int64_t ra = max(rs, start), rb = min(re, start + v.period);
          for (int64_t r = ra; r < rb; ++r)
            for (int w = 0; w < warps_per_row; ++w)
              for (int m = 0; m < kMoments; ++m) acc[m] += rowbuf[(r - rs) * warps_per_row + w][m];
        }
        const int64_t idx = ((bs + u) % v.K - k0 + v.K) % v.K;
        double* slot = tb.slots + (it.slot_begin + voff + idx) * kMoments;
        for (int m = 0; m < kMoments; ++m) slot[m] += acc[m];
      }
      voff += count;
    }
    __syncthreads();
  }

  if (HAS_COL) {
    // Per-column sums over the groups (rows of a pass), one moment at a time through shared memory,
    // then each COL view folds B adjacent columns into a slice.
    for (int m = 0; m < kMoments; ++m) {
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kColsPerLane; ++t) {
        const int64_t c = first_col + int64_t(t) * lane_stride;
        if (c < width) colbuf[g * width + c] = moment_at(col[t], m);
      }
      __syncthreads();
      for (int64_t c = tid; c < width; c += kThreads) {
        double s = colbuf[c];
        for (int q = 1; q < groups; ++q) s += colbuf[q * width + c];
        colbuf[c] = s;
      }
      __syncthreads();
      int64_t voff = 0;
      for (int64_t q = it.view_begin; q < it.view_end; ++q) {
        const ViewRec v = tb.views[tb.item_views[q]];
        int64_t k0 = 0;
        const int64_t count = slots_in_item(v, it.r0, it.r1, it.c0, it.c1, &k0);
        if (v.kind == kCol) {
          // Slice k0 + idx: the view's columns [col0 + kB, col0 + (k+1)B) within the item's.
          const int64_t lo = max(it.c0, v.col0), hi = min(it.c1, v.col0 + v.K * v.B);
          for (int64_t idx = tid; idx < count; idx += kThreads) {
            const int64_t ca = max(lo, v.col0 + (k0 + idx) * v.B), cb = min(hi, v.col0 + (k0 + idx + 1) * v.B);
            double s = 0.0;
            for (int64_t c = ca; c < cb; ++c) s += colbuf[c - it.c0];
            tb.slots[(it.slot_begin + voff + idx) * kMoments + m] = s;
          }
        }
        voff += count;
      }
    }
  }
}

__global__ void finalize_kernel(const int64_t* row_ptr, const int64_t* row_slots, int64_t rows,
                                const double* slots, double* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * kMoments) return;
  const int64_t r = i / kMoments, m = i % kMoments;
  double s = 0.0;
  for (int64_t q = row_ptr[r]; q < row_ptr[r + 1]; ++q) s += slots[row_slots[q] * kMoments + m];
  out[i] = s;
}

}  // namespace
}  // namespace nmx
