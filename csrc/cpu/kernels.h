// CPU item kernels.  kernel_impl.h is compiled three times (kernel_avx512.cpp, kernel_avx2.cpp,
// kernel_base.cpp), each in its own namespace and for its own instruction set; select_item_kernel()
// picks the best one this processor runs.  No torch headers here: they must not be compiled with
// wider instruction sets than the rest of the library.
#pragma once

#include <cstdint>

#include "../kernel_types.h"
#include "../plan.h"

namespace nmx {
namespace cpu {

// Computes item `item` of `plan` and writes its slots: slots[(slot) * 9 + moment].
using ItemKernel = void (*)(const Plan& plan, int64_t item, const TensorPtrs* tensors, double* slots);

namespace avx512 { void process_item(const Plan&, int64_t, const TensorPtrs*, double*); }
namespace avx2 { void process_item(const Plan&, int64_t, const TensorPtrs*, double*); }
namespace base { void process_item(const Plan&, int64_t, const TensorPtrs*, double*); }

ItemKernel select_item_kernel();
const char* item_kernel_isa();

}  // namespace cpu
}  // namespace nmx
