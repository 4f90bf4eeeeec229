"""Plain-torch twins of the compiled ops: the oracle of the tests and the fallback when ``_C`` is missing.

Everything here is written for clarity, not speed: every input is upcast to float64 and each view is
reduced with ordinary torch reductions.  The compiled kernels must agree with these functions.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .views import strided

def slice_moments_reference(
    xs: Sequence[torch.Tensor],
    ys: Sequence[Optional[torch.Tensor]],
    zs: Sequence[Optional[torch.Tensor]],
    view_table: Sequence[int],
) -> torch.Tensor:
    """Per-slice moments, computed the obvious way.

    ``view_table`` is the flat form used by the op: 6-tuples ``(tensor_index, A, K, B, offset, a_stride)``
    ordered by tensor index (slice k of a view: flat elements ``offset + a*a_stride + k*B + b``).  ``ys``/``zs`` are empty (absent) or hold one tensor or ``None`` per ``xs`` entry;
    whatever is absent counts as zeros, and a moment with an absent factor is exactly 0
    (not NaN where x is NaN).  Inputs are assumed valid (see ``ops._check_inputs``).
    """
    device = xs[0].device if len(xs) else torch.device("cpu")
    rows, flat, flat_of = [], None, None
    for v in range(0, len(view_table), 6):
        i, a, k, b, offset, a_stride = view_table[v : v + 6]
        if flat_of != i:  # upcast each tensor once, whatever the number of its views
            flat_of = i
            flat = [None if t is None else t.detach().reshape(-1).to(torch.float64)
                    for t in (xs[i], _entry(ys, i), _entry(zs, i))]
        x, y, z = (None if t is None else strided(t, (a, k, b, offset, a_stride)) for t in flat)
        zero = torch.zeros(a, k, b, dtype=torch.float64, device=device)
        # A moment with an absent factor is exactly 0, also where x is NaN or Inf (not NaN * 0).
        def prod(p, q):
            return zero if p is None or q is None else p * q

        cols = [x, zero if y is None else y, zero if z is None else z,
                x * x, prod(y, y), prod(z, z), prod(x, y), prod(x, z), prod(y, z)]
        rows.append(torch.stack([c.sum(dim=(0, 2)) for c in cols], dim=1))
    if not rows:
        return torch.zeros((0, 9), dtype=torch.float64, device=device)
    return torch.cat(rows, dim=0)


def _entry(ts, i):
    return ts[i] if len(ts) else None


def adam_moments_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, view_table, scalars):
    """``adam_moments``: the moments of (θ, p, u) with (p, u) from :func:`adam_streams`."""
    ps, us = adam_streams(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars)
    return slice_moments_reference(params, ps, us, view_table)


def lion_moments_reference(params, grads, exp_avgs, view_table, scalars):
    """``lion_moments``: the moments of (θ, c, sign c) with (c, sign c) from :func:`lion_streams`."""
    ps, us = lion_streams(params, grads, exp_avgs, scalars)
    return slice_moments_reference(params, ps, us, view_table)


def adam_streams(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars):
    """Adam's (p, u) = (m', u) per parameter, with torch ops (csrc/stream_modes.h's formula).

    ``scalars`` holds per tensor (β₁, β₂, ε, bc₁, bc₂, coupled λ, maximize) (ops.ADAM_SCALARS); the state
    lists are empty or hold a tensor or ``None`` per parameter (``None``: zeros).  The arithmetic is in
    float64 when any input of a tensor is, else float32, as in the kernels."""
    ps, us = [], []
    for i, theta in enumerate(params):
        b1, b2, eps, bc1, bc2, l2, maximize = scalars[7 * i: 7 * i + 7]
        m, v, vmax = _entry(exp_avgs, i), _entry(exp_avg_sqs, i), _entry(max_exp_avg_sqs, i)
        dtype = _math_dtype(theta, grads[i], m, v, vmax)
        th, g = theta.detach().to(dtype), grads[i].detach().to(dtype)
        g = -g if maximize else g
        if l2 != 0.0:
            g = g.add(th, alpha=l2)
        zero = torch.zeros_like(th)
        m, v = (zero if t is None else t.detach().to(dtype) for t in (m, v))
        p = torch.lerp(m, g, 1.0 - b1)
        v1 = (v * b2).addcmul_(g, g, value=1.0 - b2)
        if vmax is not None:
            v1 = torch.maximum(vmax.detach().to(dtype), v1)
        denom = v1.sqrt().mul_(1.0 / math.sqrt(bc2)).add_(eps)
        ps.append(p)
        us.append((p / denom).mul_(1.0 / bc1))
    return ps, us


def lion_streams(params, grads, exp_avgs, scalars):
    """Lion's (c, sign c) per parameter, c = β₁m + (1 − β₁)g, with torch ops (``None`` or absent m: zeros)."""
    ps, us = [], []
    for i, theta in enumerate(params):
        m = _entry(exp_avgs, i)
        dtype = _math_dtype(theta, grads[i], m)
        g = grads[i].detach().to(dtype)
        m = torch.zeros_like(g) if m is None else m.detach().to(dtype)
        c = (m * scalars[i]).add_(g, alpha=1.0 - scalars[i])
        ps.append(c)
        us.append(torch.sign(c))
    return ps, us


def _math_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
