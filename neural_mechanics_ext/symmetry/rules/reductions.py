"""Reductions over axes: ``mean``/``sum``, pooling, and spatial resampling (``interpolate``).

A scaling survives when every reduced set is scaled by one group (the groups of a set are merged); a
shift survives when every reduced set receives one shift, or when it is averaged into a new composite
shift (a global average pool of per-position shifts).
"""
from __future__ import annotations

from .state import SCALE, Dead, bind, constant_rows, describe_op, fibers

POOLS = {f"{kind}{k}d" for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
         for k in (1, 2, 3)}


def reduce(prop, node, args, kwargs) -> None:
    a = bind(node, args, kwargs)
    x = a["input"]
    prop.only_first_reached(node, x)
    nd = len(x.shape)
    dim = a.get("dim")
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = list(range(nd))
    else:
        dims = sorted({d % nd for d in ([dim] if isinstance(dim, int) else dim)})
    out = node.outputs[0]
    rows, kept = fibers(prop.g[x], dims)
    if prop.mode == SCALE:
        rep = prop.merge_rows(rows, describe_op(node))
        g = rep.view(kept) if kept else rep.view(())
        return prop.set(out, g.reshape(out.shape).clone())
    rep = prop.merge_rows(rows, describe_op(node), allow_unreached=True)
    prow, _ = fibers(prop.p[x], dims)
    p = prop.combine(prow, mean=(node.op == "mean"))
    prop.set(out, rep.reshape(out.shape).clone(), p.reshape(out.shape).clone())


def pool(prop, node, args, kwargs) -> None:
    k = int(node.op[-2])
    x = args[0]
    prop.only_first_reached(node, x)
    out = node.outputs[0]
    nd = len(x.shape)
    dims = list(range(nd - k, nd))
    rows, kept = fibers(prop.g[x], dims)
    where = describe_op(node)
    bshape = list(kept) + [1] * k
    if prop.mode == SCALE:
        rep = prop.merge_rows(rows, where)
        return prop.set(out, rep.view(bshape).expand(out.shape).clone())
    prow, _ = fibers(prop.p[x], dims)
    if node.op.startswith("avg_pool"):
        a = bind(node, args, kwargs)
        if _nonzero(a.get("padding", 0)) and a.get("count_include_pad", True):
            raise Dead(f"{where} averages in zero padding, which is not shifted")
    if constant_rows(prow) and constant_rows(rows):
        return prop.set(out, rows[:, 0].view(bshape).expand(out.shape).clone(),
                        prow[:, 0].view(bshape).expand(out.shape).clone())
    if node.op.startswith("adaptive_avg") and all(s == 1 for s in out.shape[-k:]):
        rep = prop.merge_rows(rows, where, allow_unreached=True)
        p = prop.combine(prow, mean=True)
        return prop.set(out, rep.view(bshape).expand(out.shape).clone(), p.view(bshape).expand(out.shape).clone())
    raise Dead(f"{where} mixes positions that receive different shifts")


def interpolate(prop, node, args, kwargs) -> None:
    x = args[0]
    prop.only_first_reached(node, x)
    out = node.outputs[0]
    dims = list(range(2, len(x.shape)))
    rows, kept = fibers(prop.g[x], dims)
    bshape = list(kept) + [1] * len(dims)
    where = describe_op(node)
    if prop.mode == SCALE:
        rep = prop.merge_rows(rows, where)
        return prop.set(out, rep.view(bshape).expand(out.shape).clone())
    prow, _ = fibers(prop.p[x], dims)
    if not (constant_rows(prow) and constant_rows(rows)):
        raise Dead(f"{where} mixes positions that receive different shifts")
    prop.set(out, rows[:, 0].view(bshape).expand(out.shape).clone(),
             prow[:, 0].view(bshape).expand(out.shape).clone())


def _nonzero(pad) -> bool:
    if isinstance(pad, (list, tuple)):
        return any(int(p) != 0 for p in pad)
    return isinstance(pad, int) and pad != 0
