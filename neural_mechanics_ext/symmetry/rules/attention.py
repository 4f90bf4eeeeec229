"""Attention as one call: ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) and
``F.scaled_dot_product_attention``.

The attention weights depend on queries and keys only, so a scaling of the values passes through
(per value feature, merged over the sequence); a perturbed query, key or mask ends the candidate.  For
``multi_head_attention_forward`` the input projections read the perturbed tensor and compensate.
"""
from __future__ import annotations

import torch

from .state import F64, Dead, bind, describe_op, fibers, param


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


def sdpa(prop, node, args, kwargs) -> None:
    a = bind(node, args, kwargs)
    where = describe_op(node)
    prop.no_shift(node)
    for key in ("query", "key", "attn_mask"):
        if prop.reached(a.get(key)):
            raise Dead(f"{where}: the {key} is perturbed (attention weights would change)")
    v, out = a["value"], node.outputs[0]
    rows, kept = fibers(prop.g[v], [len(v.shape) - 2])
    rep = prop.merge_rows(rows, where).view(kept).unsqueeze(-2)
    if a.get("enable_gqa", False) and len(v.shape) >= 3 and out.shape[-3] != v.shape[-3]:
        # grouped-query attention: query head h reads kv head h // (H / G)
        rep = rep.repeat_interleave(out.shape[-3] // v.shape[-3], dim=-3)
    prop.set_bcast(node, out, rep)
