"""Data movement: views, permutations, indexing, concatenation, padding.

These ops are *replayed* on the label tensors (the recorded call runs again with labels in place of the
activations), so flatten blocks, head splits and channel concatenations are followed exactly rather than
pattern-matched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capture import SIGNATURES, Value, bind_args
from .state import F64, SHIFT, Dead, describe_op, is_zero

MOVE = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
        "movedim", "squeeze", "unsqueeze", "expand", "expand_as", "broadcast_to", "repeat", "tile",
        "narrow", "select", "getitem", "chunk", "split", "split_with_sizes", "tensor_split", "unbind",
        "cat", "stack", "hstack", "vstack", "flip", "roll", "index_select", "gather", "masked_select",
        "property_T", "property_mT", "ravel"}


def replay(prop, node, args, kwargs) -> None:
    gl = prop.rerun(node, prop.g)
    pl = prop.rerun(node, prop.p) if prop.mode == SHIFT else [None] * len(gl)
    for out, g, p in zip(node.outputs, gl, pl):
        if out is not None and isinstance(g, torch.Tensor) and out.is_float:
            if bool((g >= 0).any()):
                prop.set(out, g.to(F64), None if p is None else p.to(F64))


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
