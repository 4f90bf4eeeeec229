"""Query·key sources: the two projections whose outputs meet in an attention product, scaled together.

Scaling query unit ``i`` of a head by ``α`` and the key unit it meets by ``1/α`` leaves every logit
``q·k`` unchanged.  With separate projections (Llama, BERT, Mistral: ``q_proj``, ``k_proj``) neither
projection's scaling survives alone, so the candidate starts at both at once: the query projection's
units are labels ``0 … Cq−1``, the key projection's ``Cq … Cq+Ck−1``, and the product that contracts them
(``scaled_dot_product_attention``, or ``matmul(q, kᵀ)`` in eager attention) joins each query label with
the key label it meets, with inverse scaling (:func:`.attention.pair_inverse`).  Everything between the
projections and the product — head splits, rotary embeddings (which merge the dims of a rotation pair),
``repeat_kv`` (which merges the query heads sharing a kv head) — is followed by the ordinary handlers, so
the groups come out per (head, dim), per rotation pair, per kv head, as the code dictates.  A fused
projection (GPT-2's ``c_attn``) needs no pair: its own unit source reaches both sides.
"""
from __future__ import annotations

from typing import List, Optional

from .linear import LAYERS, contraction, contraction_sources, layer_sources
from .state import F64, SCALE, Source, bind

DEPTH = 16      # calls between a projection and the product (view, transpose, rotary, repeat_kv, ...)


def _unit_source(node, graph) -> Optional[Source]:
    """The scale-of-units source of a projection call, or None."""
    if node.op in LAYERS:
        srcs = layer_sources(node, graph)
    elif node.op in ("matmul", "addmm", "einsum") and contraction(node) is not None:
        srcs = contraction_sources(node, graph)
    else:
        return None
    return next((s for s in srcs if s.mode == SCALE), None)


def _projection(v, graph):
    """The nearest projection upstream of activation ``v`` (breadth first through activations), or None
    when there is none or two at the same distance."""
    frontier, seen = [v], {v.index}
    for _ in range(DEPTH):
        found, nxt = [], []
        for u in frontier:
            node = u.producer
            if node is None:
                continue
            if u is node.outputs[0] and _unit_source(node, graph) is not None:
                found.append(node)
                continue
            for x in node.inputs:
                if x.kind == "act" and x.index not in seen:
                    seen.add(x.index)
                    nxt.append(x)
        if found:
            return found[0] if len({n.index for n in found}) == 1 else None
        frontier = nxt
    return None


def _operands(node):
    if node.op == "scaled_dot_product_attention":
        a = bind(node)
        return a.get("query"), a.get("key")
    args, _ = node.call_args()
    a, b = args[0], args[1]
    return (b, a) if node.reversed else (a, b)


def sources(node, graph) -> List[Source]:
    """The query·key source of an attention product whose operands come from two projections."""
    q, k = _operands(node)
    if not all(getattr(x, "kind", None) == "act" for x in (q, k)):
        return []
    nq, nk = _projection(q, graph), _projection(k, graph)
    if nq is None or nk is None or nq is nk:
        return []
    first, second = sorted((nq, nk), key=lambda n: n.index)
    sa, sb = _unit_source(first, graph), _unit_source(second, graph)
    shift = sa.k0
    g_b = sb.g.clone()
    g_b[g_b >= 0] += shift
    members = list(sa.members) + [(pn, cm + shift, sign, view) for pn, cm, sign, view in sb.members]
    return [Source(SCALE, first, f"{sa.layer} ↔ {sb.layer}", "query·key", sa.k0 + sb.k0, sa.g, None,
                   members, more=[(second.outputs[0], g_b.to(F64))])]


def matmul_sources(node, graph) -> List[Source]:
    """A parameter matrix used through ``@`` (:func:`.linear.contraction_sources`), or a query·key
    product of two activations."""
    return contraction_sources(node, graph) + sources(node, graph)
