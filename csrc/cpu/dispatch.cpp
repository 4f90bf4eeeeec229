// Run-time choice of the CPU item kernel: the widest instruction set this processor supports.
#include "kernels.h"

#include <cstdlib>
#include <string>

namespace nmx {
namespace cpu {

namespace {
struct Choice {
  ItemKernel kernel;
  const char* isa;
};

// NMX_CPU_ISA=avx2 or =baseline picks a narrower kernel than the processor allows (the tests run every
// kernel on one machine this way); a wider one than it supports is never taken.
Choice choose() {
  const char* env = std::getenv("NMX_CPU_ISA");
  const std::string want = env ? env : "";
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  if (avx512 && want != "avx2" && want != "baseline") return {avx512::process_item, "avx512"};
  if (avx2 && want != "baseline") return {avx2::process_item, "avx2"};
#endif
  return {base::process_item, "baseline"};
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}
}  // namespace

ItemKernel select_item_kernel() { return choice().kernel; }
const char* item_kernel_isa() { return choice().isa; }

}  // namespace cpu
}  // namespace nmx
