// slice_moments on the CPU: items in parallel (OpenMP, dynamic schedule: items differ in size), then
// every output row sums its slots in the plan's fixed order.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include "../moments.h"
#include "../ops.h"
#include "../plan.h"
#include "kernels.h"

namespace nmx {

at::Tensor slice_moments_cpu(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                             at::IntArrayRef views) {
  Call call = prepare_call(xs, ys, zs, views);
  // Items of about a million elements (a few MB: a thread's share of the L2/L3 traffic stays simple);
  // 1024-column items with COL views keep the per-column sums (72 KB) in L2.
  static const PlanConfig config{/*col_width=*/1024, /*run_width=*/int64_t(1) << 20,
                                 /*item_elems=*/int64_t(1) << 20, /*col_min_rows=*/4};
  std::shared_ptr<const Plan> plan = get_plan(call.numels, call.views, config);
  const Plan& p = *plan;

  at::Tensor slots = at::empty({p.num_slots, kMoments}, at::TensorOptions().dtype(at::kDouble));
  double* slot_data = slots.data_ptr<double>();
  const cpu::ItemKernel kernel = cpu::select_item_kernel();
  const int64_t num_items = static_cast<int64_t>(p.items.size());
  const cpu::TensorPtrs* tensors = call.tensors.data();
#ifdef _OPENMP
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), num_items));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
  for (int64_t i = 0; i < num_items; ++i) kernel(p, i, tensors, slot_data);

  at::Tensor out = at::empty({p.num_rows, kMoments}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  at::parallel_for(0, p.num_rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double acc[kMoments] = {};
      for (int64_t s = p.row_ptr[r]; s < p.row_ptr[r + 1]; ++s)
        for (int m = 0; m < kMoments; ++m) acc[m] += slot_data[p.row_slots[s] * kMoments + m];
      for (int m = 0; m < kMoments; ++m) o[r * kMoments + m] = acc[m];
    }
  });
  return out;
}

}  // namespace nmx
