"""SymmetryFamily: a set of parameter groups that share one symmetry kind (THEORY.md §1.2)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..schema import KINDS
from ..views import View, full

Member = Tuple[str, View, int]


@dataclass
class SymmetryFamily:
    """K parameter groups of one symmetry kind, described by slices of named parameters.

    ``members`` is a list of ``(param_name, view, sign)``: the view ``(A, K, B)`` (the whole parameter) or
    ``(A, K, B, offset, a_stride)`` (part of it) splits the flattened parameter into K slices exactly as in
    :func:`neural_mechanics_ext.slice_moments`, and group ``k`` is the union over members of slice ``k``.
    Several members may name one parameter (the Q and K blocks of a fused attention weight).  ``sign`` is +1 for every member of a
    translation or scale family and for the incoming side of a rescale family, -1 for its outgoing
    side.  Every member has the same K, the family's number of groups.

    ``layer`` is a short readable label used in plots; ``note`` says what makes the symmetry
    approximate (e.g. BatchNorm's eps), ``residual`` is the largest gradient-constraint residual
    measured when the family was proved (None until then).
    """

    kind: str
    name: str
    members: List[Member]
    layer: Optional[str] = None
    note: Optional[str] = None
    residual: Optional[float] = None
    tolerance: Optional[float] = None
    manual: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SymmetryFamily {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.members:
            raise ValueError(f"SymmetryFamily {self.name!r}: no members")
        members = []
        for m in self.members:
            if len(m) != 3:
                raise ValueError(f"SymmetryFamily {self.name!r}: member {m!r} is not (param_name, view, sign)")
            pname, view, sign = m
            if not isinstance(pname, str):
                raise TypeError(f"SymmetryFamily {self.name!r}: parameter name {pname!r} is not a string")
            where = f"SymmetryFamily {self.name!r}: view of {pname}"
            full(view, where=where)  # its form; the size against the parameter when resolved
            if sign not in (1, -1):
                raise ValueError(f"SymmetryFamily {self.name!r}: sign of {pname} must be +1 or -1, got {sign!r}")
            members.append((pname, tuple(int(s) for s in view), int(sign)))
        self.members = members
        ks = {v[1] for _, v, _ in members}
        if len(ks) != 1:
            raise ValueError(
                f"SymmetryFamily {self.name!r}: every member needs the same number of groups K, got "
                + ", ".join(f"{p}: K={v[1]}" for p, v, _ in members))
        signs = {s for _, _, s in members}
        if self.kind == "rescale" and signs != {1, -1}:
            raise ValueError(f"SymmetryFamily {self.name!r}: a rescale family needs members with sign +1 "
                             f"(incoming) and -1 (outgoing)")
        if self.kind != "rescale" and signs != {1}:
            raise ValueError(f"SymmetryFamily {self.name!r}: {self.kind} members all have sign +1")
        seen = set()
        for p, v, _ in members:
            if (p, full(v)) in seen:  # (A, K, B) and (A, K, B, 0, K*B) are one view
                raise ValueError(f"SymmetryFamily {self.name!r}: member {p} {v} listed twice")
            seen.add((p, full(v)))

    def resolve(self, named_parameters: dict) -> List[tuple]:
        """The members as ``(parameter, (A, K, B, offset, a_stride), sign)``; a clear error for an unknown
        name or a view that does not fit its parameter."""
        out = []
        for pname, view, sign in self.members:
            if pname not in named_parameters:
                close = difflib.get_close_matches(pname, list(named_parameters), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(f"family {self.name!r}: the model has no parameter named {pname!r}{hint}")
            p = named_parameters[pname]
            out.append((p, full(view, p.numel(), f"family {self.name!r}: view of {pname}",
                                f"{pname} (shape {tuple(p.shape)})"), sign))
        return out

    @property
    def num_groups(self) -> int:
        return self.members[0][1][1]

    @property
    def param_names(self) -> List[str]:
        return list(dict.fromkeys(p for p, _, _ in self.members))

    def __str__(self) -> str:
        return f"{self.kind} family {self.name} ({self.num_groups} groups)"
