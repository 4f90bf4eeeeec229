"""Plain-torch twins of the compiled ops: the oracle of the tests and the fallback when ``_C`` is missing.

Everything here is written for clarity, not speed: every input is upcast to float64 and each view is
reduced with ordinary torch reductions.  The compiled kernels must agree with these functions.
"""
from __future__ import annotations

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
