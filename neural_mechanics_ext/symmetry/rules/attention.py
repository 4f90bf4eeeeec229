"""Attention as one call: ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) and
``F.scaled_dot_product_attention``.

The attention weights depend on queries and keys only, so a scaling of the values passes through
(per value feature, merged over the sequence).  A query scaled per (head, dim) together with the key it
meets scaled by the inverse leaves every logit q·k unchanged (:func:`pair_inverse`, also used by
``matmul`` for eager attention); a query or key perturbed alone, or a perturbed mask, ends the candidate.
Keys shifted alike at every position (a key bias) leave the output unchanged: each logit of a query moves
by the same ``q·c``, which the softmax does not see.  For ``multi_head_attention_forward`` the input
projections read the perturbed tensor and compensate; its own Q/K, V/O and key bias are sources inside.
"""
from __future__ import annotations

from typing import List

import torch

from .state import (F64, SCALE, SHIFT, Dead, Source, axis_labels, bind, constant_rows, describe_op, fibers, op_layer,
                    param, position_labels)


def mha(prop, node, args, kwargs) -> None:
    a = bind(node, args, kwargs)
    where = describe_op(node)
    prop.no_shift(node)
    for key in ("attn_mask", "key_padding_mask", "in_proj_weight", "in_proj_bias", "out_proj_weight"):
        if prop.reached(a.get(key)):
            raise Dead(f"{where} reads the perturbed tensor as {key}")
    reps = []
    for key in ("query", "key", "value"):
        t = a.get(key)
        reps.append(prop.columns(prop.g[t], where) if prop.reached(t) else None)
    if a.get("use_separate_proj_weight", False):
        for rep, key in zip(reps, ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            if rep is not None:
                w = param(a.get(key))
                if w is None:
                    raise Dead(f"{where}: {key} is not a parameter")
                prop.consume(node, w, rep.view(1, -1).expand(w.shape))
        return
    w = param(a.get("in_proj_weight"))
    if w is None:
        raise Dead(f"{where}: in_proj_weight is not a parameter")
    E = w.shape[0] // 3
    cmap = torch.full(w.shape, -1.0, dtype=F64)
    for s, rep in enumerate(reps):
        if rep is not None:
            cmap[s * E:(s + 1) * E] = rep.view(1, -1).expand(E, w.shape[1])
    prop.consume(node, w, cmap)


def pair_inverse(prop, node, q: torch.Tensor, k: torch.Tensor) -> None:
    """A product contracting ``q``'s last axis with ``k``'s (labels per contracted index, broadcast over
    the rest) is unchanged when the key index carries the inverse scaling of the query index it meets:
    join each such pair with odd parity.  A scaled index meeting an unscaled one changes the product."""
    where = describe_op(node)
    prop.no_shift(node)
    if prop.in_degrees != {1.0}:
        raise Dead(f"{where} multiplies tensors scaled to a power other than 1")
    try:
        q, k = torch.broadcast_tensors(q, k)
    except RuntimeError:
        raise Dead(f"cannot follow {where} on labels") from None
    if bool(((q < 0) != (k < 0)).any()):
        raise Dead(f"{where}: a perturbed query (key) index meets an unperturbed key (query) index")
    m = q >= 0
    for a, b in torch.unique(torch.stack([q[m], k[m]], 1), dim=0).tolist():
        prop.uf.union(int(a), int(b), odd=1)
    prop.paired.append(node)


def _per_head_dim(prop, t, where) -> torch.Tensor:
    """Labels of a [..., heads, seq, dim] tensor merged over the sequence: [..., heads, dim]."""
    rows, kept = fibers(prop.g[t], [len(t.shape) - 2])
    return prop.merge_rows(rows, where).view(kept)


def sdpa(prop, node, args, kwargs) -> None:
    a = bind(node, args, kwargs)
    where = describe_op(node)
    if prop.mode == SHIFT:
        return _key_shift(prop, node, a)
    if prop.reached(a.get("attn_mask")):
        raise Dead(f"{where}: the attn_mask is perturbed (attention weights would change)")
    q, k = a["query"], a["key"]
    if prop.reached(q) != prop.reached(k):
        which = "query" if prop.reached(q) else "key"
        raise Dead(f"{where}: the {which} is perturbed alone (attention weights would change)")
    if prop.reached(q):
        lq, lk = _per_head_dim(prop, q, where), _per_head_dim(prop, k, where)
        if len(q.shape) >= 3 and lq.shape[-2] != lk.shape[-2]:    # grouped-query: head h reads kv h // n_rep
            lk = lk.repeat_interleave(lq.shape[-2] // lk.shape[-2], dim=-2)
        pair_inverse(prop, node, lq, lk)
    v, out = a["value"], node.outputs[0]
    if not prop.reached(v):
        return
    rows, kept = fibers(prop.g[v], [len(v.shape) - 2])
    rep = prop.merge_rows(rows, where).view(kept).unsqueeze(-2)
    if a.get("enable_gqa", False) and len(v.shape) >= 3 and out.shape[-3] != v.shape[-3]:
        # grouped-query attention: query head h reads kv head h // (H / G)
        rep = rep.repeat_interleave(out.shape[-3] // v.shape[-3], dim=-3)
    prop.set_bcast(node, out, rep)


def _key_shift(prop, node, a) -> None:
    """Keys shifted by the same vector ``c`` at every position (a key bias): each logit of query ``s``
    gains ``q_s·c`` at every key, masked or not, which the softmax inside the call does not see; the
    output is unchanged.  A shifted query or value, a perturbed mask or a shift that differs between
    keys changes it."""
    where = describe_op(node)
    for key in ("query", "value", "attn_mask"):
        if prop.reached(a.get(key)):
            raise Dead(f"{where}: the {key} is shifted (attention weights or output would change)")
    k = a["key"]
    axis = len(k.shape) - 2
    if not (constant_rows(fibers(prop.g[k], [axis])[0]) and constant_rows(fibers(prop.p[k], [axis])[0])):
        raise Dead(f"{where}: the keys are shifted differently at different positions")
    prop.absorbers.append(node)


def mha_sources(node, graph) -> List[Source]:
    """The symmetries ``multi_head_attention_forward`` compensates inside the call (its output is
    unchanged): Q/K, query row ``j`` of the packed ``in_proj_weight`` (and bias) × α against key row
    ``E + j`` × 1/α (no rotary embedding inside), and V/O, value row ``2E + j`` (and bias) × α against
    column ``j`` of ``out_proj_weight`` × 1/α; and the key bias, ``in_proj_bias[E + j]`` shifted (translation,
    one group per element; not with ``add_zero_attn``, a key it does not shift).  Not with separate
    projection weights, ``bias_k``/``bias_v`` (an extra key and value that no row scales or shifts) or with
    a parameter read twice."""
    a = bind(node)
    w, b, wo = param(a.get("in_proj_weight")), param(a.get("in_proj_bias")), param(a.get("out_proj_weight"))
    if w is None or wo is None or a.get("use_separate_proj_weight", False) \
            or a.get("bias_k") is not None or a.get("bias_v") is not None:
        return out_projection_sources(node, graph)
    E = w.shape[0] // 3
    layer = op_layer(node, graph)

    def rows(first, sign):      # rows first … first+E−1 of the packed weight (and bias) are groups 0 … E−1
        cm = torch.full((3 * E,), -1, dtype=torch.long)
        cm[first:first + E] = torch.arange(E)
        out = [(w.name, cm.view(-1, 1).expand(w.shape), sign, None)]
        return out + ([(b.name, cm, sign, None)] if b is not None else [])
    qk = rows(0, 1) + rows(E, -1)
    vo = rows(2 * E, 1) + [(wo.name, torch.arange(E).view(1, -1).expand(wo.shape), -1, None)]
    out = [Source(SCALE, node, layer, what, E, None, None, members, inside=True)
           for what, members in (("query·key", qk), ("value·output", vo))]
    if b is not None and not a.get("add_zero_attn", False):     # a zero key would not be shifted
        out.append(Source(SHIFT, node, layer, "key bias", E, None, None, rows(E, 1)[1:], inside=True))
    return out + out_projection_sources(node, graph)


def out_projection_sources(node, graph) -> List[Source]:
    """The out-projection ends the call (``y = o @ W_outᵀ + b_out``): shifting its input column ``j`` adds
    ``α·o_j`` to every output feature of a position, shifting ``b_out[k]`` adds ``α`` to feature ``k`` — the
    shifts of :func:`.linear.layer_sources`, found by a LayerNorm after the residual (torchvision's ViT)."""
    a = bind(node)
    wo, bo = param(a.get("out_proj_weight")), param(a.get("out_proj_bias"))
    y = node.outputs[0]
    if wo is None or y is None or len(wo.shape) != 2:
        return []
    layer, cdim = op_layer(node, graph), len(y.shape) - 1
    out = [Source(SHIFT, node, layer, "columns", 1, torch.zeros(y.shape, dtype=F64), position_labels(y.shape, cdim),
                  [(wo.name, None, 1, (wo.shape[0], wo.shape[1], 1))])]
    if bo is not None:
        C = bo.shape[0]
        out.append(Source(SHIFT, node, layer, "bias", C, axis_labels(y.shape, cdim, C), torch.zeros(y.shape, dtype=F64),
                          [(bo.name, torch.arange(C), 1, None)]))
    return out
