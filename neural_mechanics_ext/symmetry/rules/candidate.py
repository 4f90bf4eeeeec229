"""From a propagated source to candidate families: their kind and name, and their members' views fitted
to the group of every parameter element (or a refusal saying why none fits).

Usually one family, each member one ``(A, K, B)`` view of a whole tensor.  Where a member touches part of
a tensor, or its elements of different groups are not one strided rectangle, the groups are split into
classes that touch the same parameters alike (the Q/K and V/O groups of a fused ``c_attn``), each class
into the largest equal blocks whose parts are views (one block per kv head under grouped-query
attention), and each block is a family of ``(A, K, B, offset, a_stride)`` views."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..capture import Graph
from ..family import SymmetryFamily
from .engine import propagate
from .fit import elements_by_group, fit_view, partial_views
from .state import NORM_TAG, SCALE, Dead, Propagation, Source, describe_op, layer_name, op_layer


@dataclass
class Candidate:
    """A structurally derived family, before the gradient check."""

    family: Optional[SymmetryFamily]    # the first of ``families`` (or None)
    source: Source
    name: str = ""
    refusal: Optional[str] = None        # structural reason not to track it (shared, unexpressible)
    forced: Optional[str] = None         # reason it cannot hold (BN in eval mode); still measured
    # (normaliser, eps, max eps/(var+eps), values per normalised set) for each absorber with eps > 0
    approx: List[Tuple[str, float, float, int]] = field(default_factory=list)
    families: List[SymmetryFamily] = field(default_factory=list)


def build_candidate(graph: Graph, src: Source, deaths: Optional[list] = None) -> Optional[Candidate]:
    """Propagate one source; return its candidate family, or None when there is no symmetry (then
    ``(src, dead)`` is appended to ``deaths`` when given: a joint candidate may start there)."""
    try:
        prop = propagate(graph, src)
    except Dead as dead:
        if deaths is not None:
            deaths.append((src, dead))
        return None
    if not prop.absorbers and not prop.consumers and not prop.paired:
        return None
    cand = Candidate(None, src, forced=prop.forced, approx=prop.approx)
    consumers = list(dict.fromkeys(op_layer(n, graph) for n, _, _ in prop.consumers))
    kind, cand.name = _kind_and_name(graph, src, prop, consumers)
    blocks, problems = _members(src, prop)
    if problems:
        cand.refusal = "; ".join(problems)
        return cand
    extra = dict(absorbers=[describe_op(n) for n in prop.absorbers], consumers=consumers,
                 source=src.node.index)
    names = [cand.name] if len(blocks) == 1 else [_part_name(src, prop, m, cand.name) for m in blocks]
    for i, (members, name) in enumerate(zip(blocks, names)):
        if names.count(name) > 1:       # parts alike (one per kv head, per rotation pair block)
            name = f"{name} (part {names[:i].count(name) + 1}/{names.count(name)})"
        # a part that only absorbers act on (the query rows of a fused projection under QK-norm, whose
        # value rows are compensated by the out-projection) is a scale family
        part_kind = "scale" if kind == "rescale" and all(sign > 0 for _, _, sign in members) else kind
        fam = SymmetryFamily(part_kind, name, members, layer=src.layer)
        fam.extra.update(extra)
        cand.families.append(fam)
    cand.family = cand.families[0]
    # A joint candidate accounts for every use of its parameters (:mod:`.joint`): a parameter used by
    # several calls (an embedding tied to the lm_head) is fine when each of those uses is one of its own.
    covered = set(src.covers) | prop.covered if src.what in ("joint", "tied") else None
    refusals = [r for r in (_sharing_refusal(graph, f.members, covered) for f in cand.families) if r]
    cand.refusal = refusals[0] if refusals else None
    return cand


def _part_name(src: Source, prop: Propagation, members, name: str) -> str:
    """A part of a split candidate named by what compensates it: its consumers, or the key side of a
    query·key pair (both sides in the source)."""
    consumed = {pn for _, pn, _ in prop.consumers}
    readers = list(dict.fromkeys(layer_name(pn) for pn, _, s in members if s < 0 and pn in consumed))
    if readers:
        return f"{src.layer} → {', '.join(readers)} (rescale)"
    if any(s < 0 for _, _, s in members):
        return f"{src.layer} (rescale, query·key)"
    if name.endswith("(rescale)") and prop.absorbers:
        return f"{src.layer} (scale, {_absorber_tags(prop.graph, prop)})"
    return name


def _absorber_tags(graph: Graph, prop: Propagation) -> str:
    return ", ".join(dict.fromkeys(f"{NORM_TAG.get(n.op, n.op)} {op_layer(n, graph)}" for n in prop.absorbers))


def _kind_and_name(graph: Graph, src: Source, prop: Propagation, consumers: List[str]) -> Tuple[str, str]:
    if src.mode != SCALE:
        return "translation", f"{src.layer} (translation, {src.what})"
    if src.what == "joint":
        if prop.consumers:      # the readers of a whole stream: first and last (no count: a twin maps it)
            readers = ", ".join(consumers) if len(consumers) <= 3 else f"{consumers[0]} … {consumers[-1]}"
            return "rescale", f"{src.layer} → {readers} (rescale, joint)"
        return "scale", f"{src.layer} (scale, joint)"
    if prop.consumers:
        return "rescale", f"{src.layer} → {', '.join(consumers)} (rescale)"
    if prop.paired:     # query·key: the inverse side is part of the source
        return "rescale", f"{src.layer} (rescale, {src.what})"
    return "scale", f"{src.layer} (scale, {_absorber_tags(graph, prop)})"


MAX_VIEWS = 64     # views per family beyond which a split is refused rather than listed


def _members(src: Source, prop: Propagation):
    """The families' ``(name, view, sign)`` members: source parameters +1, consumers −1 (odd labels, the
    key side of a query·key pair, flip the sign), and the problems of maps that no view expresses."""
    table, odd = prop.uf.table().long(), prop.uf.parities()
    maps = list(src.members) + [(pn, cm, 1, None) for pn, cm in prop.joined]
    maps += [(pn, cm, -1, None) for _, pn, cm in prop.consumers]
    whole = _whole_views(maps, table, odd)
    if whole is not None:
        return _distinct([whole])
    if any(view is not None for _, _, _, view in maps):
        return [], ["a member with a fixed view meets members that need views of part of a tensor"]
    entries = []        # (name, elements by group, sign, numel), one per parameter and parity
    for pn, cm, sign, _ in maps:
        flat = cm.reshape(-1).long()
        root = torch.where(flat >= 0, table[flat.clamp(min=0)], torch.full_like(flat, -1))
        par = odd[flat.clamp(min=0)]
        for p in (0, 1):
            gm = torch.where(par == p, root, torch.full_like(root, -1))
            if bool((gm >= 0).any()):
                entries.append((pn, elements_by_group(gm), sign * (1 - 2 * p), flat.numel()))
    order = list(dict.fromkeys(g for _, by, _, _ in entries for g in by))
    classes = {}
    for g in order:      # groups touching the same parameter parts, alike
        classes.setdefault(tuple(len(by.get(g, ())) for _, by, _, _ in entries), []).append(g)
    families = []
    for sig, groups in classes.items():
        block = _split(groups, [e for e, n in zip(entries, sig) if n])
        if block is None:
            return [], [f"the {len(groups)} groups of {', '.join(dict.fromkeys(e[0] for e in entries))} "
                         f"need more than {MAX_VIEWS} views per family"]
        families.extend(block)
    return _distinct(families)


def _distinct(families):
    """Each member once: a tied parameter is both a writer and a compensator of a joint candidate (the
    same view, the same sign); with opposite signs it would be scaled by α and 1/α at once."""
    out = []
    for members in families:
        signs = {}
        for pn, view, sign in members:
            if signs.setdefault((pn, tuple(view)), sign) != sign:
                return [], [f"{pn} would be scaled by α and by 1/α at once"]
        out.append([(pn, view, sign) for (pn, view), sign in signs.items()])
    return out, []


def _whole_views(maps, table, odd) -> Optional[list]:
    """Members as one view of each whole tensor over all groups, or None where some map needs parts."""
    members, lut, k = [], None, 0
    for pn, cm, sign, view in maps:
        if view is None:
            # Label maps are broadcast views (a row label repeated over a whole filter, a column label
            # over every output): fit the view on the compact core and stretch it.
            lead, core, trail = _compact(cm)
            core = core.long()
            if bool((odd[core.clamp(min=0)] != 0).any()):
                return None
            roots = torch.where(core >= 0, table[core.clamp(min=0)], torch.full_like(core, -1))
            if lut is None:     # groups numbered in order of first appearance in the first map
                seen = [r for r in dict.fromkeys(roots.reshape(-1).tolist()) if r >= 0]
                lut = torch.full((len(table) + 1,), -1, dtype=torch.long)
                lut[torch.tensor(seen, dtype=torch.long)] = torch.arange(len(seen))
                k = len(seen)
            canon = lut[torch.where(roots >= 0, roots, torch.full_like(roots, len(table)))]
            core_view = fit_view(canon, k)
            if core_view is None:
                return None
            a, kk, b = core_view
            view = (lead * a, kk, b * trail) if kk > 1 else (1, 1, lead * a * b * trail)
        members.append((pn, view, sign))
    return members


def _short(view, numel: int):
    """``(A, K, B)`` for a view of the whole tensor, the long form otherwise."""
    a, k, b, offset, stride = view
    return (a, k, b) if offset == 0 and a * k * b == numel and (a == 1 or stride == k * b) else view


def _split(groups, entries) -> Optional[List[list]]:
    """The largest equal blocks of ``groups`` whose parts in every entry are views, as member lists."""
    n = len(groups)
    for size in (s for s in range(n, 0, -1) if n % s == 0):
        blocks = []
        for i in range(0, n, size):
            members = []
            for pn, by, sign, numel in entries:
                views = partial_views(by, groups[i:i + size])
                if views is None:
                    break
                members += [(pn, _short(v, numel), sign) for v in views]
            else:
                if len(members) > MAX_VIEWS:
                    return None
                blocks.append(members)
                continue
            break
        if len(blocks) == n // size:
            return blocks
    return None


def _sharing_refusal(graph: Graph, members, covered=None) -> Optional[str]:
    """Shared or tied parameters: the rules assume each parameter is used by exactly one call, unless
    ``covered`` (``(parameter, call index)``) accounts for each of its uses."""
    for pn, _, _ in members:
        if covered is not None and all((pn, n.index) in covered for n in graph.param_uses.get(pn, [])):
            if pn in graph.frozen:
                return f"parameter {pn} is frozen (requires_grad=False)"
            continue
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
