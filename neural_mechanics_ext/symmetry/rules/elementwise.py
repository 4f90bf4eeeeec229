"""Elementwise ops: casts and copies, positively homogeneous activations, dropout, and the arithmetic
joins (``add``/``sub``/``mul``/``div``).

A scaling passes through what is positively homogeneous (``σ(αx) = ασ(x)`` for ``α > 0``) and through a
product or quotient with an unperturbed tensor; it dies at a sum with an unperturbed tensor (a residual
join), except a parameter, which then scales with it (a bias after a normaliser's weight).  Powers,
``sqrt``/``rsqrt`` and products of two tensors scaled by the same groups change the power ``d`` of ``α``
the scaling carries; where it reaches 0 the result is invariant: that is how a normaliser written out by
hand (``x · rsqrt(mean(x²) + eps)``) absorbs a scaling.  A shift passes through sums with unperturbed
tensors and through scaling by a constant number; ``x − mean(x)`` absorbs it; it dies everywhere else.

As sources: a parameter multiplied into an activation (``weight * x``) scales what it multiplies; a
parameter added to one (a position table, a class token, a bias vector) shifts it.
"""
from __future__ import annotations

import math
from typing import List

import torch

from ..capture import Value
from .normalisers import hand_written_eps
from .state import (F64, SCALE, SHIFT, Dead, Source, axis_labels, bind, describe_op, is_zero, op_layer, param,
                    position_labels)

IDENTITY = {"contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu",
            "cuda", "requires_grad", "positive", "alias", "identity", "neg"}
VALUE_FREE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
              "new_zeros", "new_ones", "new_empty", "new_full", "size", "numel", "dim"}
HOMOGENEOUS = {"relu", "leaky_relu", "rrelu", "prelu", "abs"}   # σ(αx) = ασ(x) for α > 0


def value_free(prop, node, args, kwargs) -> None:
    """The result does not depend on the values: nothing is perturbed."""


def identity(prop, node, args, kwargs) -> None:
    """Same shape, same labels (``neg`` too: it commutes with scaling and maps a shift to a shift)."""
    x = args[0]
    if not prop.reached(x):
        if node.op in ("type_as", "to"):    # ``y.type_as(x)``: x gives only the dtype (Gemma's RMSNorm)
            return
        raise Dead(f"{describe_op(node)}: perturbed tensor in an unsupported argument")
    prop.only_first_reached(node, x)
    out = node.outputs[0]
    if out is None or tuple(out.shape) != tuple(x.shape):
        raise Dead(f"{describe_op(node)} changes the shape")
    prop.set(out, prop.g[x], prop.p.get(x))


def homogeneous(prop, node, args, kwargs) -> None:
    if prop.mode == SHIFT:
        raise Dead(f"{describe_op(node)} is not shift-equivariant")
    identity(prop, node, args, kwargs)


def clamp(prop, node, args, kwargs) -> None:
    """``clamp(x, min=0)`` is ReLU; any other bound is not homogeneous."""
    a = bind(node, args, kwargs)
    if prop.mode == SCALE and not (is_zero(a.get("min")) and a.get("max") is None):
        raise Dead(f"{describe_op(node)} is not positively homogeneous")
    homogeneous(prop, node, args, kwargs)


def dropout(prop, node, args, kwargs) -> None:
    """A random mask scales with anything, but does not carry a shift."""
    a = bind(node, args, kwargs)
    if prop.mode == SHIFT and a.get("training", True) and float(a.get("p", 0.5)) > 0:
        raise Dead(f"{describe_op(node)} in training mode multiplies by a random mask")
    identity(prop, node, args, kwargs)


def _operands(node, args, kwargs):
    a = args[0]
    b = args[1] if len(args) > 1 else kwargs.get("other")
    op = node.op
    if node.reversed or op == "rsub":
        a, b = b, a
        op = "sub" if op == "rsub" else op
    return op, a, b


def _same_shift(prop, a, b, out) -> bool:
    pa, pb = (torch.broadcast_to(prop.p[v], out.shape) for v in (a, b))
    return torch.equal(pa, pb) and bool((pa >= 0).all())


def add_sub(prop, node, args, kwargs) -> None:
    op, a, b = _operands(node, args, kwargs)
    out = node.outputs[0]
    ra, rb = prop.reached(a), prop.reached(b)
    where = describe_op(node)
    if prop.mode == SCALE:
        if ra and rb:       # each sum scales only if its two terms do alike: their groups merge
            la = torch.broadcast_to(prop.g[a], out.shape)
            lb = torch.broadcast_to(prop.g[b], out.shape)
            if not torch.equal(la < 0, lb < 0):
                raise Dead(f"{where} adds a scaled tensor to an unscaled one at some elements")
            for x, y in torch.unique(torch.stack([la[la >= 0], lb[la >= 0]], 1), dim=0).tolist():
                prop.uf.union(int(x), int(y))
            return prop.set(out, la.clone())
        if is_zero(b if ra else a):
            return prop.set(out, torch.broadcast_to(prop.g[a if ra else b], out.shape).clone())
        if param(b if ra else a) is not None:       # y = s + β: β scaled with s keeps y scaled
            return _join(prop, node, a if ra else b, b if ra else a)
        if op == "add" and hand_written_eps(prop, node, a if ra else b, b if ra else a):
            return prop.set(out, torch.broadcast_to(prop.g[a if ra else b], out.shape).clone())
        other = b if ra else a
        raise Dead(f"{where} adds a tensor that does not scale (a residual join, or a bias)",
                   needs=[other] if isinstance(other, Value) else [])
    if ra and rb:
        if op == "sub" and _same_shift(prop, a, b, out):    # x − mean(x): the shift cancels
            prop.merge_rows(torch.stack([torch.broadcast_to(prop.g[v], out.shape).reshape(-1) for v in (a, b)], 1),
                            where)
            return prop.absorbers.append(node)
        raise Dead(f"{where} adds two shifted tensors")
    r = a if ra else b
    prop.set(out, torch.broadcast_to(prop.g[r], out.shape).clone(), torch.broadcast_to(prop.p[r], out.shape).clone())


def _join(prop, node, x, beta) -> None:
    """A parameter added to a scaled tensor joins the source side: each of its elements takes the group
    of the elements it is added to (refused if it is added to elements of several groups and unperturbed
    ones at once)."""
    out = node.outputs[0]
    lab = torch.broadcast_to(prop.g[x], out.shape)
    idx = torch.broadcast_to(torch.arange(math.prod(beta.shape), dtype=F64).view(beta.shape), out.shape)
    rows = torch.stack([lab.reshape(-1), idx.reshape(-1)], 1)
    order = rows[:, 1].argsort(stable=True)
    per = rows[order, 0].view(math.prod(beta.shape), -1)
    rep = prop.merge_rows(per, describe_op(node))
    prop.join(node, beta, rep.view(beta.shape))
    prop.set(out, lab.clone())


def _product_of_scalings(prop, node, op, a, b) -> None:
    """``a·b`` or ``a/b``, both scaled by the same groups: the powers add (subtract).  Power 0 is invariance:
    ``x · rsqrt(mean(x²) + eps)`` or ``(x − μ) / sqrt(var + eps)`` absorbs the scaling there."""
    out = node.outputs[0]
    la = torch.broadcast_to(prop.canon(prop.g[a]), out.shape)
    lb = torch.broadcast_to(prop.canon(prop.g[b]), out.shape)
    if not torch.equal(la, lb):
        raise Dead(f"{describe_op(node)} multiplies tensors scaled by different groups")
    d = prop.degree(a) + (prop.degree(b) if op == "mul" else -prop.degree(b))
    if d == 0:
        prop.absorbers.append(node)
        return
    prop.set(out, la.clone(), degree=d)


POWERS = {"pow": None, "square": 2.0, "sqrt": 0.5, "rsqrt": -0.5, "reciprocal": -1.0}


def power(prop, node, args, kwargs) -> None:
    """``x^n`` of a scaled ``x``: scaled to the power ``d·n``."""
    x = args[0]
    where = describe_op(node)
    if prop.mode == SHIFT:
        raise Dead(f"{where} is not shift-equivariant")
    if node.reversed or not prop.reached(x):
        raise Dead(f"{where}: the exponent is perturbed")
    prop.only_first_reached(node, x)
    n = POWERS[node.op]
    if n is None:
        n = args[1] if len(args) > 1 else kwargs.get("exponent")
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise Dead(f"{where}: the exponent is not a number")
    prop.set(node.outputs[0], prop.g[x], degree=prop.degree(x) * float(n))


def mul_div(prop, node, args, kwargs) -> None:
    op, a, b = _operands(node, args, kwargs)
    out = node.outputs[0]
    ra, rb = prop.reached(a), prop.reached(b)
    where = describe_op(node)
    if prop.mode == SCALE:
        if ra and rb:
            return _product_of_scalings(prop, node, op, a, b)
        if op == "div" and rb:
            raise Dead(f"{where} divides by a perturbed tensor")
        return prop.set(out, torch.broadcast_to(prop.g[a if ra else b], out.shape).clone())
    other = b if ra else a
    if (op == "div" and rb) or isinstance(other, (Value, torch.Tensor)):
        raise Dead(f"{where} rescales the shift by a tensor")
    r = a if ra else b
    prop.set(out, prop.g[r].clone(), prop.p[r].clone())


# ---------------------------------------------------------------------- parameters used elementwise
def _param_and_activation(node):
    args, kwargs = node.call_args()
    if len(args) < 2:
        return None, None
    a, b = args[0], args[1]
    if param(a) is not None and isinstance(b, Value) and b.kind != "param" and b.is_float:
        return a, b
    if param(b) is not None and isinstance(a, Value) and a.kind != "param" and a.is_float:
        return b, a
    return None, None


def mul_sources(node, graph) -> List[Source]:
    """``γ * x`` (a hand-written normaliser's weight, a layer scale): scaling ``γ_j`` scales every output
    element that ``γ_j`` multiplies."""
    w, _ = _param_and_activation(node)
    y = node.outputs[0]
    if w is None or node.op != "mul" or y is None:
        return []
    n = math.prod(w.shape)
    g = torch.broadcast_to(torch.arange(n, dtype=F64).view(w.shape), y.shape).clone()
    return [Source(SCALE, node, op_layer(node, graph), "units", n, g, None,
                   [(w.name, torch.arange(n).view(w.shape), 1, None)])]


def add_sources(node, graph) -> List[Source]:
    """``x + β`` with a parameter ``β`` over the last axis: a bias vector (one group per element, merged
    by what absorbs it) or a table (class token, position table: one group per row, a shift uniform over
    the features)."""
    b, _ = _param_and_activation(node)
    y = node.outputs[0]
    if b is None or node.op != "add" or y is None or not b.shape or b.shape[-1] != y.shape[-1] or \
            len(b.shape) > len(y.shape):
        return []
    layer, E = op_layer(node, graph), b.shape[-1]
    if len(b.shape) == 1:
        return [Source(SHIFT, node, layer, "bias", E, axis_labels(y.shape, len(y.shape) - 1, E),
                       torch.zeros(y.shape, dtype=F64), [(b.name, torch.arange(E), 1, None)])]
    R = math.prod(b.shape) // E
    return [Source(SHIFT, node, layer, "rows", 1, torch.zeros(y.shape, dtype=F64),
                   position_labels(y.shape, len(y.shape) - 1), [(b.name, None, 1, (1, R, E))])]
