// The fused stream modes of the moments kernels (THEORY_ADAPTIVE.md §1): the per-element update
// direction of Adam/AdamW and Lion, formed from the tensors the optimizer step reads as they are loaded
// (in registers, on the GPU a value at a time, on the CPU a vector of them inside the reduction loops),
// written once for every backend (CPU, CUDA, the CUDA kernels' host emulation).
//
//   kStreamPlain  (x, y, z) as given (slice_moments)
//   kStreamAdam   reads θ, g, m = exp_avg, v = exp_avg_sq (and v_max = max_exp_avg_sq with amsgrad):
//                   g̃ = ±g (+ λθ when the decay is coupled, after the sign flip, as torch does)
//                   m' = lerp(m, g̃, 1 − β₁)        v' = β₂v + (1 − β₂)g̃²       v̂ = max(v_max, v') or v'
//                   D = sqrt(v̂)/sqrt(bc₂) + ε       u = (m'/D)/bc₁
//                 and emits (x, y, z) = (θ, m', u)
//   kStreamLion   reads θ, g, m = exp_avg:  c = β₁m + (1 − β₁)g;  emits (θ, c, sign c)   (lion-pytorch)
//
// The arithmetic is in F = float when every input is float32 or 16-bit, and in double when any is float64:
// the precision torch's own step computes in for float32 and float64 parameters, in torch's order of
// operations (lerp's two-sided formula, maximum and sign with torch's NaN rules), so u agrees with the
// optimizer's to a few ulps of F.  (Two differences, both within an ulp: 1/sqrt(bc₂) and 1/bc₁ are
// multiplied, not divided; a compiler may contract a product and a sum into one fma.  For 16-bit
// parameters torch rounds every intermediate to 16 bits; here they stay float.)  An absent m, v or v_max
// (a fresh optimizer) is zero.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#include "moments.h"

namespace nmx {

enum StreamMode : int { kStreamPlain = 0, kStreamAdam = 1, kStreamLion = 2 };

// The op's per-tensor scalars, in this order (ops.py's ADAM_SCALARS / LION_SCALARS).
enum AdamScalar : int { kBeta1 = 0, kBeta2, kEps, kBc1, kBc2, kL2, kMaximize, kAdamScalars };
constexpr int kLionScalars = 1;  // β₁

// The step's constants in the arithmetic's precision, from the op's double scalars.  The weights
// 1 − β are formed in double and then rounded, as torch forms them in Python before a float kernel.
template <typename F>
struct StreamCoef {
  F w1, b1, b2, w2, eps, inv_bc1, inv_sqrt_bc2, l2, sign;
  bool coupled, lerp_low;

  C10_HOST_DEVICE static StreamCoef make(const double* s, int mode) {
    StreamCoef c{};
    c.b1 = F(s[kBeta1]);
    c.w1 = F(1.0 - s[kBeta1]);
    c.lerp_low = 1.0 - s[kBeta1] < 0.5;  // which side torch's lerp computes from
    if (mode == kStreamAdam) {
      c.b2 = F(s[kBeta2]);
      c.w2 = F(1.0 - s[kBeta2]);
      c.eps = F(s[kEps]);
      c.inv_bc1 = F(1.0 / s[kBc1]);
      c.inv_sqrt_bc2 = F(1.0 / ::sqrt(s[kBc2]));
      c.l2 = F(s[kL2]);
      c.coupled = s[kL2] != 0.0;
      c.sign = s[kMaximize] != 0.0 ? F(-1) : F(1);
    }
    return c;
  }

  // The same constants in another precision (make<double> then from<float> equals make<float>).
  template <typename G>
  C10_HOST_DEVICE static StreamCoef from(const StreamCoef<G>& o) {
    return StreamCoef{F(o.w1), F(o.b1), F(o.b2), F(o.w2), F(o.eps), F(o.inv_bc1), F(o.inv_sqrt_bc2), F(o.l2),
                      F(o.sign), o.coupled, o.lerp_low};
  }
};

C10_HOST_DEVICE NMX_INLINE float root(float v) { return ::sqrtf(v); }
C10_HOST_DEVICE NMX_INLINE double root(double v) { return ::sqrt(v); }

// Adam in two halves around the square root, for one element, or (CPU) for a vector V of elements of
// type F, element by element (the CPU kernels take the square root of a vector with their instruction
// set's own instruction).  AMS: v_max is read (amsgrad with state).  m, v = 0 for a fresh optimizer.
// (Always inlined, branch-free apart from the step's flags, the same for every element of a tensor.)
// First half: p = m' and v̂.
template <bool AMS, typename F, typename V>
C10_HOST_DEVICE NMX_INLINE void adam_moments_of_step(V theta, V g, V m, V v, V vmax, const StreamCoef<F>& c, V& p,
                                                     V& vh) {
  V gt = c.sign * g;  // exact: maximize flips the sign
  if (c.coupled) gt = gt + c.l2 * theta;
  const V d = gt - m;
  if (c.lerp_low) p = m + c.w1 * d;  // torch.lerp(m, g̃, w1)
  else p = gt - d * (F(1) - c.w1);
  const V v1 = v * c.b2 + c.w2 * gt * gt;
  // torch.maximum: NaN wins.  (| and ?: also work element-wise on GCC vectors.)
  vh = AMS ? ((v1 > vmax) | (v1 != v1) ? v1 : vmax) : v1;
}

// Second half: u from p and sqrt(v̂).
template <typename F, typename V>
C10_HOST_DEVICE NMX_INLINE V adam_direction_of(V p, V root_vh, const StreamCoef<F>& c) {
  const V D = root_vh * c.inv_sqrt_bc2 + c.eps;
  return p / D * c.inv_bc1;
}

// Adam's (p, u) = (m', u) for one element.
template <bool AMS, typename F>
C10_HOST_DEVICE NMX_INLINE void adam_direction(F theta, F g, F m, F v, F vmax, const StreamCoef<F>& c, F& p, F& u) {
  F vh;
  adam_moments_of_step<AMS>(theta, g, m, v, vmax, c, p, vh);
  u = adam_direction_of(p, root(vh), c);
}

// Lion's (p, u) = (c, sign c) for one element (or a vector V of them); sign as torch's (NaN gives 0).
template <typename F, typename V>
C10_HOST_DEVICE NMX_INLINE void lion_direction(V g, V m, const StreamCoef<F>& c, V& p, V& u) {
  p = m * c.b1 + c.w1 * g;
  const V zero = V{}, one = V{} + F(1);
  u = (p > zero ? one : zero) - (p < zero ? one : zero);
}

}  // namespace nmx
