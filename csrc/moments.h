// The per-element arithmetic of slice_moments, written once for both backends.
//
// `V` is `double` in the CUDA kernels and in scalar CPU tails, and a GCC/Clang vector of doubles in
// the vectorised CPU loops; the same expressions serve both.  Accumulation is always in double.
#pragma once

#include <c10/macros/Macros.h>

// Always inlined: the CPU kernels are compiled once per instruction set (cpu/kernel_*.cpp), and these
// helpers must become part of each of them rather than exist as one shared out-of-line copy.
#if defined(__CUDACC__)
#define NMX_INLINE __forceinline__
#else
#define NMX_INLINE inline __attribute__((always_inline))
#endif

namespace nmx {

constexpr int kMoments = 9;  // x, y, z, xx, yy, zz, xy, xz, yz (the order of nmx.MOMENTS)

template <typename V>
struct Moments {
  V m[kMoments];
};

template <typename V>
C10_HOST_DEVICE NMX_INLINE void zero(Moments<V>& a) {
#pragma unroll
  for (int i = 0; i < kMoments; ++i) a.m[i] = V{};
}

// Add one element's contribution.  HY / HZ say whether y / z exist: an absent tensor counts as zeros,
// so its terms are skipped rather than computed with zeros.
template <bool HY, bool HZ, typename V>
C10_HOST_DEVICE NMX_INLINE void accumulate(Moments<V>& a, V x, V y, V z) {
  a.m[0] += x;
  a.m[3] += x * x;
  if (HY) {
    a.m[1] += y;
    a.m[4] += y * y;
    a.m[6] += x * y;
  }
  if (HZ) {
    a.m[2] += z;
    a.m[5] += z * z;
    a.m[7] += x * z;
  }
  if (HY && HZ) a.m[8] += y * z;
}

template <typename V>
C10_HOST_DEVICE NMX_INLINE void add_to(Moments<V>& a, const Moments<V>& b) {
#pragma unroll
  for (int i = 0; i < kMoments; ++i) a.m[i] += b.m[i];
}

}  // namespace nmx
