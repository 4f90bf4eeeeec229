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
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..capture import SIGNATURES, Value, bind_args
from .attention import pair_inverse
from .state import (F64, SCALE, SHIFT, Dead, Source, axis_labels, bind, constant_rows, describe_op, fibers,
                    is_zero, op_layer, param, position_labels)

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
    """``a @ b`` (``mm``, ``bmm``) with one perturbed operand (see :func:`_product`)."""
    a, b = args[0], args[1]
    if node.reversed:
        a, b = b, a
    lab = _product(prop, node, a, b)
    if lab is not None:
        prop.set_bcast(node, node.outputs[0], lab)


def addmm(prop, node, args, kwargs) -> None:
    """``input + mat1 @ mat2`` (``addmm``, ``baddbmm``: GPT-2's ``Conv1D``).  The product follows
    :func:`_product`; the added ``input`` does not scale, so a scaling that reaches the output dies."""
    a = bind_args(SIGNATURES[node.op], args, kwargs)
    m1, m2 = (a["mat1"], a["mat2"]) if node.op == "addmm" else (a["batch1"], a["batch2"])
    where = describe_op(node)
    if prop.reached(a["input"]):
        raise Dead(f"{where} reads the perturbed tensor as the added term")
    lab = _product(prop, node, m1, m2)
    if lab is not None:
        if not is_zero(a.get("beta", 1)):
            raise Dead(f"{where} adds a tensor that does not scale (a bias)")
        prop.set_bcast(node, node.outputs[0], lab)


def _product(prop, node, a, b) -> Optional[torch.Tensor]:
    """``a @ b`` with one perturbed operand: a parameter matrix compensates (its rows for ``x @ W``, its
    columns for ``W @ x``; returns None); an activation carries the labels of the non-contracted axis
    (returned, to broadcast onto the output)."""
    where = describe_op(node)
    if prop.mode == SHIFT:
        return _shifted_product(prop, node, a, b)
    ra, rb = prop.reached(a), prop.reached(b)
    if ra and rb:       # query @ keyᵀ: invariant when each key index carries the inverse of its query index
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise Dead(f"{where} multiplies two perturbed tensors")
        rows_a, kept_a = fibers(prop.g[a], [len(a.shape) - 2])
        rows_b, kept_b = fibers(prop.g[b], [len(b.shape) - 1])
        pair_inverse(prop, node, prop.merge_rows(rows_a, where).view(kept_a),
                     prop.merge_rows(rows_b, where).view(kept_b))
        return None
    if ra and len(a.shape) >= 2:
        if param(b) is not None and len(b.shape) == 2:      # x @ W: rows of W compensate
            rep = prop.columns(prop.g[a], where)
            prop.consume(node, b, rep.view(-1, 1).expand(b.shape))
            return None
        if isinstance(b, Value) and len(b.shape) >= 2:
            rows, kept = fibers(prop.g[a], [len(a.shape) - 1])
            return prop.merge_rows(rows, where).view(kept).unsqueeze(-1)
    if rb and len(b.shape) >= 2:
        if param(a) is not None and len(a.shape) == 2:      # W @ x: columns of W compensate
            lb = prop.g[b]
            rows = lb.movedim(-2, 0).reshape(lb.shape[-2], -1)
            prop.consume(node, a, prop.merge_rows(rows, where).view(1, -1).expand(a.shape))
            return None
        if isinstance(a, Value) and len(a.shape) >= 2:
            rows, kept = fibers(prop.g[b], [len(b.shape) - 2])
            return prop.merge_rows(rows, where).view(kept).unsqueeze(-2)
    raise Dead(f"{where}: unsupported operand layout")


def _shifted_product(prop, node, a, b) -> None:
    """``a @ b`` of two activations, one shifted by the same vector all along its kept axis — a key bias
    reaching ``query @ keyᵀ``: ``k_t + c`` for every key ``t``.  Row ``s`` of the product then gains
    ``q_s · c`` at every key: a shift uniform along the other operand's kept axis (which a softmax over it
    absorbs), a new value per row, made of the shifts of every group ``c`` holds (a mixture label, which
    leaves them separate groups).  A shift that varies along the kept axis (a query bias, seen from the
    keys; a value bias, contracted) or a parameter operand ends the candidate."""
    where = describe_op(node)
    ra, rb = prop.reached(a), prop.reached(b)
    if ra == rb or not all(isinstance(x, Value) and x.kind != "param" and len(x.shape) >= 2 for x in (a, b)):
        raise Dead(f"{where} does not preserve a shift")
    x = b if rb else a
    kept = -1 if rb else -2     # the axis that survives: b [..., d, t] (keyᵀ), a [..., s, d]
    g, p = prop.g[x], prop.p[x]
    if not (constant_rows(fibers(g, [kept])[0]) and constant_rows(fibers(p, [kept])[0])):
        raise Dead(f"{where}: the shift varies along the axis the product keeps")
    g0 = g.select(kept, 0)      # [..., d]: the groups of the shift vector c
    rows = g0.reshape(-1, g0.shape[-1])
    mixed = torch.tensor([float(prop.uf.mixture(r[r >= 0].tolist())) if bool((r >= 0).any()) else -1.0
                          for r in rows], dtype=F64).view(g0.shape[:-1])
    out = node.outputs[0]
    shape = list(out.shape)
    shape[kept] = 1             # uniform along x's kept axis, a new value at every other index
    n = math.prod(shape)
    fresh = (prop.composite + torch.arange(n, dtype=F64)).view(shape)
    prop.composite += n
    lab = torch.broadcast_to(mixed.view(*mixed.shape, 1, 1), out.shape).clone()
    prop.set(out, lab, torch.where(lab >= 0, torch.broadcast_to(fresh, out.shape), torch.full_like(lab, -1.0)))


# ---------------------------------------------------------------------- a parameter matrix, any orientation
@dataclass
class Contraction:
    """``y`` = activation ``x`` times parameter matrix ``w``: ``w``'s axis ``w_in`` is contracted with
    ``x``'s axis ``x_in``; ``w``'s other axis becomes ``y``'s axis ``y_out``; ``bias`` is added."""

    x: Value
    w: Value
    w_in: int
    x_in: int
    y_out: int
    bias: Optional[Value] = None


def contraction(node) -> Optional[Contraction]:
    """How a ``matmul``/``addmm``/``einsum`` call uses a 2-D parameter matrix, or None."""
    args, kwargs = node.call_args()
    if node.op == "einsum":
        return _einsum_contraction(node, args)
    bias = None
    if node.op == "addmm":
        a = bind_args(SIGNATURES["addmm"], args, kwargs)
        if not (a.get("beta", 1) == 1 and a.get("alpha", 1) == 1):
            return None
        m1, m2, bias = a["mat1"], a["mat2"], param(a["input"])
    else:
        m1, m2 = (args[1], args[0]) if node.reversed else (args[0], args[1])
    if param(m2) is not None and len(m2.shape) == 2 and isinstance(m1, Value) and m1.kind != "param" \
            and len(m1.shape) >= 1:
        return Contraction(m1, m2, 0, len(m1.shape) - 1, len(node.outputs[0].shape) - 1, bias)
    if param(m1) is not None and len(m1.shape) == 2 and isinstance(m2, Value) and m2.kind != "param" \
            and len(m2.shape) >= 2:
        return Contraction(m2, m1, 1, len(m2.shape) - 2, len(node.outputs[0].shape) - 2, bias)
    return None


def _einsum_contraction(node, args) -> Optional[Contraction]:
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    spec = einsum_spec(args[0], [len(v.shape) if isinstance(v, Value) else 0 for v in ops])
    if spec is None or len(ops) != 2:
        return None
    (sa, sb), out = spec
    for (sx, x), (sw, w) in (((sa, ops[0]), (sb, ops[1])), ((sb, ops[1]), (sa, ops[0]))):
        if param(w) is None or len(w.shape) != 2 or not isinstance(x, Value) or x.kind == "param":
            continue
        i_ax = [k for k, c in enumerate(sw) if c in sx and c not in out]
        o_ax = [k for k, c in enumerate(sw) if c in out and c not in sx]
        if len(sw) == 2 and len(set(sw)) == 2 and len(i_ax) == 1 and len(o_ax) == 1:
            return Contraction(x, w, i_ax[0], sx.index(sw[i_ax[0]]), out.index(sw[o_ax[0]]))
    return None


def einsum_spec(equation: str, ndims):
    """``((operand specs), output spec)`` of an einsum equation with ``...`` expanded to letters."""
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(ndims):
        return None
    spare = [c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eq]
    width = max([n - len(s.replace("...", "")) for s, n in zip(specs, ndims) if "..." in s] or [0])
    ell = "".join(spare[:width])

    def expand(s, n):
        return s.replace("...", ell[width - (n - len(s.replace("...", ""))):]) if "..." in s else s
    specs = [expand(s, n) for s, n in zip(specs, ndims)]
    if "->" in eq:
        out = rhs.replace("...", ell)
    else:
        letters = "".join(specs)
        out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell))
    return specs, out


def contraction_sources(node, graph) -> List[Source]:
    """Scale of each output unit of ``w`` (and bias), shift of each input slice of ``w``, shift of each
    bias element: :func:`layer_sources` for a parameter matrix used through ``@``/``addmm``/``einsum``."""
    c = contraction(node)
    if c is None:
        return []
    y = node.outputs[0]
    w_out = 1 - c.w_in
    C = c.w.shape[w_out]
    layer = op_layer(node, graph)
    g = axis_labels(y.shape, c.y_out, C)
    shape = [1, 1]
    shape[w_out] = C
    members = [(c.w.name, torch.arange(C).view(shape).expand(c.w.shape), 1, None)]
    bias_ok = c.bias is not None and c.bias.shape[-1:] == (C,) and math.prod(c.bias.shape) == C \
        and c.y_out % len(y.shape) == len(y.shape) - 1
    if bias_ok:
        members.append((c.bias.name, torch.arange(C), 1, None))
    n_in = c.w.shape[c.w_in]
    view = (C, n_in, 1) if c.w_in == 1 else (1, n_in, C)
    out = [Source(SCALE, node, layer, "units", C, g, None, members),
           Source(SHIFT, node, layer, "columns" if c.w_in == 1 else "rows", 1, torch.zeros(y.shape, dtype=F64),
                  position_labels(y.shape, c.y_out), [(c.w.name, None, 1, view)])]
    if bias_ok:
        out.append(Source(SHIFT, node, layer, "bias", C, g.clone(), torch.zeros(y.shape, dtype=F64),
                          [(c.bias.name, torch.arange(C), 1, None)]))
    return out


def einsum(prop, node, args, kwargs) -> None:
    """``einsum`` of a perturbed activation with a parameter matrix (which compensates) or with an
    unperturbed activation (the labels of the axes kept in the output survive, contracted ones merge)."""
    where = describe_op(node)
    prop.no_shift(node)
    c = contraction(node)
    if c is not None and prop.reached(c.x):
        prop.only_first_reached(node, c.x)
        rows, _ = fibers(prop.g[c.x].movedim(c.x_in, -1), list(range(len(c.x.shape) - 1)))
        rep = prop.merge_rows(rows, where)
        shape = [1, 1]
        shape[c.w_in] = -1
        return prop.consume(node, c.w, rep.view(shape).expand(c.w.shape))
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    reached = [k for k, v in enumerate(ops) if prop.reached(v)]
    spec = einsum_spec(args[0], [len(v.shape) if isinstance(v, Value) else 0 for v in ops])
    if len(reached) != 1 or spec is None:
        raise Dead(f"{where} multiplies two perturbed tensors" if len(reached) > 1 else f"{where}: unsupported")
    sx, out = spec[0][reached[0]], spec[1]
    lab = prop.g[ops[reached[0]]]
    gone = [k for k, ch in enumerate(sx) if ch not in out]
    if len(set(sx)) != len(sx):
        raise Dead(f"{where}: repeated index in a perturbed operand")
    rows, kept = fibers(lab, gone)
    rep = prop.merge_rows(rows, where).view(kept)
    kept_letters = [ch for ch in sx if ch in out]
    sizes = dict(zip(kept_letters, kept))
    order = sorted(range(len(kept_letters)), key=lambda k: out.index(kept_letters[k]))
    rep = rep.permute(order) if kept_letters else rep
    shape = [sizes.get(ch, 1) for ch in out]
    prop.set_bcast(node, node.outputs[0], rep.reshape(shape))
