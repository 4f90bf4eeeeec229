"""Elementwise ops: casts and copies, positively homogeneous activations, dropout, and the arithmetic
joins (``add``/``sub``/``mul``/``div``).

A scaling passes through what is positively homogeneous (``σ(αx) = ασ(x)`` for ``α > 0``) and through a
product or quotient with an unperturbed tensor; it dies at a sum with an unperturbed tensor (a residual
join or a bias).  A shift passes through sums with unperturbed tensors and through scaling by a constant
number, and dies everywhere else.
"""
from __future__ import annotations

import torch

from ..capture import Value
from .state import SCALE, SHIFT, Dead, bind, describe_op, is_zero

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


def add_sub(prop, node, args, kwargs) -> None:
    _, a, b = _operands(node, args, kwargs)
    out = node.outputs[0]
    ra, rb = prop.reached(a), prop.reached(b)
    where = describe_op(node)
    if prop.mode == SCALE:
        if ra and rb:
            la = torch.broadcast_to(prop.canon(prop.g[a]), out.shape)
            lb = torch.broadcast_to(prop.canon(prop.g[b]), out.shape)
            if not torch.equal(la, lb):
                raise Dead(f"{where} adds tensors scaled by different groups")
            return prop.set(out, la.clone())
        if is_zero(b if ra else a):
            return prop.set(out, torch.broadcast_to(prop.g[a if ra else b], out.shape).clone())
        raise Dead(f"{where} adds a tensor that does not scale (a residual join, or a bias)")
    if ra and rb:
        raise Dead(f"{where} adds two shifted tensors")
    r = a if ra else b
    prop.set(out, torch.broadcast_to(prop.g[r], out.shape).clone(), torch.broadcast_to(prop.p[r], out.shape).clone())


def mul_div(prop, node, args, kwargs) -> None:
    op, a, b = _operands(node, args, kwargs)
    out = node.outputs[0]
    ra, rb = prop.reached(a), prop.reached(b)
    where = describe_op(node)
    if prop.mode == SCALE:
        if op == "mul" and ra and rb:
            raise Dead(f"{where} multiplies two perturbed tensors")
        if op == "div" and rb:
            raise Dead(f"{where} divides by a perturbed tensor")
        return prop.set(out, torch.broadcast_to(prop.g[a if ra else b], out.shape).clone())
    other = b if ra else a
    if (op == "div" and rb) or isinstance(other, (Value, torch.Tensor)):
        raise Dead(f"{where} rescales the shift by a tensor")
    r = a if ra else b
    prop.set(out, prop.g[r].clone(), prop.p[r].clone())
