// The CPU item kernel compiled for AVX2 (chosen at run time by select_item_kernel()).
#include "kernel_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

#define NMX_ISA avx2
#if defined(__x86_64__)
#define NMX_ISA_LEVEL 1
#else
#define NMX_ISA_LEVEL 0  // other processors: the baseline code under this name
#endif
#include "kernel_impl.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif
