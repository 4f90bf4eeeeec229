"""MomentPlan: from symmetry families to one ``slice_moments`` call and a per-group reduction.

Built once per tracker.  Every parameter that any family touches is listed once, with the union of the
views the families need, so one fused pass reads each tensor once; the per-group moments are then a
gather + signed scatter-add over the small ``[slices, 9]`` result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from .ops import slice_moments

if TYPE_CHECKING:  # symmetry/ imports this module (to prove families): no import at run time
    from .symmetry.family import SymmetryFamily


class MomentPlan:
    """Which tensors and views to read, and how their slices add up to the families' groups.

    Attributes:
        names: parameter names, one per distinct tensor read (the first name a shared tensor has).
        params: the parameters, in the same order.
        views: per parameter, the distinct ``(A, K, B)`` views that the families need.
        offsets: ``offsets[f]`` is the first row of family ``f`` in the concatenated group tensors;
            family ``f`` owns rows ``offsets[f] : offsets[f] + families[f].num_groups``.
        counts: float64 ``[groups]``, number of parameter elements in each group.
    """

    def __init__(self, families: Sequence["SymmetryFamily"], named_parameters: Dict[str, torch.Tensor]):
        if not families:
            raise ValueError("MomentPlan: no symmetry families to track")
        self.families = list(families)
        self.names: List[str] = []
        self.params: List[torch.Tensor] = []
        self.views: List[List[Tuple[int, int, int]]] = []
        index_of_tensor: Dict[int, int] = {}
        row_of: Dict[Tuple[int, Tuple[int, int, int]], int] = {}

        def slot(name: str, view: Tuple[int, int, int], family: SymmetryFamily) -> int:
            if name not in named_parameters:
                raise KeyError(f"family {family.name!r}: the model has no parameter named {name!r}")
            p = named_parameters[name]
            a, k, b = view
            if a * k * b != p.numel():
                raise ValueError(f"family {family.name!r}: view {view} of {name} covers {a * k * b} elements "
                                 f"but the parameter has {p.numel()} (shape {tuple(p.shape)})")
            t = index_of_tensor.setdefault(id(p), len(self.params))
            if t == len(self.params):
                self.names.append(name)
                self.params.append(p)
                self.views.append([])
            if view not in self.views[t]:
                self.views[t].append(view)
            return t

        members = []
        for f in self.families:
            members.append([(slot(n, v, f), v, s) for n, v, s in f.members])
        # Rows of the slice_moments result: by tensor, then view, then k.
        row = 0
        self.first_row: List[int] = []  # first result row of each tensor; rows of tensors [i, j) are contiguous
        for t, vs in enumerate(self.views):
            self.first_row.append(row)
            for v in vs:
                row_of[(t, v)] = row
                row += v[1]
        self.num_slices = row
        self.first_row.append(row)

        # Group g sums its member slices: a padded [groups, max_members] gather (padding points at an
        # extra zero row) keeps the reduction deterministic on every device, unlike a scatter-add.
        per_group: List[List[Tuple[int, float]]] = []
        counts, self.offsets = [], []
        for f, ms in zip(self.families, members):
            self.offsets.append(len(per_group))
            for k in range(f.num_groups):
                per_group.append([(row_of[(t, v)] + k, float(s)) for t, v, s in ms])
                counts.append(float(sum(v[0] * v[2] for _, v, _ in ms)))
        self.num_groups = len(per_group)
        width = max(len(g) for g in per_group)
        pad = (self.num_slices, 0.0)
        table = [g + [pad] * (width - len(g)) for g in per_group]
        self.counts = torch.tensor(counts, dtype=torch.float64)
        self._rows = torch.tensor([[r for r, _ in g] for g in table], dtype=torch.long)
        self._sign = torch.tensor([[s for _, s in g] for g in table], dtype=torch.float64)[..., None]

    def to(self, device: torch.device) -> "MomentPlan":
        """Move the small index tensors to ``device`` (done once, next to the parameters)."""
        self._rows, self._sign, self.counts = (t.to(device) for t in (self._rows, self._sign, self.counts))
        return self

    def slice_moments(self, grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      buffers: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      tensors: Optional[range] = None) -> torch.Tensor:
        """The one fused pass: moments of (θ, g, v) for every slice of every view, ``[slices, 9]``.

        ``tensors`` restricts it to a range of the plan's tensors (then ``grads``/``buffers`` hold that
        range's entries); the result is rows ``first_row[start] : first_row[stop]`` of the full one."""
        if tensors is None:
            return slice_moments(self.params, self.views, grads, buffers)
        return slice_moments(self.params[tensors.start:tensors.stop], self.views[tensors.start:tensors.stop],
                             grads, buffers)

    def group_moments(self, S: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-group moments ``[groups, 9]``: signed (rescale's outgoing side counts −1) and unsigned."""
        if self._rows.device != S.device:
            self.to(S.device)
        padded = torch.cat([S, S.new_zeros((1, S.shape[1]))])
        picked = padded[self._rows]                      # [groups, max_members, 9]
        return (picked * self._sign).sum(1), picked.sum(1)

    def split(self, G: torch.Tensor) -> List[torch.Tensor]:
        """Cut a ``[groups, ...]`` tensor into one piece per family (views, no copies)."""
        return [G[o:o + f.num_groups] for o, f in zip(self.offsets, self.families)]
