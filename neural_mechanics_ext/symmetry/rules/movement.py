"""Data movement: views, permutations, indexing, concatenation, padding.

These ops are *replayed* on the label tensors (the recorded call runs again with labels in place of the
activations), so flatten blocks, head splits and channel concatenations are followed exactly rather than
pattern-matched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import math
from typing import List, Optional

from ..capture import SIGNATURES, Value, bind_args
from .state import F64, SHIFT, Dead, Source, describe_op, is_zero, layer_name

MOVE = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
        "movedim", "squeeze", "unsqueeze", "expand", "expand_as", "broadcast_to", "repeat", "tile",
        "narrow", "select", "getitem", "chunk", "split", "split_with_sizes", "tensor_split", "unbind",
        "cat", "stack", "hstack", "vstack", "flip", "roll", "index_select", "gather", "masked_select",
        "property_T", "property_mT", "ravel"}


JOINS = {"cat", "stack", "hstack", "vstack"}


def replay(prop, node, args, kwargs) -> None:
    if node.op in JOINS:    # unperturbed parts beside perturbed ones: what a joint candidate would add
        prop.wants.extend(v for v in node.inputs if v.is_float and v not in prop.g)
    gl = prop.rerun(node, prop.g)
    pl = prop.rerun(node, prop.p) if prop.mode == SHIFT else [None] * len(gl)
    for out, g, p in zip(node.outputs, gl, pl):
        if out is not None and isinstance(g, torch.Tensor) and out.is_float:
            if bool((g >= 0).any()):
                prop.set(out, g.to(F64), None if p is None else p.to(F64))


def cat_sources(node, graph) -> List[Source]:
    """A parameter concatenated to activations (a class token, register tokens; through ``expand``): shifted
    uniformly, it shifts the positions it fills, by one value (one group)."""
    out = []
    for v in dict.fromkeys(node.inputs):
        w = _param_behind(v)
        if w is None or not v.is_float:
            continue
        labels = {u: torch.full(u.shape, 0.0 if u is v else -1.0, dtype=F64) for u in node.inputs if u.is_float}
        args, kwargs = node.call_args(lambda u: labels.get(u, u.tensor))
        g = node.func(*args, **kwargs)
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(node.outputs[0].shape):
            continue
        out.append(Source(SHIFT, node, layer_name(w.name), "token", 1, g.to(F64), g.to(F64).clone(),
                          [(w.name, None, 1, (1, 1, math.prod(w.shape)))]))
    return out


def _param_behind(v: Value, depth: int = 0) -> Optional[Value]:
    """The parameter that ``v`` is a moved copy of (``cls_token.expand(B, -1, -1)``), or None."""
    if v.kind == "param":
        return v
    node = v.producer
    if node is None or node.op not in MOVE or depth > 8:
        return None
    inputs = [x for x in node.inputs if x.is_float]
    return _param_behind(inputs[0], depth + 1) if len(inputs) == 1 else None


def setitem(prop, node, args, kwargs) -> None:
    """``x[idx] = y``: the new version of ``x`` takes ``y``'s labels at ``idx``."""
    x = args[0]
    idx = node.call_args(lambda v: v.tensor if v.tensor is not None else v)[0][1]
    g = prop.lab(x).clone()
    p = prop.plab(x).clone() if prop.mode == SHIFT else None
    val = args[2]
    try:
        g[idx] = prop.lab(val) if isinstance(val, Value) else -1.0
        if p is not None:
            p[idx] = prop.plab(val) if isinstance(val, Value) else -1.0
    except Exception as exc:
        raise Dead(f"cannot follow {describe_op(node)} on labels ({exc})") from None
    prop.set(node.outputs[0], g, p)


def pad(prop, node, args, kwargs) -> None:
    a = bind_args(SIGNATURES["pad"], args, kwargs)
    x = a["input"]
    prop.only_first_reached(node, x)
    mode = a.get("mode", "constant")
    where = describe_op(node)
    if mode == "constant":
        if prop.mode == SHIFT:
            raise Dead(f"{where} pads with constants, which are not shifted")
        if not is_zero(a.get("value")) and a.get("value") is not None:
            raise Dead(f"{where} pads with a non-zero constant")
        try:   # zeros scale with anything: give them the label of their neighbour
            g = F.pad(prop.g[x], a["pad"], mode="replicate")
        except Exception:
            raise Dead(f"cannot follow {where} on labels") from None
        return prop.set(node.outputs[0], g)
    try:
        g = F.pad(prop.g[x], a["pad"], mode=mode)
        p = F.pad(prop.p[x], a["pad"], mode=mode) if prop.mode == SHIFT else None
    except Exception:
        raise Dead(f"cannot follow {where} on labels") from None
    prop.set(node.outputs[0], g, p)
