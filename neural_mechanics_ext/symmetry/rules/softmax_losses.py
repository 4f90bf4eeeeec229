"""Shift absorbers: ``softmax``, ``log_softmax`` and ``cross_entropy`` are blind to a shift that is the
same for every class (every element of the normalised axis); they end any scaling."""
from __future__ import annotations

from .state import SCALE, Dead, bind, constant_rows, describe_op, fibers


def shift_absorber(prop, node, args, kwargs) -> None:
    where = describe_op(node)
    if prop.mode == SCALE:
        raise Dead(f"{where} is not scale-invariant")
    a = bind(node, args, kwargs)
    x = a["input"]
    prop.only_first_reached(node, x)
    nd = len(x.shape)
    if node.op == "cross_entropy":
        dim = 1 if nd >= 2 else 0
    else:
        dim = a.get("dim")
        if dim is None:
            dim = 0 if nd in (0, 1, 3) else 1
    rows, _ = fibers(prop.g[x], [dim % nd])
    prow, _ = fibers(prop.p[x], [dim % nd])
    if not constant_rows(prow):
        raise Dead(f"{where}: the shift is not the same for every class")
    prop.merge_rows(rows, where, allow_unreached=False)
    prop.absorbers.append(node)
