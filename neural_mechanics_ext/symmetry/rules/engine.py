"""Running the rule table over a captured graph: every source, and one source's propagation."""
from __future__ import annotations

from typing import List

from ..capture import Graph
from .registry import PROPAGATE, SOURCES
from .state import SCALE, Dead, Propagation, Source, describe_op


def find_sources(graph: Graph) -> List[Source]:
    """Every place where a slice of parameters perturbs one axis of an op's output."""
    out: List[Source] = []
    seeded = set()      # a query·key pair is found at every product of the two; keep it once
    for node in graph.nodes:
        rule = SOURCES.get(node.op)
        if rule is None or not graph.affects_loss(node) or node.opaque or not node.outputs \
                or node.outputs[0] is None:
            continue
        for src in rule(node, graph):
            key = (src.mode, src.what, src.node.index, tuple(v.index for v, _ in src.more))
            if src.more and key in seeded:
                continue
            seeded.add(key)
            out.append(src)
    return out


def propagate(graph: Graph, src: Source) -> Propagation:
    """Follow ``src`` forward through every call it reaches (raises :class:`Dead` when it dies)."""
    prop = Propagation(graph, src)
    if src.inside:
        prop.paired.append(src.node)
        return prop
    for v, g in src.more:
        prop.set(v, g)
    pending = {}        # call index -> the outputs it perturbs once it has run (a parameter's: -1)
    for v, g, p in [(src.node.outputs[0], src.g, src.p)] + src.later:
        pending.setdefault(v.producer.index if v.producer is not None else -1, []).append((v, g, p))
    for v, g, p in pending.pop(-1, ()):
        prop.set(v, g, p, degree=1.0)
    try:
        for node in graph.nodes[min(pending):]:
            if any(v in prop.g for v in node.inputs) and graph.affects_loss(node):
                _follow(prop, node)
            for v, g, p in pending.pop(node.index, ()):
                prop.set(v, g, p, degree=1.0)
        if graph.loss in prop.g:
            raise Dead("the perturbation reaches the loss")
        if src.more and not prop.paired:    # query·key: absorbed on each side (QK-norm), never meeting
            raise Dead("the query and key scalings never meet in a product")
    except Dead as dead:
        dead.prop = prop
        raise
    return prop


def _follow(prop: Propagation, node) -> None:
    if node.opaque:
        raise Dead(node.opaque)
    rule = PROPAGATE.get(node.op)
    if rule is None:
        what = "scaling" if prop.mode == SCALE else "shift"
        raise Dead(f"{describe_op(node)} does not preserve the {what}")
    args, kwargs = node.call_args()
    prop.in_degrees = {prop.degree(v) for v in node.inputs if v in prop.g}
    rule(prop, node, args, kwargs)
