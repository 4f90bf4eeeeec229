"""A plain-text table of symmetry families (and of rejected candidates)."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Union

from ..views import format_view
from .family import SymmetryFamily
from .prove import Rejected


def format_members(fam: SymmetryFamily) -> str:
    """``a.weight(1,64,27)+a.bias(1,64,1) | -b.weight(64,64,9)``: A1 (or the group), then A2; part of a
    tensor as ``c_attn.weight(64,64,1)@64/192`` (offset 64, a_stride 192)."""
    def one(name, view):
        return f"{name}{format_view(view)}"

    plus = "+".join(one(n, v) for n, v, s in fam.members if s > 0)
    minus = " ".join("-" + one(n, v) for n, v, s in fam.members if s < 0)
    return f"{plus} | {minus}" if minus else plus


def _num(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def describe(families: Iterable[Union[SymmetryFamily, Rejected, tuple]]) -> str:
    """Table with one row per family: kind, name, groups, members, residual, tolerance, note.

    Accepts the families returned by ``find_symmetries`` / ``prove_families`` and also their rejected
    lists (``(family, residual, reason)``), in which case the reason is the last column.  Returns the
    string; print it yourself.
    """
    rows: List[Sequence[str]] = []
    for item in families:
        if isinstance(item, SymmetryFamily):
            fam, res, note = item, item.residual, item.note or ""
        elif isinstance(item, tuple) and len(item) == 3:
            fam, res, note = item
            if fam is None:
                rows.append(("-", "-", "-", "-", _num(res), "-", note))
                continue
        else:
            raise TypeError(f"describe: expected SymmetryFamily or (family, residual, reason), got {item!r}")
        rows.append((fam.kind, fam.name, str(fam.num_groups), format_members(fam), _num(res),
                     _num(fam.tolerance), note))
    if not rows:
        return "(no symmetry families)"
    head = ("kind", "name", "groups", "members", "residual", "tolerance", "note")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    widths[-1] = 0

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    out = [line(head), line(tuple("-" * max(w, len(h)) for w, h in zip(widths, head)))]
    out += [line(r) for r in rows]
    return "\n".join(out)
