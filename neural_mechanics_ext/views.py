"""Views: which flat elements of a tensor form slice k (the one definition, used by every module).

A view is ``(A, K, B)`` or ``(A, K, B, offset, a_stride)``.  Slice ``k`` holds the flat elements
``offset + a*a_stride + k*B + b`` for ``a < A``, ``b < B``; ``(A, K, B)`` is ``(A, K, B, 0, K*B)`` and must
cover the whole tensor (``A*K*B == numel``), the long form may address any part of it (a block of columns
or rows of a fused weight, the rows of one attention head, ...).  Several views may overlap.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple

import torch

View = Tuple[int, ...]  # (A, K, B) or (A, K, B, offset, a_stride)
Full = Tuple[int, int, int, int, int]  # (A, K, B, offset, a_stride)


def full(view: Sequence[int], numel: Optional[int] = None, where: str = "view", tensor: str = "the tensor") -> Full:
    """The view as ``(A, K, B, offset, a_stride)``, checked against a tensor of ``numel`` elements when
    given; a ``ValueError`` naming ``where`` (the view) and ``tensor`` otherwise.  ``a_stride`` of a view
    with ``A <= 1`` means nothing and becomes ``K*B``."""
    if isinstance(view, (str, bytes)) or not hasattr(view, "__len__") or len(view) not in (3, 5):
        raise ValueError(f"{where} = {view!r} is not (A, K, B) or (A, K, B, offset, a_stride)")
    try:
        vals = [operator.index(s) for s in view]
    except TypeError:
        raise ValueError(f"{where} = {view!r} is not (A, K, B) or (A, K, B, offset, a_stride) of integers") from None
    a, k, b = vals[:3]
    if min(a, k, b) < 0:
        raise ValueError(f"{where} = {tuple(view)} has a negative size")
    if len(vals) == 3:
        if numel is not None and a * k * b != numel:
            raise ValueError(f"{where} = {tuple(view)} covers {a * k * b} elements but {tensor} has {numel}; "
                             f"address part of a tensor with (A, K, B, offset, a_stride)")
        return a, k, b, 0, k * b
    offset, a_stride = vals[3:]
    if offset < 0 or a_stride < 0:
        raise ValueError(f"{where} = {tuple(view)} has a negative offset or a_stride")
    if a <= 1:
        a_stride = k * b
    elif a_stride < k * b:
        raise ValueError(f"{where} = {tuple(view)} has a_stride {a_stride} < K*B = {k * b}: its rows a overlap")
    if numel is not None and end((a, k, b, offset, a_stride)) > numel:
        raise ValueError(f"{where} = {tuple(view)} runs past the end of {tensor}: it reaches flat index "
                         f"{end((a, k, b, offset, a_stride)) - 1} but {tensor} has {numel} elements")
    return a, k, b, offset, a_stride


def end(view: Full) -> int:
    """One past the last flat element the view addresses (``offset`` for an empty view)."""
    a, k, b, offset, a_stride = view
    return offset if a * k * b == 0 else offset + (a - 1) * a_stride + k * b


def strided(flat: torch.Tensor, view: Full) -> torch.Tensor:
    """``[A, K, B]`` view (no copy) of the elements of a contiguous 1-D tensor that ``view`` addresses:
    ``out[a, k, b] = flat[offset + a*a_stride + k*B + b]``.  Writable; its elements are distinct."""
    a, k, b, offset, a_stride = view
    if offset == 0 and a_stride == k * b and a * k * b == flat.numel():
        return flat.view(a, k, b)   # the whole tensor: a plain view, which torch.compile traces once for all shapes
    return flat.as_strided((a, k, b), (a_stride, b, 1), flat.storage_offset() + offset)


def format_view(view: Sequence[int]) -> str:
    """``(A,K,B)``, or ``(A,K,B)@offset/a_stride`` for part of a tensor."""
    head = ",".join(str(int(s)) for s in view[:3])
    return f"({head})" if len(view) == 3 else f"({head})@{int(view[3])}/{int(view[4])}"
