"""Python face of the compiled ops: argument checking, the fake (meta) kernels, the public wrappers."""
from __future__ import annotations

import math
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


def _check_inputs(xs, views, ys, zs, op="slice_moments", names=("xs", "ys", "zs")):
    """Validate the public arguments and bring them to the op's flat form; raise a clear error.

    ``op`` and ``names`` (the names of xs, ys, zs) are those the messages use."""
    nx, ny, nz = names
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{op}: {nx} must be a list or tuple of tensors, got {type(xs).__name__}")
    if isinstance(views, torch.Tensor) or not isinstance(views, (list, tuple)) or len(views) != len(xs):
        raise ValueError(
            f"{op}: views must be a list with one sequence of (A, K, B) per tensor "
            f"({len(xs)} tensors), got {_describe_len(views)}")
    xs = list(xs)
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {nx}[{i}] is a {type(x).__name__}, not a tensor")
    ys = _check_companions(ny, ys, xs, op, nx)
    zs = _check_companions(nz, zs, xs, op, nx)
    _check_devices_and_dtypes(op, {nx: xs, ny: ys, nz: zs})
    table = []
    for i, (x, vs) in enumerate(zip(xs, views)):
        if isinstance(vs, tuple) and len(vs) in (3, 5) and all(isinstance(v, int) for v in vs):
            raise ValueError(
                f"{op}: views[{i}] must be a sequence of views (A, K, B) or "
                f"(A, K, B, offset, a_stride); wrap a single view as [{vs}]")
        for j, v in enumerate(vs):
            table += [i, *full(v, x.numel(), f"{op}: views[{i}][{j}]", f"{nx}[{i}]")]
    xs = [x.detach() for x in xs]
    return xs, ys, zs, table


def _check_devices_and_dtypes(op, lists):
    """One device for every tensor of ``lists`` (name -> list of tensors or None), supported dtypes."""
    devices = {t.device for ts in lists.values() for t in ts if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t is not None and t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{op}: {name}[{i}] has dtype {t.dtype}; supported: "
                    f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")


def _check_companions(name, ts, xs, op="slice_moments", xname="xs"):
    if ts is None:
        return []
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)) or len(ts) != len(xs):
        raise ValueError(
            f"{op}: {name} must be None or a list with one entry per tensor of {xname} "
            f"({len(xs)}), got {_describe_len(ts)}")
    out = []
    for i, (t, x) in enumerate(zip(ts, xs)):
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor or None")
            if t.shape != x.shape:
                raise ValueError(
                    f"{op}: {name}[{i}] has shape {tuple(t.shape)} but {xname}[{i}] has "
                    f"{tuple(x.shape)}")
            t = t.detach()
        out.append(t)
    return out


# The per-tensor scalars of the stream-mode ops, in order (csrc/stream_modes.h: AdamScalar).
ADAM_SCALARS = ("beta1", "beta2", "eps", "bias_correction1", "bias_correction2", "coupled_weight_decay", "maximize")
LION_SCALARS = ("beta1",)


def adam_moments(
    params: Sequence[torch.Tensor],
    views: Sequence[Sequence[View]],
    grads: Sequence[torch.Tensor],
    exp_avgs: Optional[Sequence[Optional[torch.Tensor]]] = None,
    exp_avg_sqs: Optional[Sequence[Optional[torch.Tensor]]] = None,
    max_exp_avg_sqs: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    step,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
) -> torch.Tensor:
    """``slice_moments`` of (θ, m', u) for torch's Adam/AdamW step about to be taken, u formed in the kernel.

    Reads θ, g, exp_avg, exp_avg_sq (and max_exp_avg_sq) once each, as the optimizer's step pre-hook sees
    them, and forms per element (THEORY_ADAPTIVE.md §1, the ``adam`` stream mode)::

        g̃ = ±g (+ λθ if the decay is coupled)    m' = lerp(m, g̃, 1 − β₁)    v' = β₂v + (1 − β₂)g̃²
        u = m' / (bc₁ (sqrt(v̂/bc₂) + ε)),  v̂ = max(v_max, v') with amsgrad, else v';  bc = 1 − βᵗ

    so that the step is θ ← ρθ − lr·u (ρ = 1 − lr·λ for AdamW, 1 for Adam).  The columns of the result
    are ``MOMENTS`` of (x, y, z) = (θ, m', u), rows as in :func:`slice_moments`.

    Args:
        params, views: as ``xs`` and ``views`` of :func:`slice_moments`.
        grads: one gradient per parameter (same shape).
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs: ``optimizer.state[p]['exp_avg']`` etc. before the step, one
            entry per parameter, or ``None`` (the list, or an entry) for a parameter without state yet (a
            fresh optimizer: zeros).  Pass ``max_exp_avg_sq`` exactly when the group has ``amsgrad``.
        step: t, the step about to be taken (``state['step'] + 1``; 1 for a fresh optimizer).
        betas, eps, weight_decay, decoupled_weight_decay, maximize: the param group's settings (AdamW's
            groups have ``decoupled_weight_decay=True``: their decay does not enter u).
        Each keyword takes one value for every parameter or a list with one per parameter.

    The arithmetic is torch's: in float32 for float32 and 16-bit parameters (16-bit ones are not rounded
    to 16 bits between operations, as torch would), in float64 when any input is float64; the moments
    are float64 sums.  u agrees with the optimizer's to a few float32 ulps (float64: ~1e-16 relative).
    """
    args = _adam_args(params, views, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, betas, eps,
                      weight_decay, decoupled_weight_decay, maximize)
    if not args[0]:
        return torch.zeros((0, 9), dtype=torch.float64)
    return _backend.ops.adam_moments(*args)


def lion_moments(
    params: Sequence[torch.Tensor],
    views: Sequence[Sequence[View]],
    grads: Sequence[torch.Tensor],
    exp_avgs: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    betas=(0.9, 0.99),
) -> torch.Tensor:
    """``slice_moments`` of (θ, c, sign c) for the Lion step about to be taken (lion-pytorch), c = β₁m + (1 − β₁)g.

    Reads θ, g and exp_avg (``None``: a fresh optimizer, zeros) once each; the step is θ ← ρθ − lr·sign(c).
    ``betas`` are the group's (only β₁ enters c), one pair for every parameter or one per parameter.
    Arguments and result otherwise as :func:`adam_moments`; sign(0) = 0, and a NaN c gives sign 0 (torch's).
    """
    args = _lion_args(params, views, grads, exp_avgs, betas)
    if not args[0]:
        return torch.zeros((0, 9), dtype=torch.float64)
    return _backend.ops.lion_moments(*args)


def _adam_args(params, views, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, betas, eps, weight_decay,
               decoupled_weight_decay, maximize):
    """The op's arguments: (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, views, scalars)."""
    op = "adam_moments"
    params, grads, ms, table = _check_stream_inputs(op, params, views, grads, exp_avgs)
    n = len(params)
    vs = _check_companions("exp_avg_sqs", exp_avg_sqs, params, op, "params") or [None] * n
    vmaxs = _check_companions("max_exp_avg_sqs", max_exp_avg_sqs, params, op, "params") or [None] * n
    _check_devices_and_dtypes(op, {"params": params, "exp_avg_sqs": vs, "max_exp_avg_sqs": vmaxs})
    for i in range(n):
        if (ms[i] is None) != (vs[i] is None):
            raise ValueError(f"{op}: params[{i}] has {'exp_avg' if vs[i] is None else 'exp_avg_sq'} but not "
                             f"{'exp_avg_sq' if vs[i] is None else 'exp_avg'}: pass both (or neither, for a "
                             f"fresh optimizer)")
        if vmaxs[i] is not None and vs[i] is None:
            raise ValueError(f"{op}: params[{i}] has max_exp_avg_sq but no exp_avg_sq")
    steps = _per_tensor(op, "step", step, n, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                        "an int >= 1 (state['step'] + 1)")
    betas = _per_tensor(op, "betas", betas, n, _is_betas, "a pair of numbers in [0, 1)")
    eps = _per_tensor(op, "eps", eps, n, lambda v: _is_number(v) and 0 <= v < math.inf, "a number >= 0")
    wds = _per_tensor(op, "weight_decay", weight_decay, n, lambda v: _is_number(v) and 0 <= v < math.inf,
                      "a number >= 0")
    decoupled = _per_tensor(op, "decoupled_weight_decay", decoupled_weight_decay, n, _is_flag, "a bool")
    maximize = _per_tensor(op, "maximize", maximize, n, _is_flag, "a bool")
    scalars = []
    for t, (b1, b2), e, wd, dec, mx in zip(steps, betas, eps, wds, decoupled, maximize):
        # The bias corrections as torch's Adam forms them (in Python, double precision).
        scalars += [float(b1), float(b2), float(e), 1.0 - b1 ** t, 1.0 - b2 ** t, 0.0 if dec else float(wd),
                    1.0 if mx else 0.0]
    nones = lambda ts: ts if any(t is not None for t in ts) else []
    return params, grads, nones(ms), nones(vs), nones(vmaxs), table, scalars


def _lion_args(params, views, grads, exp_avgs, betas):
    """The op's arguments: (params, grads, exp_avgs, views, scalars)."""
    op = "lion_moments"
    params, grads, ms, table = _check_stream_inputs(op, params, views, grads, exp_avgs)
    betas = _per_tensor(op, "betas", betas, len(params), _is_betas, "a pair of numbers in [0, 1)")
    return params, grads, ms, table, [float(b1) for b1, _ in betas]


def _check_stream_inputs(op, params, views, grads, exp_avgs):
    params, gs, ms, table = _check_inputs(params, views, grads, exp_avgs, op, ("params", "grads", "exp_avgs"))
    if grads is None or any(g is None for g in gs):
        raise ValueError(f"{op}: every parameter needs its gradient (grads has None)")
    return params, gs, ms or [None] * len(params), table


def _per_tensor(op, name, value, n, valid, what):
    """One value per tensor, from a single value (for all) or a list/tuple of n; each must be ``valid``.

    (A pair of numbers is one value of ``betas``, not one per tensor.)"""
    pair = isinstance(value, (tuple, list)) and all(_is_number(v) for v in value)
    single = pair if name == "betas" else not isinstance(value, (tuple, list))
    values = [value] * n if single else list(value)
    if len(values) != n:
        raise ValueError(f"{op}: {name} must be one value or one per parameter ({n}), got {len(values)}")
    for i, v in enumerate(values):
        if not valid(v):
            raise ValueError(f"{op}: {name}{'' if len(set(map(repr, values))) == 1 else f'[{i}]'} must be "
                             f"{what}, got {v!r}")
    return values


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _is_flag(v):
    return isinstance(v, bool)


def _is_betas(v):
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)


def _describe_len(obj):
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    return f"a {type(obj).__name__}"


@torch.library.register_fake("neural_mechanics_ext::slice_moments")
def _slice_moments_fake(xs, ys, zs, views):
    rows = sum(views[v + 2] for v in range(0, len(views), 6))  # (tensor, A, K, B, offset, a_stride)
    device = xs[0].device if len(xs) else torch.device("cpu")
    return torch.empty((rows, 9), dtype=torch.float64, device=device)


@torch.library.register_fake("neural_mechanics_ext::adam_moments")
def _adam_moments_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, views, scalars):
    return _slice_moments_fake(params, grads, exp_avgs, views)


@torch.library.register_fake("neural_mechanics_ext::lion_moments")
def _lion_moments_fake(params, grads, exp_avgs, views, scalars):
    return _slice_moments_fake(params, grads, exp_avgs, views)
