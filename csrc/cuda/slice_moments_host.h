// The host side of slice_moments on CUDA, shared by the GPU (slice_moments_cuda.cu) and the emulated
// (slice_moments_emulated.cpp) back ends: the plan, the tables the kernels read, this call's pointer
// table and the launch sequence.  What differs is a small Backend, which provides
//   at::Device device();                                   where tables, slots and the output live
//   TableBlob tables(const std::shared_ptr<const Plan>&);  the plan's tables on that device
//   at::Tensor pointer_table(int64_t rows);                a host int64 [rows, kTensorFields] to fill
//   at::Tensor upload(const at::Tensor& host);             that table on the device
//   void launch(kernel, unsigned grid, unsigned block, args...);
// Include after slice_moments_kernels.cuh.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "../ops.h"
#include "../plan.h"
#include "slice_moments_kernels.cuh"

namespace nmx {
namespace {

// Many items keep every multiprocessor busy; items with COL views are at least 256 rows tall so that
// their per-column slots cost under 3% of the bytes read.
constexpr PlanConfig kGpuPlanConfig{/*col_width=*/kTile, /*run_width=*/65536, /*item_elems=*/65536,
                                    /*col_min_rows=*/256};
static_assert(kTile == 1024, "PlanConfig.col_width must equal the kernel's tile");

// A plan's tables in one int64 tensor: entries | views | items | item views | col item ids | run item ids |
// row_ptr | row_slots, with the offset of each part.
struct TableBlob {
  at::Tensor blob;
  int64_t entries = 0, views = 0, items = 0, item_views = 0, col_ids = 0, run_ids = 0, row_ptr = 0, row_slots = 0;
  int64_t num_col = 0, num_run = 0;
};

template <typename T>
void append(std::vector<int64_t>& blob, const std::vector<T>& v) {
  static_assert(sizeof(T) % sizeof(int64_t) == 0, "records are int64 only");
  const int64_t* p = reinterpret_cast<const int64_t*>(v.data());
  blob.insert(blob.end(), p, p + v.size() * (sizeof(T) / sizeof(int64_t)));
}

TableBlob make_tables(const Plan& plan, const at::Device& device) {
  TableBlob t;
  std::vector<int64_t> blob, col_ids, run_ids;
  for (size_t i = 0; i < plan.items.size(); ++i)
    (plan.items[i].has_col ? col_ids : run_ids).push_back(static_cast<int64_t>(i));
  t.entries = blob.size(), append(blob, plan.entries);
  t.views = blob.size(), append(blob, plan.views);
  t.items = blob.size(), append(blob, plan.items);
  t.item_views = blob.size(), blob.insert(blob.end(), plan.item_views.begin(), plan.item_views.end());
  t.col_ids = blob.size(), blob.insert(blob.end(), col_ids.begin(), col_ids.end());
  t.run_ids = blob.size(), blob.insert(blob.end(), run_ids.begin(), run_ids.end());
  t.row_ptr = blob.size(), blob.insert(blob.end(), plan.row_ptr.begin(), plan.row_ptr.end());
  t.row_slots = blob.size(), blob.insert(blob.end(), plan.row_slots.begin(), plan.row_slots.end());
  t.num_col = static_cast<int64_t>(col_ids.size());
  t.num_run = static_cast<int64_t>(run_ids.size());
  t.blob = at::tensor(blob, at::TensorOptions().dtype(at::kLong)).to(device);
  return t;
}

// Whether the kernels may use vector loads on p (load4_vec: 16 bytes for float and double, 8 for 16-bit).
bool aligned(const void* p, int dtype) {
  const int64_t bytes = dtype == kF64 ? 16 : dtype == kF32 ? 16 : 8;
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <class Backend>
at::Tensor run_slice_moments(Backend& backend, const Call& call) {
  const at::Device device = backend.device();
  std::shared_ptr<const Plan> plan = get_plan(call.numels, call.views, kGpuPlanConfig);
  const TableBlob tables = backend.tables(plan);

  at::Tensor host = backend.pointer_table(static_cast<int64_t>(call.tensors.size()));
  int64_t* h = host.data_ptr<int64_t>();
  for (size_t i = 0; i < call.tensors.size(); ++i) {
    const TensorPtrs& p = call.tensors[i];
    int64_t* row = h + i * kTensorFields;
    row[0] = reinterpret_cast<int64_t>(p.x), row[1] = reinterpret_cast<int64_t>(p.y);
    row[2] = reinterpret_cast<int64_t>(p.z);
    row[3] = p.dx, row[4] = p.dy, row[5] = p.dz;
    row[6] = aligned(p.x, p.dx) && aligned(p.y, p.dy) && aligned(p.z, p.dz) && aligned(p.v, p.dv) &&
             aligned(p.vmax, p.dvmax);
    row[kModeField] = p.mode;
    row[kModeField + 1] = reinterpret_cast<int64_t>(p.v), row[kModeField + 2] = reinterpret_cast<int64_t>(p.vmax);
    row[kModeField + 3] = p.dv, row[kModeField + 4] = p.dvmax;
    row[kModeField + 5] = stream_in_double(p);
    std::fill(row + kCoefField, row + kTensorFields, int64_t(0));
    std::memcpy(row + kCoefField, &p.coef, sizeof p.coef);
  }
  at::Tensor tensors = backend.upload(host);

  const auto dbl = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor slots = at::empty({std::max<int64_t>(plan->num_slots, 1), kMoments}, dbl);
  at::Tensor out = at::empty({plan->num_rows, kMoments}, dbl);
  const int64_t* blob = tables.blob.data_ptr<int64_t>();
  Tables tb{reinterpret_cast<const EntryRec*>(blob + tables.entries),
            reinterpret_cast<const ViewRec*>(blob + tables.views),
            reinterpret_cast<const ItemRec*>(blob + tables.items), blob + tables.item_views, nullptr, 0, tensors.data_ptr<int64_t>(),
            slots.data_ptr<double>()};
  // A call is in one mode: every tensor of it, or none, is in a stream mode.
  const bool stream = call.tensors[0].mode != kStreamPlain;
  if (tables.num_col > 0) {
    tb.item_ids = blob + tables.col_ids, tb.num_items = tables.num_col;
    backend.launch(stream ? items_kernel<true, true> : items_kernel<true, false>,
                   static_cast<unsigned>(tables.num_col), kThreads, tb);
  }
  if (tables.num_run > 0) {
    tb.item_ids = blob + tables.run_ids, tb.num_items = tables.num_run;
    backend.launch(stream ? items_kernel<false, true> : items_kernel<false, false>,
                   static_cast<unsigned>(tables.num_run), kThreads, tb);
  }
  const int64_t n = plan->num_rows * kMoments;
  if (n > 0) {
    backend.launch(finalize_kernel, static_cast<unsigned>((n + 255) / 256), 256, blob + tables.row_ptr,
                   blob + tables.row_slots, plan->num_rows, static_cast<const double*>(slots.data_ptr<double>()),
                   out.data_ptr<double>());
  }
  return out;
}

}  // namespace
}  // namespace nmx
