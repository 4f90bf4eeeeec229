"""MomentPlan: from symmetry families to one ``slice_moments`` call and a per-group reduction.

Built once per tracker.  Every parameter that any family touches is listed once, with the union of the
views the families need, so one fused pass reads each tensor once; the per-group moments are then a
gather + signed scatter-add over the small ``[slices, 9]`` result.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _backend
from .views import Full

if TYPE_CHECKING:  # symmetry/ imports this module (to prove families): no import at run time
    from .symmetry.family import SymmetryFamily


class MomentPlan:
    """Which tensors and views to read, and how their slices add up to the families' groups.

    Attributes:
        names: parameter names, one per distinct tensor read (the first name a shared tensor has).
        params: the parameters, in the same order.
        views: per parameter, the distinct views that the families need, as ``(A, K, B, offset, a_stride)``
            (views.py; several may address parts of one parameter).
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
        self.views: List[List[Full]] = []
        index_of_tensor: Dict[int, int] = {}
        row_of: Dict[Tuple[int, Full], int] = {}

        def slot(name: str, p: torch.Tensor, view: Full) -> int:
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
            members.append([(slot(n, p, v), v, s) for (n, _, _), (p, v, s) in zip(f.members, f.resolve(named_parameters))])
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

        # Group g sums its member slices (a ragged bag of rows): embedding_bag adds each bag in order,
        # which is deterministic on every device, unlike a scatter-add, and one call per sign pattern.
        rows, signs, offsets, counts, self.offsets = [], [], [], [], []
        for f, ms in zip(self.families, members):
            self.offsets.append(len(offsets))
            for k in range(f.num_groups):
                offsets.append(len(rows))
                rows += [row_of[(t, v)] + k for t, v, _ in ms]
                signs += [float(s) for _, _, s in ms]
                counts.append(float(sum(v[0] * v[2] for _, v, _ in ms)))
        self.num_groups = len(offsets)
        self.counts = torch.tensor(counts, dtype=torch.float64)
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._bags = torch.tensor(offsets, dtype=torch.long)
        self._sign = torch.tensor(signs, dtype=torch.float64)

    @functools.cached_property
    def _tables(self) -> "_ViewTables":
        return _ViewTables(self.views)

    def to(self, device: torch.device) -> "MomentPlan":
        """Move the small index tensors to ``device`` (done once, next to the parameters)."""
        self._rows, self._bags, self._sign, self.counts = (
            t.to(device) for t in (self._rows, self._bags, self._sign, self.counts))
        return self

    def slice_moments(self, grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      buffers: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      tensors: Optional[range] = None) -> torch.Tensor:
        """The one fused pass: moments of (θ, g, v) for every slice of every view, ``[slices, 9]``.

        ``tensors`` restricts it to a range of the plan's tensors (then ``grads``/``buffers`` hold that
        range's entries); the result is rows ``first_row[start] : first_row[stop]`` of the full one."""
        tensors = tensors or range(len(self.params))
        # The plan checked every view against its parameter when it was built, and gradients and
        # momentum buffers have their parameter's shape: call the op directly (the public wrapper's
        # checks cost more than the kernel on a small model).  The op still guards shapes and devices.
        return _backend.ops.slice_moments([p.detach() for p in self.params[tensors.start:tensors.stop]],
                                          list(grads or []), list(buffers or []), self._tables[tensors])

    def stream_moments(self, mode: str, grads: Sequence[torch.Tensor], state, scalars,
                       tensors: Optional[range] = None) -> torch.Tensor:
        """The fused pass of an adaptive optimizer: moments of (θ, p, u), (p, u) formed in the kernel from
        θ, g and the optimizer ``state`` ((exp_avgs, exp_avg_sqs, max_exp_avg_sqs); Lion: exp_avgs only),
        ``scalars`` one tuple per tensor (``adam_moments``/``lion_moments``).  Same rows as
        :meth:`slice_moments`; the op is called directly, as there."""
        tensors = tensors or range(len(self.params))
        params = [p.detach() for p in self.params[tensors.start:tensors.stop]]
        flat = [float(s) for per in scalars for s in per]
        given = lambda ts: list(ts) if any(t is not None for t in ts) else []   # all None: no state yet
        if mode == "adam":
            ms, vs, vmaxs = state
            return _backend.ops.adam_moments(params, list(grads), given(ms), given(vs), given(vmaxs),
                                             self._tables[tensors], flat)
        return _backend.ops.lion_moments(params, list(grads), given(state[0]), self._tables[tensors], flat)

    def group_moments(self, S: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-group moments ``[groups, 9]``: signed (rescale's outgoing side counts −1) and unsigned.

        ``S`` may also stack T steps' results, ``[T * slices, 9]``; the groups then come ``[T * groups, 9]``."""
        if self._rows.device != S.device:
            self.to(S.device)
        steps = S.shape[0] // self.num_slices
        rows, bags, sign = self._rows, self._bags, self._sign
        if steps != 1:  # the same bags, shifted to each step's rows
            t = torch.arange(steps, device=S.device)[:, None]
            rows = (rows[None] + t * self.num_slices).reshape(-1)
            bags = (bags[None] + t * len(self._rows)).reshape(-1)
            sign = sign.repeat(steps)
        signed = F.embedding_bag(rows, S, bags, mode="sum", per_sample_weights=sign)
        return signed, F.embedding_bag(rows, S, bags, mode="sum")

    def member_rows(self, groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The member slices of ``groups`` (indices into the plan's groups), for per-member arithmetic.

        Returns CPU tensors, one entry per member slice: its row of the ``[slices, 9]`` result, the
        position of its group in ``groups``, its sign (rescale's outgoing side −1) and its plan tensor."""
        rows_all, bags, sign = self._rows.cpu(), self._bags.cpu(), self._sign.cpu()
        ends = torch.cat([bags[1:], torch.tensor([len(rows_all)])])
        rows, index, signs = [], [], []
        for i, g in enumerate(groups.tolist()):
            r = range(int(bags[g]), int(ends[g]))
            rows += rows_all[r.start:r.stop].tolist()
            signs += sign[r.start:r.stop].tolist()
            index += [i] * len(r)
        rows_t = torch.tensor(rows, dtype=torch.long)
        tensor = torch.searchsorted(torch.tensor(self.first_row[1:]), rows_t, right=True)
        return rows_t, torch.tensor(index, dtype=torch.long), torch.tensor(signs, dtype=torch.float64), tensor

    def split(self, G: torch.Tensor) -> List[torch.Tensor]:
        """Cut a ``[groups, ...]`` tensor into one piece per family (views, no copies)."""
        return [G[o:o + f.num_groups] for o, f in zip(self.offsets, self.families)]


class _ViewTables:
    """The op's flat (tensor, A, K, B, offset, a_stride) table for a contiguous range of the plan's tensors,
    cached."""

    def __init__(self, views: List[List[Full]]):
        self.views = views
        self.cache: Dict[Tuple[int, int], List[int]] = {}

    def __getitem__(self, r: range) -> List[int]:
        key = (r.start, r.stop)
        if key not in self.cache:
            self.cache[key] = [x for i, t in enumerate(range(r.start, r.stop)) for v in self.views[t] for x in (i, *v)]
        return self.cache[key]
