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
projection (GPT-2's ``c_attn``) needs no pair: its own unit source reaches both sides.  With QK-norm
(Qwen3, OLMo2) the nearest source upstream of each side is the norm's weight, so the pair is q_norm γ ↔
k_norm γ; the projections' own scaling is absorbed by the norm, and a pair whose two sides are absorbed
before they meet is no pair (:func:`.engine.propagate`).

The key bias of a fused projection (:func:`key_bias_sources`) starts here too: the part of the bias that
reaches the key.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import elementwise, movement, normalisers
from .linear import LAYERS, contraction, contraction_sources, layer_sources
from .state import F64, SCALE, SHIFT, Dead, Propagation, Source, bind

DEPTH = 16      # calls between a projection and the product (view, transpose, rotary, repeat_kv, ...)


def _sources_of(node, graph) -> List[Source]:
    """The sources of a call that can scale what reaches a query or key: a projection, or the weight of
    a normaliser applied to its output (QK-norm: ``γ * x`` written out, or a normaliser call)."""
    if node.op in LAYERS:
        return layer_sources(node, graph)
    if node.op in ("matmul", "addmm", "einsum") and contraction(node) is not None:
        return contraction_sources(node, graph)
    if node.op == "mul":
        return elementwise.mul_sources(node, graph)
    if node.op in normalisers.NORMALISERS - {"normalize"}:
        return normalisers.sources(node, graph)
    return []


def _unit_source(node, graph) -> Optional[Source]:
    """The scale-of-units source of a call, or None."""
    return next((s for s in _sources_of(node, graph) if s.mode == SCALE), None)


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


def key_bias_sources(node, graph) -> List[Source]:
    """The key part of a fused projection's bias (GPT-2's ``c_attn``, timm's ``qkv``), shifted per element:
    the projection's own bias source shifts the query and value parts too, and dies.  The key's channels
    are those of the projection's output that reach the key operand through data movement alone (a
    rotary embedding on the way: none, the shift would depend on the position).  A separate key
    projection needs nothing here: all its channels reach the key."""
    _, k = _operands(node)
    if getattr(k, "kind", None) != "act":
        return []
    nk = _projection(k, graph)
    bias = next((s for s in _sources_of(nk, graph) if s.mode == SHIFT and s.what == "bias"), None) \
        if nk is not None else None
    channels = _channels_reaching(graph, nk, k) if bias is not None else None
    if not channels or len(channels) == bias.k0:
        return []
    lut = torch.full((bias.k0 + 1,), -1.0, dtype=F64)
    lut[torch.tensor(channels)] = torch.arange(len(channels), dtype=F64)
    g = lut[bias.g.long()]
    members = [(pn, lut[cm.long()], sign, view) for pn, cm, sign, view in bias.members]
    return [Source(SHIFT, nk, bias.layer, "key bias", len(channels), g,
                   torch.where(g >= 0, 0.0, -1.0).to(F64), members)]


def _channels_reaching(graph, proj, target) -> Optional[List[int]]:
    """The output channels of ``proj`` that ``target`` holds, followed through data movement only."""
    src = _unit_source(proj, graph)
    if src is None or target.producer is None:
        return None
    prop = Propagation(graph, src)
    prop.set(proj.outputs[0], src.g)
    for node in graph.nodes[proj.index + 1:target.producer.index + 1]:
        rule = movement.replay if node.op in movement.MOVE else \
            elementwise.identity if node.op in elementwise.IDENTITY else None
        if rule is None or not any(prop.reached(v) for v in node.inputs):
            continue
        args, kwargs = node.call_args()
        try:
            rule(prop, node, args, kwargs)
        except Dead:
            return None
    if not prop.reached(target):
        return None
    return sorted({int(x) for x in prop.g[target].unique().tolist() if x >= 0})


def matmul_sources(node, graph) -> List[Source]:
    """A parameter matrix used through ``@`` (:func:`.linear.contraction_sources`), or a query·key
    product of two activations (its Q/K pair, its fused key bias)."""
    return contraction_sources(node, graph) + sources(node, graph) + key_bias_sources(node, graph)


def sdpa_sources(node, graph) -> List[Source]:
    """The Q/K pair of ``scaled_dot_product_attention`` and its fused key bias."""
    return sources(node, graph) + key_bias_sources(node, graph)
