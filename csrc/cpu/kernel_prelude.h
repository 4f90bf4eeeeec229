// Everything the per-instruction-set kernels include, included BEFORE the target pragma so that no
// header code is compiled for a wider instruction set than the machine may have.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../moments.h"
#include "../plan.h"
#include "kernels.h"
