"""Views fitted to group maps: which elements of a parameter belong to which group, as views.

A map labels every element of a parameter with its group (``-1``: none).  :func:`fit_view` finds the one
``(A, K, B)`` view of the whole tensor whose slice ``k`` is group ``k``; :func:`partial_views` the
``(A, K, B, offset, a_stride)`` views of the part a block of groups touches (the Q and K column blocks of a
fused projection, the rows of one kv head, the o_proj columns of every query head sharing it), several per
parameter where one strided rectangle does not cover it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ...views import Full

NEAR = 64       # candidate strides for a progression: the distances to this many next run starts


def fit_view(cmap: torch.Tensor, k: int) -> Optional[Tuple[int, int, int]]:
    """The ``(A, K, B)`` view whose slice ``j`` is exactly the elements labelled ``j`` (or None)."""
    flat = cmap.reshape(-1)
    n = flat.numel()
    if n == 0 or k <= 0 or bool((flat < 0).any()) or n % k:
        return None
    if k == 1:
        return (1, 1, n) if bool((flat == 0).all()) else None
    nz = (flat != flat[0]).nonzero()
    b = int(nz[0]) if len(nz) else n
    if flat[0] != 0 or b == 0 or n % (k * b):
        return None
    a = n // (k * b)
    ok = torch.equal(flat.view(a, k, b), torch.arange(k, dtype=flat.dtype).view(1, k, 1).expand(a, k, b))
    return (a, k, b) if ok else None


def elements_by_group(gmap: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Sorted flat indices of each group present in a flat map."""
    idx = (gmap >= 0).nonzero().view(-1)
    if idx.numel() == 0:
        return {}
    order = torch.argsort(gmap[idx], stable=True)
    idx = idx[order]
    groups, counts = torch.unique_consecutive(gmap[idx], return_counts=True)
    return dict(zip(groups.tolist(), idx.split(counts.tolist())))


def partial_views(by_group: Dict[int, torch.Tensor], block: Sequence[int]) -> Optional[List[Full]]:
    """Views (each with ``len(block)`` slices) whose slice ``j`` holds exactly the elements of group
    ``block[j]``, or None.  Slice ``j`` of a view is slice 0 moved by ``j*B``, in runs of ``B``."""
    sets = [by_group.get(g) for g in block]
    if any(s is None for s in sets) or len({len(s) for s in sets}) != 1:
        return None
    k, first = len(block), sets[0]
    if k > 1:
        b = int(sets[1][0] - first[0])
        if b <= 0 or any(not torch.equal(s, first + j * b) for j, s in enumerate(sets)):
            return None
    else:
        breaks = ((first[1:] - first[:-1]) != 1).nonzero().view(-1) + 1
        bounds = [0] + breaks.tolist() + [len(first)]
        b = math.gcd(*[hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])])
    if len(first) % b:
        return None
    runs = first.view(-1, b)
    if not bool((runs - runs[:, :1] == torch.arange(b)).all()):
        return None
    return [(a, k, b, off, stride) for off, a, stride in _progressions(runs[:, 0].tolist(), k * b)]


def _progressions(starts: List[int], min_stride: int) -> List[Tuple[int, int, int]]:
    """Cover sorted ``starts`` with arithmetic progressions ``(first, length, stride ≥ min_stride)``,
    greedily taking the longest from the smallest start left (the rows of a column block come out as one
    progression, not one per row)."""
    left, out, pos = set(starts), [], 0
    while left:
        while starts[pos] not in left:
            pos += 1
        t0 = starts[pos]
        best = (1, min_stride)
        near = [x for x in starts[pos + 1:pos + 1 + NEAR] if x in left and x - t0 >= min_stride]
        for s in {x - t0 for x in near}:
            m = 1
            while t0 + m * s in left:
                m += 1
            if (m, -s) > (best[0], -best[1]):
                best = (m, s)
        a, s = best
        for m in range(a):
            left.remove(t0 + m * s)
        out.append((t0, a, s))
    return out
