// Run-time choice of the CPU item kernel: the widest instruction set this processor supports.
#include "kernels.h"

namespace nmx {
namespace cpu {

namespace {
struct Choice {
  ItemKernel kernel;
  const char* isa;
};

Choice choose() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return {avx512::process_item, "avx512"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {avx2::process_item, "avx2"};
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
