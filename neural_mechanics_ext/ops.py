"""Python face of the compiled ops: argument checking, the fake (meta) kernels, the public wrappers."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _backend
from .views import View, full

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_op = _backend.ops.slice_moments


def slice_moments(
    xs: Sequence[torch.Tensor],
    views: Sequence[Sequence[View]],
    ys: Optional[Sequence[Optional[torch.Tensor]]] = None,
    zs: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Per-slice sums of x, y, z and their pairwise products, in one pass over every tensor.

    Args:
        xs: tensors (float32, float64, float16 or bfloat16), all on one device.
        views: ``views[i]`` is a sequence of views of ``xs[i]``, each ``(A, K, B)`` with
            ``A*K*B == xs[i].numel()``, or ``(A, K, B, offset, a_stride)`` for part of the tensor.  A view
            splits ``xs[i].flatten()`` into ``K`` slices; slice ``k`` holds the elements at flat index
            ``offset + a*a_stride + k*B + b`` for ``a < A``, ``b < B`` (``(A, K, B)`` is
            ``(A, K, B, 0, K*B)``; ``a_stride >= K*B`` when ``A > 1``).  Rows of a Linear weight are
            ``(1, out, in)``, its columns ``(out, in, 1)``, the input channels of a conv weight
            ``(out, in, kh*kw)``, the whole tensor ``(1, 1, N)``; columns ``E .. 2E-1`` of a fused ``[E, 3E]``
            weight ``(E, E, 1, E, 3E)``, rows ``E .. 2E-1`` of a ``[3E, E]`` one ``(1, E, E, E*E, E*E)``.  Views may
            overlap; each tensor is still read once when its views fit one layout (csrc/plan.h).
        ys, zs: ``None`` (absent), or one entry per ``xs`` entry: a tensor of the same shape as
            ``xs[i]`` (any supported dtype) or ``None``.  Absent tensors count as zeros.

    Returns:
        float64 tensor ``[sum of K over all views, 9]`` on the inputs' device; columns are
        ``MOMENTS = (x, y, z, xx, yy, zz, xy, xz, yz)``; rows ordered by tensor, then view, then k.

    Inputs need not be contiguous: the op reads them in their logical (row-major) order, but a
    non-contiguous tensor is copied first, which costs time and memory; parameters and their
    gradients are contiguous in ordinary training.  NaN and Inf stay in the slices that hold them.
    """
    xs, ys, zs, table = _check_inputs(xs, views, ys, zs)
    if not xs:  # the dispatcher needs a tensor to pick a device
        return torch.zeros((0, 9), dtype=torch.float64)
    return _op(xs, ys, zs, table)


def _check_inputs(xs, views, ys, zs):
    """Validate the public arguments and bring them to the op's flat form; raise a clear error."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"slice_moments: xs must be a list or tuple of tensors, got {type(xs).__name__}")
    if isinstance(views, torch.Tensor) or not isinstance(views, (list, tuple)) or len(views) != len(xs):
        raise ValueError(
            f"slice_moments: views must be a list with one sequence of (A, K, B) per tensor "
            f"({len(xs)} tensors), got {_describe_len(views)}")
    xs = list(xs)
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"slice_moments: xs[{i}] is a {type(x).__name__}, not a tensor")
    ys = _check_companions("ys", ys, xs)
    zs = _check_companions("zs", zs, xs)
    devices = {t.device for t in xs + [t for t in ys + zs if t is not None]}
    if len(devices) > 1:
        raise ValueError(
            f"slice_moments: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    for name, ts in (("xs", xs), ("ys", ys), ("zs", zs)):
        for i, t in enumerate(ts):
            if t is not None and t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"slice_moments: {name}[{i}] has dtype {t.dtype}; supported: "
                    f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    table = []
    for i, (x, vs) in enumerate(zip(xs, views)):
        if isinstance(vs, tuple) and len(vs) in (3, 5) and all(isinstance(v, int) for v in vs):
            raise ValueError(
                f"slice_moments: views[{i}] must be a sequence of views (A, K, B) or "
                f"(A, K, B, offset, a_stride); wrap a single view as [{vs}]")
        for j, v in enumerate(vs):
            table += [i, *full(v, x.numel(), f"slice_moments: views[{i}][{j}]", f"xs[{i}]")]
    xs = [x.detach() for x in xs]
    return xs, ys, zs, table


def _check_companions(name, ts, xs):
    if ts is None:
        return []
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)) or len(ts) != len(xs):
        raise ValueError(
            f"slice_moments: {name} must be None or a list with one entry per tensor of xs "
            f"({len(xs)}), got {_describe_len(ts)}")
    out = []
    for i, (t, x) in enumerate(zip(ts, xs)):
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"slice_moments: {name}[{i}] is a {type(t).__name__}, not a tensor or None")
            if t.shape != x.shape:
                raise ValueError(
                    f"slice_moments: {name}[{i}] has shape {tuple(t.shape)} but xs[{i}] has "
                    f"{tuple(x.shape)}")
            t = t.detach()
        out.append(t)
    return out


def _describe_len(obj):
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    return f"a {type(obj).__name__}"


@torch.library.register_fake("neural_mechanics_ext::slice_moments")
def _slice_moments_fake(xs, ys, zs, views):
    rows = sum(views[v + 2] for v in range(0, len(views), 6))  # (tensor, A, K, B, offset, a_stride)
    device = xs[0].device if len(xs) else torch.device("cpu")
    return torch.empty((rows, 9), dtype=torch.float64, device=device)
