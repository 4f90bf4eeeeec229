"""Normalisers: BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm and ``F.normalize``.

In training mode a normaliser absorbs a scaling of each set it normalises (the groups of a set are
merged: one scale group per channel group for GroupNorm, the whole layer for LayerNorm), and, if it
subtracts a mean, a shift that is uniform over each set.  Its affine ``(γ, β)`` is a source: ``γ_k`` and
``β_k`` scaled together scale channel ``k``; ``β_k`` shifted alone shifts it.  The eps of a normaliser
makes a scale symmetry approximate, which is recorded for the tolerance rule.
"""
from __future__ import annotations

import math
from typing import List

import torch

from ..capture import NORM_OPS, SIGNATURES, bind_args, norm_fiber_dims
from .state import (F64, NORM_TAG, SCALE, SHIFT, Dead, Source, axis_labels, bind, constant_rows, describe_op,
                    fibers, op_layer, param)

NORMALISERS = set(NORM_OPS) | {"normalize"}


def sources(node, graph) -> List[Source]:
    """Scale of ``(γ_k, β_k)``, shift of ``β_k``."""
    a = bind(node)
    gamma, beta = param(a.get("weight")), param(a.get("bias"))
    if gamma is None and beta is None:
        return []
    y = node.outputs[0]
    ref = gamma if gamma is not None else beta
    layer = op_layer(node, graph)
    n = math.prod(ref.shape)
    if node.op in ("layer_norm", "rms_norm"):
        g = torch.arange(n, dtype=F64).view(ref.shape).expand(y.shape).clone()
    else:
        g = axis_labels(y.shape, 1, n)
    cmap = torch.arange(n).view(ref.shape)
    out = []
    if gamma is not None:
        members = [(gamma.name, cmap, 1, None)]
        if beta is not None:
            members.append((beta.name, cmap, 1, None))
        out.append(Source(SCALE, node, layer, "units", n, g, None, members))
    if beta is not None:
        out.append(Source(SHIFT, node, layer, "bias", n, g.clone(), torch.zeros(y.shape, dtype=F64),
                          [(beta.name, cmap, 1, None)]))
    return out


def normaliser(prop, node, args, kwargs) -> None:
    op = node.op
    where = describe_op(node)
    a = bind_args(SIGNATURES[op], args, kwargs)
    x = a["input"]
    prop.only_first_reached(node, x)
    if op in ("rms_norm", "normalize") and prop.mode == SHIFT:
        raise Dead(f"{where} does not subtract a mean, so it does not absorb a shift")
    if op == "normalize":
        shape, dims = tuple(x.shape), [int(a.get("dim", 1)) % len(x.shape)]
    else:
        shape, dims = norm_fiber_dims(op, tuple(x.shape), a)
    rows, _ = fibers(prop.g[x].reshape(shape), dims)
    if prop.mode == SHIFT:
        prow, _ = fibers(prop.p[x].reshape(shape), dims)
        if not constant_rows(prow):
            raise Dead(f"{where}: the shift differs inside one normalised set")
    prop.merge_rows(rows, where)
    _record(prop, node, a)


def _record(prop, node, a) -> None:
    """An absorber; one that uses running statistics forces the symmetry to fail, one with eps > 0 makes a
    scaling approximate."""
    op = node.op
    stats_free = ((op == "batch_norm" and not a.get("training", False)
                   and a.get("running_mean") is not None and a.get("running_var") is not None)
                  or (op == "instance_norm" and not a.get("use_input_stats", True)))
    if stats_free:
        what = "scale" if prop.mode == SCALE else "translation"
        prop.forced = (f"{NORM_TAG[op]} {op_layer(node, prop.graph)} normalises with running statistics "
                       f"(eval mode), which do not follow the perturbation: no {what} symmetry")
    elif prop.mode == SCALE and op != "normalize":
        eps = node.stats.get("eps", 0.0)
        if eps > 0:
            prop.approx.append((f"{NORM_TAG[op]} {op_layer(node, prop.graph)}", eps,
                                node.stats.get("max_ratio", 1.0), node.stats.get("set_size", 0)))
    prop.absorbers.append(node)


# ---------------------------------------------------------------------- normalisers written out by hand
def second_moment(v) -> bool:
    """A mean or sum of squares, or a variance (what a hand-written normaliser adds its eps to).  The
    same definition, on tensors at run time, is :class:`~neural_mechanics_ext.symmetry.eps_limit.NormaliserWatch`'s."""
    node = v.producer
    if node is None:
        return False
    if node.op == "var":
        return True
    if node.op not in ("mean", "sum") or not node.inputs:
        return False
    sq = node.inputs[0].producer
    if sq is None:
        return False
    args, kwargs = sq.call_args()
    if sq.op == "square":
        return True
    if sq.op == "pow" and not sq.reversed:
        n = args[1] if len(args) > 1 else kwargs.get("exponent")
        return isinstance(n, (int, float)) and not isinstance(n, bool) and float(n) == 2.0
    return sq.op == "mul" and len(args) > 1 and args[0] is args[1]


def hand_written_eps(prop, node, x, eps) -> bool:
    """``second moment + eps`` with a positive number: the eps of a normaliser written out by hand
    (HF's RMSNorm, LayerNorm variants).  It keeps the scaling approximately (O(eps/var)): recorded for
    the tolerance rule like a normaliser call's eps."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not second_moment(x):
        return False
    prop.approx.append((f"norm {op_layer(node, prop.graph)}", float(eps), node.stats.get("max_ratio", 1.0),
                        node.stats.get("set_size", 0)))
    return True


def variance(prop, node, args, kwargs) -> None:
    """``var(x)``: a scaling goes to the power 2 (one group per reduced set); a shift uniform over each
    reduced set disappears (the variance absorbs it)."""
    a = bind_args(("input", "dim"), args, kwargs)
    x = a["input"]
    prop.only_first_reached(node, x)
    nd = len(x.shape)
    dim = a.get("dim")
    if dim is None or isinstance(dim, bool):          # torch.var(x) or the old torch.var(x, unbiased)
        dims = list(range(nd))
    else:
        dims = sorted({d % nd for d in ([dim] if isinstance(dim, int) else dim)})
    rows, _ = fibers(prop.g[x], dims)
    rep = prop.merge_rows(rows, describe_op(node))
    if prop.mode == SHIFT:
        prow, _ = fibers(prop.p[x], dims)
        if not constant_rows(prow):
            raise Dead(f"{describe_op(node)}: the shift differs inside one reduced set")
        prop.absorbers.append(node)
        return
    out = node.outputs[0]
    prop.set(out, rep.reshape(out.shape).clone(), degree=2 * prop.degree(x))
