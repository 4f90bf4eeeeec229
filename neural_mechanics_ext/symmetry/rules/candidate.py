"""From a propagated source to a candidate family: its kind and name, and its members' ``(A, K, B)``
views fitted to the group of every parameter element (or a refusal saying why none fits)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..capture import Graph
from ..family import SymmetryFamily
from .engine import propagate
from .state import NORM_TAG, SCALE, Dead, Propagation, Source, describe_op, op_layer


@dataclass
class Candidate:
    """A structurally derived family, before the gradient check."""

    family: Optional[SymmetryFamily]
    source: Source
    name: str = ""
    refusal: Optional[str] = None        # structural reason not to track it (shared, unexpressible)
    forced: Optional[str] = None         # reason it cannot hold (BN in eval mode); still measured
    # (normaliser, eps, max eps/(var+eps), values per normalised set) for each absorber with eps > 0
    approx: List[Tuple[str, float, float, int]] = field(default_factory=list)


def fit_view(cmap: torch.Tensor, k: int) -> Optional[Tuple[int, int, int]]:
    """The ``(A, K, B)`` view whose slice ``j`` is exactly the elements labelled ``j`` (or None)."""
    flat = cmap.reshape(-1)
    n = flat.numel()
    if n == 0 or k <= 0 or bool((flat < 0).any()) or n % k:
        return None
    if k == 1:
        return (1, 1, n) if bool((flat == 0).all()) else None
    nz = (flat != flat[0]).nonzero()
    b = int(nz[0]) if len(nz) else n
    if flat[0] != 0 or b == 0 or n % (k * b):
        return None
    a = n // (k * b)
    ok = torch.equal(flat.view(a, k, b), torch.arange(k, dtype=flat.dtype).view(1, k, 1).expand(a, k, b))
    return (a, k, b) if ok else None


def build_candidate(graph: Graph, src: Source) -> Optional[Candidate]:
    """Propagate one source; return its candidate family, or None when there is no symmetry."""
    try:
        prop = propagate(graph, src)
    except Dead:
        return None
    if not prop.absorbers and not prop.consumers:
        return None
    cand = Candidate(None, src, forced=prop.forced, approx=prop.approx)
    consumers = list(dict.fromkeys(op_layer(n, graph) for n, _, _ in prop.consumers))
    kind, cand.name = _kind_and_name(graph, src, prop, consumers)
    members, problems = _members(src, prop)
    if problems:
        cand.refusal = "; ".join(problems)
        return cand
    if len({v[1] for _, v, _ in members}) != 1:
        cand.refusal = "members have different numbers of groups"
        return cand
    fam = SymmetryFamily(kind, cand.name, members, layer=src.layer)
    fam.extra.update(absorbers=[describe_op(n) for n in prop.absorbers], consumers=consumers,
                     source=src.node.index)
    cand.family = fam
    cand.refusal = _sharing_refusal(graph, members)
    return cand


def _kind_and_name(graph: Graph, src: Source, prop: Propagation, consumers: List[str]) -> Tuple[str, str]:
    if src.mode != SCALE:
        return "translation", f"{src.layer} (translation, {src.what})"
    if prop.consumers:
        return "rescale", f"{src.layer} → {', '.join(consumers)} (rescale)"
    tags = list(dict.fromkeys(f"{NORM_TAG.get(n.op, n.op)} {op_layer(n, graph)}" for n in prop.absorbers))
    return "scale", f"{src.layer} (scale, {', '.join(tags)})"


def _members(src: Source, prop: Propagation):
    """``(name, view, sign)`` of every source (+1) and consumer (−1) parameter, and the problems of
    those whose group map no view expresses."""
    table = prop.uf.table().long()
    maps = list(src.members) + [(pn, cm, 1, None) for pn, cm in prop.joined]
    maps += [(pn, cm, -1, None) for _, pn, cm in prop.consumers]
    members, problems = [], []
    lut, k = None, 0
    for pn, cm, sign, view in maps:
        if view is None:
            # Label maps are broadcast views (a row label repeated over a whole filter, a column label
            # over every output): fit the view on the compact core and stretch it.
            lead, core, trail = _compact(cm)
            core = core.long()
            roots = torch.where(core >= 0, table[core.clamp(min=0)], torch.full_like(core, -1))
            if lut is None:     # groups numbered in order of first appearance in the first map
                seen = [r for r in dict.fromkeys(roots.reshape(-1).tolist()) if r >= 0]
                lut = torch.full((len(table) + 1,), -1, dtype=torch.long)
                lut[torch.tensor(seen, dtype=torch.long)] = torch.arange(len(seen))
                k = len(seen)
            canon = lut[torch.where(roots >= 0, roots, torch.full_like(roots, len(table)))]
            core_view = fit_view(canon, k)
            if core_view is None:
                problems.append(_unexpressible(pn, cm, canon, k, sign))
                continue
            a, kk, b = core_view
            view = (lead * a, kk, b * trail) if kk > 1 else (1, 1, lead * a * b * trail)
        members.append((pn, view, sign))
    return members, problems


def _sharing_refusal(graph: Graph, members) -> Optional[str]:
    """Shared or tied parameters: the rules assume each parameter is used by exactly one call."""
    for pn, _, _ in members:
        if pn in graph.tied:
            return (f"parameter {pn} is tied: the same tensor is also registered as "
                    f"{', '.join(x for x in graph.tied[pn] if x != pn)}")
        uses = graph.param_uses.get(pn, [])
        if len(uses) > 1:
            return (f"parameter {pn} is used by {len(uses)} calls in the forward pass "
                    f"({', '.join(describe_op(n) for n in uses[:4])}); a shared parameter "
                    f"receives the sum of several gradients and the one-call rule does not apply")
        if pn in graph.frozen:
            return f"parameter {pn} is frozen (requires_grad=False)"
    return None


def _compact(cm: torch.Tensor) -> Tuple[int, torch.Tensor, int]:
    """Split a label map into (leading repeats, core, trailing repeats) using its broadcast strides."""
    shape, stride = list(cm.shape), list(cm.stride())
    nd = len(shape)
    i, lead = 0, 1
    while i < nd and (shape[i] == 1 or stride[i] == 0):
        lead *= shape[i]
        i += 1
    j, trail = nd, 1
    while j > i and (shape[j - 1] == 1 or stride[j - 1] == 0):
        trail *= shape[j - 1]
        j -= 1
    core = cm[tuple([0] * i + [slice(None)] * (j - i) + [0] * (nd - j))]
    return lead, core.reshape(-1), trail


def _unexpressible(pn: str, cmap: torch.Tensor, canon: torch.Tensor, k: int, sign: int) -> str:
    side = "consumer" if sign < 0 else "source"
    if bool((canon < 0).any()):
        return (f"{side} {pn}: only part of the tensor belongs to the groups, and an (A, K, B) view must "
                f"cover the whole tensor")
    return (f"{side} {pn} (shape {tuple(cmap.shape)}): its slices for the {k} groups do not form an "
            f"(A, K, B) view (e.g. a grouped conv whose groups hold several channels, a permuted consumer, or "
            f"the o_proj columns of all query heads sharing a kv head under grouped-query attention); this "
            f"needs views that address strided parts of a tensor")
