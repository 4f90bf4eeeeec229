"""Moments of sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a DTensor sharded on dim 0: rank r holds rows [o_r, o_r + n_r) of the
global tensor, i.e. one contiguous range [e0, e1) of its flattened elements.  A view
(A, K, B, offset, a_stride) of the global tensor (views.py) puts its K*B elements of each a in one run
[offset + a*a_stride, ... + K*B); the runs inside [e0, e1) form one view of the local shard, and the at
most two runs cut by e0 or e1 split into at most three pieces each:
    a partial slice, whole slices, a partial slice.
Every piece is a view of the local shard (offset counted from e0) with a known first global slice, so one
``slice_moments`` call reads each local shard once, with all its pieces, and gives every rank its partial
moments in the global row layout of the MomentPlan; one asynchronous all_reduce of that small [slices, 9]
tensor makes them equal to a single-process computation.  Replicated tensors are counted on the first
rank of the mesh only.  DDP needs none of this: its parameters and all-reduced gradients are whole on
every rank.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .ops import slice_moments
from .plan import MomentPlan
from .views import Full

Piece = Tuple[Full, int]  # (view of the local range, first global slice)


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(t, DTensor)


def view_pieces(e0: int, e1: int, view: Full) -> List[Piece]:
    """The elements of ``view`` (of a global flat tensor) inside [e0, e1), as views of that range (flat
    index e0 is offset 0) with the global slice of their slice 0."""
    A, K, B, offset, a_stride = view
    P = K * B
    pieces: List[Piece] = []
    if A * P == 0 or e0 >= e1:
        return pieces

    def partial_run(run: int, s: int, t: int):
        # [s, t) lies inside the run starting at `run`: partial slice, whole slices, partial slice.
        if (s - run) % B:
            end = min(t, s - (s - run) % B + B)
            pieces.append(((1, 1, end - s, s - e0, end - s), (s - run) // B))
            s = end
        whole = (t - s) // B
        if whole:
            pieces.append(((1, whole, B, s - e0, whole * B), (s - run) // B))
            s += whole * B
        if s < t:
            pieces.append(((1, 1, t - s, s - e0, t - s), (s - run) // B))

    # Runs that meet [e0, e1): a in [lo, hi]; those inside it: a in [w_lo, w_hi] (ceil and floor).
    lo, hi = max(0, -((offset + P - e0 - 1) // a_stride)), min(A - 1, (e1 - 1 - offset) // a_stride)
    w_lo, w_hi = max(lo, -((offset - e0) // a_stride)), min(hi, (e1 - P - offset) // a_stride)
    if w_lo <= w_hi:
        pieces.append(((w_hi - w_lo + 1, K, B, offset + w_lo * a_stride - e0, a_stride), 0))
    for a in sorted({lo, hi}):
        if lo <= a <= hi and not w_lo <= a <= w_hi:
            run = offset + a * a_stride
            partial_run(run, max(run, e0), min(run + P, e1))
    return pieces


class ShardedMoments:
    """Global per-slice moments of a MomentPlan whose parameters are FSDP2 DTensors (or plain tensors
    replicated on every rank), summed over the ranks with one all_reduce per step."""

    def __init__(self, plan: MomentPlan):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        import torch.distributed as dist

        self.plan = plan
        meshes = {p.device_mesh for p in plan.params if is_dtensor(p)}
        if len(meshes) != 1:
            raise ValueError("SymmetryTracker: sharded parameters must all live on one device mesh")
        mesh = meshes.pop()
        if mesh.ndim != 1:
            raise ValueError("SymmetryTracker: only 1-D device meshes (FSDP2 fully_shard) are supported; "
                             "tensor parallel or 2-D meshes are not")
        self.group = mesh.get_group()
        self.first_rank = dist.get_rank(self.group) == 0
        # Per tensor with local elements: (tensor, pieces); the local shard is read once, with all pieces.
        self.entries: List[Tuple[int, List[Piece]]] = []
        for t, (p, views) in enumerate(zip(plan.params, plan.views)):
            rest = math.prod(p.shape[1:])
            if is_dtensor(p):
                placement = p.placements[0]
                if isinstance(placement, Shard) and placement.dim == 0:
                    local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
                    numel = math.prod(local_shape)
                    e0 = offset[0] * rest
                elif isinstance(placement, Replicate):
                    e0, numel = 0, (p.numel() if self.first_rank else 0)
                else:
                    raise ValueError(f"SymmetryTracker: parameter {plan.names[t]} is placed as {placement}; "
                                     "only Shard(0) (FSDP2) and Replicate are supported")
            else:
                e0, numel = 0, (p.numel() if self.first_rank else 0)
            pieces, row = [], plan.first_row[t]
            for view in views:
                pieces += [(v, row + k0) for v, k0 in view_pieces(e0, e0 + numel, view)]
                row += view[1]
            if pieces:
                self.entries.append((t, pieces))
        targets = [first + i for _, pieces in self.entries for view, first in pieces for i in range(view[1])]
        self._targets = torch.tensor(targets, dtype=torch.long)
        # Rows of one call may land on the same global row (the pieces of a slice): add them in layers
        # of distinct targets, which keeps the sum deterministic.
        layer_of, seen = [], {}
        for r in targets:
            layer_of.append(seen.get(r, 0))
            seen[r] = layer_of[-1] + 1
        self._layers = [torch.tensor([i for i, l in enumerate(layer_of) if l == n], dtype=torch.long)
                        for n in range(max(layer_of, default=-1) + 1)]

    @staticmethod
    def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return (t.to_local() if is_dtensor(t) else t).reshape(-1)

    def __call__(self, grads: Sequence[Optional[torch.Tensor]], buffers: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        import torch.distributed as dist

        thetas = [self._local(p.detach()) for p in self.plan.params]
        gs = [self._local(g) for g in grads]
        vs = [self._local(v) for v in buffers]
        xs, ys, zs, views = [], [], [], []
        for t, pieces in self.entries:
            xs.append(thetas[t])
            ys.append(gs[t])
            zs.append(vs[t])
            views.append([v for v, _ in pieces])
        device = thetas[0].device
        out = torch.zeros((self.plan.num_slices, 9), dtype=torch.float64, device=device)
        if xs:
            local = slice_moments(xs, views, ys, zs)
            if self._targets.device != device:
                self._targets = self._targets.to(device)
                self._layers = [l.to(device) for l in self._layers]
            for layer in self._layers:
                out.index_add_(0, self._targets[layer], local[layer])
        dist.all_reduce(out, group=self.group, async_op=True).wait()
        return out
