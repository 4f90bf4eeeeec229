"""Layers that multiply by a weight: ``linear``, convolutions, transposed convolutions, ``matmul`` (and
``mm``/``bmm``/``@``), and the embedding lookup.

As sources: scaling output channel ``k`` (``W[k], b[k]``) scales that channel; shifting the bias ``b[k]``
adds to it; shifting input column ``j`` of a Linear/Conv weight adds ``α·x_j`` to every output feature (one
shift per position, uniform over features); shifting an embedding row shifts every position holding that
token.  As compensators: a layer reading a scaled channel absorbs the scaling in its slice for that
channel, which becomes the outgoing side ``A2`` of a rescale group.
"""
from __future__ import annotations

import math
from typing import List

import torch

from ..capture import Value
from .state import (F64, SCALE, SHIFT, Dead, Source, axis_labels, bind, describe_op, fibers, op_layer, param,
                    position_labels)

CONVS = {f"conv{k}d" for k in (1, 2, 3)}
CONV_TRANSPOSES = {f"conv_transpose{k}d" for k in (1, 2, 3)}
LAYERS = {"linear"} | CONVS | CONV_TRANSPOSES


# ---------------------------------------------------------------------- sources
def layer_sources(node, graph) -> List[Source]:
    """Scale of each output unit, shift of the input columns, shift of each bias element."""
    a = bind(node)
    w, b = param(a.get("weight")), param(a.get("bias"))
    if w is None:
        return []
    op, y = node.op, node.outputs[0]
    layer = op_layer(node, graph)
    cdim = len(y.shape) - 1 if op == "linear" else 1
    C = y.shape[cdim]
    g = axis_labels(y.shape, cdim, C)
    if op in CONV_TRANSPOSES:     # weight [in, out/groups, ...]: output channel = group offset + column
        groups = int(a.get("groups", 1))
        cin, opg = w.shape[0], w.shape[1]
        grp = torch.arange(cin) // (cin // groups)
        wmap = (grp.view(-1, 1) * opg + torch.arange(opg).view(1, -1))
        wmap = wmap.view(cin, opg, *([1] * (len(w.shape) - 2))).expand(w.shape)
    else:
        wmap = torch.arange(C).view(C, *([1] * (len(w.shape) - 1))).expand(w.shape)
    members = [(w.name, wmap, 1, None)]
    if b is not None:
        members.append((b.name, torch.arange(C), 1, None))
    out = [Source(SCALE, node, layer, "units", C, g, None, members)]
    groups = int(a.get("groups", 1)) if op != "linear" else 1
    if op not in CONV_TRANSPOSES and groups == 1:
        n_in = math.prod(w.shape) // w.shape[0]
        out.append(Source(SHIFT, node, layer, "columns", 1, torch.zeros(y.shape, dtype=F64),
                          position_labels(y.shape, cdim), [(w.name, None, 1, (w.shape[0], n_in, 1))]))
    if b is not None:
        out.append(Source(SHIFT, node, layer, "bias", C, g.clone(), torch.zeros(y.shape, dtype=F64),
                          [(b.name, torch.arange(C), 1, None)]))
    return out


def embedding_sources(node, graph) -> List[Source]:
    """Scale of each embedding dimension, shift of each row."""
    a = bind(node)
    w = param(a.get("weight"))
    if w is None or a.get("max_norm") is not None:
        return []
    y = node.outputs[0]
    layer = op_layer(node, graph)
    V, D = w.shape
    g = axis_labels(y.shape, len(y.shape) - 1, D)
    p = position_labels(y.shape, len(y.shape) - 1)
    return [Source(SCALE, node, layer, "units", D, g, None,
                   [(w.name, torch.arange(D).view(1, D).expand(V, D), 1, None)]),
            Source(SHIFT, node, layer, "rows", 1, torch.zeros(y.shape, dtype=F64), p,
                   [(w.name, None, 1, (1, V, D))])]


# ---------------------------------------------------------------------- compensators
def layer(prop, node, args, kwargs) -> None:
    """A Linear/Conv reading the scaled tensor: its input slices compensate."""
    a = bind(node, args, kwargs)
    x = a["input"]
    where = describe_op(node)
    prop.no_shift(node)
    prop.only_first_reached(node, x)
    w = param(a.get("weight"))
    if w is None:
        raise Dead(f"{where} has a computed (not parameter) weight")
    if node.op == "linear":
        rep = prop.columns(prop.g[x], where)
        return prop.consume(node, w, rep.view(1, -1).expand(w.shape))
    rep = prop.channels(prop.g[x], where)
    if node.op in CONV_TRANSPOSES:
        return prop.consume(node, w, rep.view(-1, *([1] * (len(w.shape) - 1))).expand(w.shape))
    groups = int(a.get("groups", 1))
    out_c, m = w.shape[0], w.shape[1]
    opg = out_c // groups
    idx = (torch.arange(out_c) // opg).view(-1, 1) * m + torch.arange(m).view(1, -1)
    cmap = rep[idx].view(out_c, m, *([1] * (len(w.shape) - 2))).expand(w.shape)
    prop.consume(node, w, cmap)


def matmul(prop, node, args, kwargs) -> None:
    """``a @ b`` with one perturbed operand: a parameter matrix compensates (its rows for ``x @ W``, its
    columns for ``W @ x``); an activation carries the labels of the non-contracted axis."""
    a, b = args[0], args[1]
    if node.reversed:
        a, b = b, a
    where = describe_op(node)
    prop.no_shift(node)
    ra, rb = prop.reached(a), prop.reached(b)
    out = node.outputs[0]
    if ra and rb:
        raise Dead(f"{where} multiplies two perturbed tensors")
    if ra and len(a.shape) >= 2:
        if param(b) is not None and len(b.shape) == 2:      # x @ W: rows of W compensate
            rep = prop.columns(prop.g[a], where)
            return prop.consume(node, b, rep.view(-1, 1).expand(b.shape))
        if isinstance(b, Value) and len(b.shape) >= 2:
            rows, kept = fibers(prop.g[a], [len(a.shape) - 1])
            rep = prop.merge_rows(rows, where).view(kept)
            return prop.set_bcast(node, out, rep.unsqueeze(-1))
    if rb and len(b.shape) >= 2:
        if param(a) is not None and len(a.shape) == 2:      # W @ x: columns of W compensate
            lb = prop.g[b]
            rows = lb.movedim(-2, 0).reshape(lb.shape[-2], -1)
            rep = prop.merge_rows(rows, where)
            return prop.consume(node, a, rep.view(1, -1).expand(a.shape))
        if isinstance(a, Value) and len(a.shape) >= 2:
            rows, kept = fibers(prop.g[b], [len(b.shape) - 2])
            rep = prop.merge_rows(rows, where).view(kept)
            return prop.set_bcast(node, out, rep.unsqueeze(-2))
    raise Dead(f"{where}: unsupported operand layout")
