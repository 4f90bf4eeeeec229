// slice_moments on the CPU: items in parallel (OpenMP, dynamic schedule: items differ in size), then
// every output row sums its slots in the plan's fixed order.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "../moments.h"
#include "../ops.h"
#include "../plan.h"
#include "kernels.h"

namespace nmx {

namespace {

// Any prepared call: slice_moments' or a stream mode's.
at::Tensor run_cpu(const Call& call) {
  // Items of about a million elements.  Items with COL views are at most 2048 columns wide, so that
  // their column sums (72 bytes per column) stay in L2: full rows of vgg16_bn's 25088-wide classifier
  // put 1.8 MB of them in the shared L3, which ran slower and varied with the neighbours' load.  The
  // rows of such a tile are short, so the kernel prefetches the next rows itself (kernel_impl.h).
  // They are at least 256 rows tall (slots under 3% of the bytes read).  RUN-only items are whole
  // rows wide: a few long sequential streams that the hardware prefetchers follow.
  static const PlanConfig config{/*col_width=*/2048, /*run_width=*/int64_t(1) << 20,
                                 /*item_elems=*/int64_t(1) << 20, /*col_min_rows=*/256};
  std::shared_ptr<const Plan> plan = get_plan(call.numels, call.views, config);
  const Plan& p = *plan;

  at::Tensor slots = at::empty({p.num_slots, kMoments}, at::TensorOptions().dtype(at::kDouble));
  double* slot_data = slots.data_ptr<double>();
  const cpu::ItemKernel kernel = cpu::select_item_kernel();
  const int64_t num_items = static_cast<int64_t>(p.items.size());
  const TensorPtrs* tensors = call.tensors.data();
#ifdef _OPENMP
  // A thread per half a million elements at most: a parallel region costs microseconds on an idle
  // machine but a scheduler time slice (milliseconds) when another process holds a core, which
  // small calls (a small model, one bucket of the backward hook) must not pay.
  int64_t work = 0;
  for (int64_t n : call.numels) work += n;
  const int threads = static_cast<int>(
      std::min<int64_t>({int64_t(at::get_num_threads()), num_items, std::max<int64_t>(1, work >> 19)}));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
  for (int64_t i = 0; i < num_items; ++i) kernel(p, i, tensors, slot_data);

  at::Tensor out = at::empty({p.num_rows, kMoments}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  // Summing slots into rows is light (a few doubles per row): threads only for very many rows, or the
  // parallel region costs more than the work (a lone 1-D parameter of 77k slices spent most of its time
  // waking threads with a grain of 16k rows).
  at::parallel_for(0, p.num_rows, int64_t(1) << 17, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double acc[kMoments] = {};
      for (int64_t s = p.row_ptr[r]; s < p.row_ptr[r + 1]; ++s)
        for (int m = 0; m < kMoments; ++m) acc[m] += slot_data[p.row_slots[s] * kMoments + m];
      for (int m = 0; m < kMoments; ++m) o[r * kMoments + m] = acc[m];
    }
  });
  return out;
}

}  // namespace

at::Tensor slice_moments_cpu(at::TensorList xs, const OptionalTensorList& ys, const OptionalTensorList& zs,
                             at::IntArrayRef views) {
  return run_cpu(prepare_call(xs, ys, zs, views));
}

at::Tensor adam_moments_cpu(at::TensorList params, at::TensorList grads, const OptionalTensorList& exp_avgs,
                            const OptionalTensorList& exp_avg_sqs, const OptionalTensorList& max_exp_avg_sqs,
                            at::IntArrayRef views, at::ArrayRef<double> scalars) {
  return run_cpu(prepare_stream_call(kStreamAdam, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, views,
                                     scalars));
}

at::Tensor lion_moments_cpu(at::TensorList params, at::TensorList grads, const OptionalTensorList& exp_avgs,
                            at::IntArrayRef views, at::ArrayRef<double> scalars) {
  return run_cpu(prepare_stream_call(kStreamLion, params, grads, exp_avgs, OptionalTensorList(),
                                     OptionalTensorList(), views, scalars));
}

}  // namespace nmx

TORCH_LIBRARY_IMPL(neural_mechanics_ext, CPU, m) {
  m.impl("slice_moments", &nmx::slice_moments_cpu);
  m.impl("adam_moments", &nmx::adam_moments_cpu);
  m.impl("lion_moments", &nmx::lion_moments_cpu);
}
