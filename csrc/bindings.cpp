// The Python module neural_mechanics_ext._C: build_info(), and the test-only entry point of the
// emulated CUDA kernels.  (The op itself is registered with the dispatcher: ops.cpp and the backends.)
#include <pybind11/stl.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "ops.h"
#include "plan.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef NMX_WITH_CUDA
  info["cuda"] = true;
  info["cuda_arch"] = pybind11::str(NMX_CUDA_ARCHS).attr("split")();
#else
  info["cuda"] = false;
  info["cuda_arch"] = pybind11::list();
#endif
#ifdef NMX_WITH_CUDA_EMULATION
  info["cuda_emulated"] = true;
#else
  info["cuda_emulated"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch"] = TORCH_VERSION;
  info["cpu_isa"] = nmx::cpu::item_kernel_isa();
  return info;
}

#ifdef NMX_WITH_CUDA_EMULATION
at::Tensor slice_moments_cuda_emulated(const std::vector<at::Tensor>& xs,
                                       const std::vector<std::optional<at::Tensor>>& ys,
                                       const std::vector<std::optional<at::Tensor>>& zs,
                                       const std::vector<int64_t>& views, uint64_t schedule_seed) {
  nmx::OptionalTensorList y, z;
  for (const auto& t : ys) y.push_back(t);
  for (const auto& t : zs) z.push_back(t);
  return nmx::slice_moments_cuda_emulated(xs, y, z, views, schedule_seed);
}

// adam_moments (mode 1) or lion_moments (mode 2) on the emulated CUDA kernels.
at::Tensor stream_moments_cuda_emulated(int mode, const std::vector<at::Tensor>& params,
                                        const std::vector<at::Tensor>& grads,
                                        const std::vector<std::optional<at::Tensor>>& exp_avgs,
                                        const std::vector<std::optional<at::Tensor>>& exp_avg_sqs,
                                        const std::vector<std::optional<at::Tensor>>& max_exp_avg_sqs,
                                        const std::vector<int64_t>& views, const std::vector<double>& scalars,
                                        uint64_t schedule_seed) {
  TORCH_CHECK_VALUE(mode == nmx::kStreamAdam || mode == nmx::kStreamLion, "stream_moments_cuda_emulated: mode ",
                    mode, " is not a stream mode");
  nmx::OptionalTensorList m, v, vmax;
  for (const auto& t : exp_avgs) m.push_back(t);
  for (const auto& t : exp_avg_sqs) v.push_back(t);
  for (const auto& t : max_exp_avg_sqs) vmax.push_back(t);
  return nmx::run_cuda_emulated(nmx::prepare_stream_call(mode, params, grads, m, v, vmax, views, scalars),
                                schedule_seed);
}
#endif

// Test only: how the planner reads the tensors of a call (views_flat as the op takes it, unchecked):
// entries (tensor, R, L), views (kind "col"/"run", first output row), and the elements its items read.
pybind11::dict plan_summary(const std::vector<int64_t>& numels, const std::vector<int64_t>& views_flat) {
  const nmx::PlanConfig config{2048, int64_t(1) << 20, int64_t(1) << 20, 256};  // the CPU's (layouts do not depend on it)
  const auto plan = nmx::get_plan(numels, views_flat, config);
  pybind11::list entries, views;
  for (const auto& e : plan->entries) entries.append(pybind11::make_tuple(e.tensor, e.R, e.L));
  for (const auto& v : plan->views) views.append(pybind11::make_tuple(v.kind == nmx::kCol ? "col" : "run", v.out_row));
  int64_t read = 0;
  for (const auto& it : plan->items) read += (it.r1 - it.r0) * (it.c1 - it.c0);
  pybind11::dict out;
  out["entries"] = entries;
  out["views"] = views;
  out["elements_read"] = read;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neural_mechanics_ext compiled kernels (ops are registered in torch.ops.neural_mechanics_ext)";
  m.def("build_info", &build_info, "How the compiled extension was built");
  m.def("plan_summary", &plan_summary, "Test only: the entries, views and elements read of a call's plan",
        pybind11::arg("numels"), pybind11::arg("views"));
#ifdef NMX_WITH_CUDA_EMULATION
  m.def("slice_moments_cuda_emulated", &slice_moments_cuda_emulated,
        "Test only: slice_moments' CUDA kernels on the host SIMT emulation (CPU tensors, flat views)",
        pybind11::arg("xs"), pybind11::arg("ys"), pybind11::arg("zs"), pybind11::arg("views"),
        pybind11::arg("schedule_seed"));
  m.def("stream_moments_cuda_emulated", &stream_moments_cuda_emulated,
        "Test only: adam_moments (mode 1) / lion_moments (mode 2) on the emulated CUDA kernels",
        pybind11::arg("mode"), pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("exp_avgs"),
        pybind11::arg("exp_avg_sqs"), pybind11::arg("max_exp_avg_sqs"), pybind11::arg("views"),
        pybind11::arg("scalars"), pybind11::arg("schedule_seed"));
  m.def("cuda_emulation_selftest", &nmx::cuda_emulation_selftest,
        "Test only: one of the emulation's own test kernels, by name", pybind11::arg("kernel"),
        pybind11::arg("schedule_seed"));
#endif
}
