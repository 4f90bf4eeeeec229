// The CPU item kernel compiled for AVX512 (chosen at run time by select_item_kernel()).
#include "kernel_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c,bmi2")
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c,bmi2"))), apply_to = function)
#endif

#define NMX_ISA avx512
#if defined(__x86_64__)
#define NMX_ISA_LEVEL 2
#else
#define NMX_ISA_LEVEL 0  // other processors: the baseline code under this name
#endif
#include "kernel_impl.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif
