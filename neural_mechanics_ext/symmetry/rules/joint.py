"""Joint candidates: every writer of a tensor scaled at once (THEORY_TRANSFORMERS.md, "Residual stream",
"Post-LN blocks").

A scaling of one layer's output that reaches a sum with another layer's output dies there: a residual
join.  In a transformer the sum is the residual stream, and scaling *every* writer of the stream together
is a symmetry when every reader of the stream absorbs or compensates it:

* a pre-norm transformer: token and position tables, class token, patch projection and every
  out-projection × α; only normalisers read the stream (a scale group);
* the same with the embedding tied to the lm_head: the lm_head would scale the logits, so the final
  norm's affine is scaled by 1/α against it (one rescale);
* post-LN BERT: the previous LayerNorm and the sublayer's output dense × α, the sublayer's input
  projections × 1/α, the sublayer's LayerNorm absorbs (one rescale per sublayer); the embedding tables
  together (the embedding LayerNorm absorbs).

The closure: start from a layer whose own candidate died at a join, taken as a whole (one group: every
reader of a stream merges its channels); propagate; where it dies at a sum (or has met unperturbed parts
in a concatenation), add the *writers* of the unperturbed operand — found by walking back through copies,
dropout, views, concatenations and sums to the calls whose parameters scale their output — and propagate
again, until it survives or dies at something no writer can fix.  A parameter with several uses (an
embedding that is also the lm_head) is accepted only when each use is accounted for: a use that would
scale its own output gets the activation it reads scaled by 1/α by that activation's writers.

Seeds are Linear-type layers and LayerNorm/RMSNorm affines only: convolution/BatchNorm streams (a ResNet
stage) are not joined, so the CNN families of THEORY.md stay what they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..capture import Graph, Value
from .elementwise import IDENTITY, _param_and_activation
from .engine import propagate
from .linear import LAYERS, contraction
from .movement import JOINS, MOVE
from .normalisers import NORMALISERS
from .state import DROPOUT, F64, SCALE, Dead, Propagation, Source, bind, describe_op, layer_name, op_layer, param

SEED_OPS = {"linear", "addmm", "matmul", "einsum", "embedding", "layer_norm", "rms_norm"}
SUMS = {"add", "sub"}
WALK = IDENTITY | DROPOUT | MOVE | SUMS | {"mul", "div"}
MAX_ROUNDS = 512        # one writer (or a set of them) joins per round: bounded by the writers of a model


@dataclass(frozen=True)
class Writer:
    """Parameters whose common scaling scales ``value`` (a parameter writes itself); ``node_index``: the
    call that writes it, -1 for a parameter."""

    value: Value
    params: Tuple[str, ...]
    node_index: int


def scaled_params(node) -> Tuple[str, ...]:
    """The parameters of ``node`` whose common scaling by α scales its first output by α (none: ``()``)."""
    a = bind(node)
    if node.op in LAYERS or node.op in NORMALISERS:
        w, b = param(a.get("weight")), param(a.get("bias"))
        return () if w is None else tuple(p.name for p in (w, b) if p is not None)
    if node.op in ("addmm", "matmul", "einsum"):
        c = contraction(node)
        return () if c is None else tuple(p.name for p in (c.w, c.bias) if p is not None)
    if node.op == "embedding":
        w = param(a.get("weight"))
        return () if w is None or a.get("max_norm") is not None else (w.name,)
    if node.op == "multi_head_attention_forward":
        w, b = param(a.get("out_proj_weight")), param(a.get("out_proj_bias"))
        return () if w is None else tuple(p.name for p in (w, b) if p is not None)
    if node.op == "mul":
        w, _ = _param_and_activation(node)
        return () if w is None else (w.name,)
    return ()


def writers_of(v: Value, depth: int = 0) -> Optional[List[Writer]]:
    """The writers whose common scaling scales activation ``v``, or None where some part of it has none
    (a model input, an activation function, a product of activations)."""
    if v.kind == "param":
        return [Writer(v, (v.name,), -1)]
    node = v.producer
    if node is None or depth > 64:
        return None
    params = scaled_params(node) if v is node.outputs[0] else ()
    if params:
        return [Writer(node.outputs[0], params, node.index)]
    if node.op not in WALK:
        return None
    floats = [x for x in dict.fromkeys(node.inputs) if x.is_float]
    if node.op in SUMS:         # a parameter added is joined by the propagation (a bias after a scaled term)
        terms = [x for x in floats if x.kind != "param"]
    elif node.op in JOINS:
        terms = floats
    elif node.op in ("mul", "div"):     # by a constant (a scaled embedding: x · √d), not by an activation
        terms = [x for x in floats if x.kind not in ("const", "buffer")]
        if len(terms) != 1 or (node.op == "div" and terms[0] is not floats[0]):
            return None
    else:                       # a copy, view, dropout of its first input
        terms = floats[:1]
    if not terms:
        return None
    out: List[Writer] = []
    for x in terms:       # a sum or concatenation scales when every term does
        ws = writers_of(x, depth + 1)
        if ws is None:
            return None
        out.extend(w for w in ws if w not in out)
    return out


def joint_sources(graph: Graph, deaths: List[Tuple[Source, Dead]], refused: Optional[List[str]] = None
                  ) -> List[Source]:
    """One joint source per closure that survives, from the scale sources that died at a join.  A closure
    whose writers all survive but whose tied parameter has a use nothing can compensate appends its reason
    to ``refused``."""
    out: List[Source] = []
    taken = set()       # writer outputs already in a closure (found or failed): the same closure again
    for src, dead in deaths:
        if src.mode != SCALE or src.what != "units" or src.node.op not in SEED_OPS or src.more or src.inside:
            continue
        if src.node.outputs[0].index in taken or not (dead.needs or (dead.prop and dead.prop.wants)):
            continue
        params = scaled_params(src.node)
        if not params:
            continue
        joint, writers, reason = _close(graph, src, Writer(src.node.outputs[0], params, src.node.index), dead)
        taken.update(w.value.index for w in writers)
        if joint is not None:
            out.append(joint)
        elif reason and refused is not None:
            refused.append(reason)
    return out


def _close(graph: Graph, seed: Source, first: Writer, dead: Dead):
    """Grow the writers of ``first`` until the joint scaling survives: ``(source or None, writers, reason)``,
    the reason when the writers survive but a tied parameter's other use cannot be compensated."""
    writers: Dict[Writer, int] = {first: 0}      # writer -> parity (1: scaled by 1/α)
    for _ in range(MAX_ROUNDS):
        if dead is not None:
            more = _all_writers(dead.needs or (dead.prop.wants if dead.prop else []))
            if not more or all(w in writers for w in more):
                return None, writers, None
            for w in more:
                writers.setdefault(w, 0)
        src = _source(graph, seed, writers)
        try:
            prop = propagate(graph, src)
        except Dead as exc:
            dead = exc
            continue
        dead = None
        fix, why = _uncovered(graph, src, prop, writers)
        if not fix and not why:
            return src, writers, None
        for v, parity, pn, node in fix:
            more = writers_of(v)
            if not more:
                why = why or (f"{pn} is also used by {describe_op(node)}, whose input no writer can scale by "
                              f"{'1/α' if parity else 'α'}")
            elif any(writers.setdefault(w, parity) != parity for w in more):
                why = why or f"{pn}'s use by {describe_op(node)} would need a writer scaled by α and by 1/α"
        if why:
            return None, writers, f"{src.layer} (joint): {why}"
    return None, writers, None


def _all_writers(values) -> Optional[List[Writer]]:
    out: List[Writer] = []
    for v in values:
        ws = writers_of(v) if isinstance(v, Value) else None
        if ws is None:
            return None
        out.extend(w for w in ws if w not in out)
    return out


def _source(graph: Graph, seed: Source, writers: Dict[Writer, int]) -> Source:
    """The joint source: label 0 scaled by α, label 1 by 1/α, every writer's output labelled."""
    later, members, covers = [], [], []

    def where(w: Writer) -> int:        # forward order: a parameter at its first use
        return w.node_index if w.node_index >= 0 else min(n.index for n in graph.param_uses.get(w.params[0], [])
                                                          or [graph.nodes[-1]])
    for w, parity in sorted(writers.items(), key=lambda wp: where(wp[0])):
        later.append((w.value, torch.full(w.value.shape, float(parity), dtype=F64), None))
        for pn in w.params:
            members.append((pn, torch.full(graph.params[pn].shape, parity, dtype=torch.long), 1, None))
            uses = graph.param_uses.get(pn, []) if w.node_index < 0 else [graph.nodes[w.node_index]]
            covers.extend((pn, n.index) for n in uses)
    names = list(dict.fromkeys(op_layer(graph.nodes[w.node_index], graph) if w.node_index >= 0
                               else layer_name(w.params[0]) for w in sorted(writers, key=where)))
    layer = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"   # no count: a twin maps it to all layers
    return Source(SCALE, seed.node, layer, "joint", 2, torch.zeros(seed.node.outputs[0].shape, dtype=F64), None,
                  members, later=later, links=[(0, 1, 1)], covers=covers)


def _uncovered(graph: Graph, src: Source, prop: Propagation, writers: Dict[Writer, int]):
    """``([(activation, parity, parameter, call)], None)``: what must be scaled for every use of the
    candidate's parameters to be accounted for (nothing when all are), or ``([], reason)`` when some use
    cannot be."""
    covered = set(src.covers) | prop.covered
    parity = {pn: p for w, p in writers.items() for pn in w.params}
    fix = []
    names = [m[0] for m in src.members] + [pn for _, pn, _ in prop.consumers] + [pn for pn, _ in prop.joined]
    for pn in dict.fromkeys(names):
        for node in graph.param_uses.get(pn, []):
            if (pn, node.index) in covered:
                continue
            x = _reads_with(node, pn)
            if x is None or pn not in parity:
                return [], f"{pn} is also used by {describe_op(node)}, which cannot compensate its scaling"
            fix.append((x, 1 - parity[pn], pn, node))
    return fix, None


def _reads_with(node, pn: str) -> Optional[Value]:
    """The activation that a Linear-type call multiplies by parameter ``pn`` (its weight), or None."""
    if node.op in LAYERS:
        a = bind(node)
        w = param(a.get("weight"))
        return a.get("input") if w is not None and w.name == pn and isinstance(a.get("input"), Value) else None
    if node.op in ("addmm", "matmul", "einsum"):
        c = contraction(node)
        return c.x if c is not None and c.w.name == pn else None
    return None


def tied_shifts(graph: Graph, sources: List[Source]) -> List[Source]:
    """A tied or shared parameter shifted as a whole (one group): every use's own shift source at once.

    An embedding tied to the lm_head: shifting one row moves one logit, but shifting the whole table
    shifts every position of the stream alike (LayerNorms remove it) and every logit of a position by the
    same ``c·Σ_j x_j`` (cross-entropy removes it).  Each use's shift source already says how its output
    shifts (a position table's rows, a Linear's columns: uniform over features per position); the
    candidate is all of them together, one group over the whole tensor, valid when every use has one."""
    by_param: Dict[str, List[Source]] = {}
    for src in sources:
        if src.mode != SCALE and src.what in ("rows", "columns") and len(src.members) == 1:
            by_param.setdefault(src.members[0][0], []).append(src)
    out = []
    for pn, srcs in by_param.items():
        uses = graph.param_uses.get(pn, [])
        per_use = {s.node.index: s for s in srcs}
        if len(uses) < 2 or any(n.index not in per_use for n in uses):
            continue
        first, *rest = [per_use[n.index] for n in uses]
        later, offset = [], float(first.p.max()) + 1
        for s in rest:          # distinct shift values per use (each absorber sees one use's shifts)
            later.append((s.node.outputs[0], s.g, torch.where(s.p >= 0, s.p + offset, s.p)))
            offset += float(s.p.max()) + 1
        numel = math.prod(graph.params[pn].shape)
        out.append(Source(first.mode, first.node, layer_name(pn), "tied", 1, first.g, first.p,
                          [(pn, None, 1, (1, 1, numel))], later=later, covers=[(pn, n.index) for n in uses]))
    return out
