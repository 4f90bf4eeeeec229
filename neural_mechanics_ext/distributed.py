"""Moments of sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a DTensor sharded on dim 0: rank r holds rows [o_r, o_r + n_r) of the
global tensor, i.e. one contiguous range [e0, e1) of its flattened elements.  A view (A, K, B) of the
global tensor splits that range into at most seven pieces, each of them a view of a contiguous part of
the local shard with a known first global slice:
    a partial slice, whole slices, a partial slice   (up to the first period boundary, period K*B)
    whole periods                                     (a view (n, K, B) of the local data)
    a partial slice, whole slices, a partial slice   (after the last period boundary).
One ``slice_moments`` call over all pieces of all tensors gives every rank its partial moments in the
global row layout of the MomentPlan; one asynchronous all_reduce of that small [slices, 9] tensor makes
them equal to a single-process computation.  Replicated tensors are counted on the first rank of the
mesh only.  DDP needs none of this: its parameters and all-reduced gradients are whole on every rank.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .ops import slice_moments
from .plan import MomentPlan

Piece = Tuple[int, int, Tuple[int, int, int], int]  # (start, length, view, first slice)


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(t, DTensor)


def view_pieces(e0: int, e1: int, K: int, B: int) -> List[Piece]:
    """Cut the flat range [e0, e1) of a tensor viewed as (A, K, B) into views with known first slices."""
    P = K * B
    pieces: List[Piece] = []

    def within_period(s: int, t: int):
        # [s, t) lies inside one period: partial slice, whole slices, partial slice.
        if s % B:
            end = min(t, s - s % B + B)
            pieces.append((s, end - s, (1, 1, end - s), (s % P) // B))
            s = end
        whole = (t - s) // B
        if whole:
            pieces.append((s, whole * B, (1, whole, B), (s % P) // B))
            s += whole * B
        if s < t:
            pieces.append((s, t - s, (1, 1, t - s), (s % P) // B))

    pos = e0
    if pos % P and pos < e1:
        head_end = min(e1, pos - pos % P + P)
        within_period(pos, head_end)
        pos = head_end
    periods = (e1 - pos) // P
    if periods:
        pieces.append((pos, periods * P, (periods, K, B), 0))
        pos += periods * P
    if pos < e1:
        within_period(pos, e1)
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
        self.entries: List[Tuple[int, int, int, List[Tuple[Tuple[int, int, int], int]]]] = []
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
            # Pieces of one tensor that cover the same range are read once, with all their views.
            by_range: Dict[Tuple[int, int], List[Tuple[Tuple[int, int, int], int]]] = {}
            row = plan.first_row[t]
            for (a, k, b) in views:
                for start, length, view, k0 in view_pieces(e0, e0 + numel, k, b):
                    by_range.setdefault((start - e0, length), []).append((view, row + k0))
                row += k
            for (start, length), vs in by_range.items():
                self.entries.append((t, start, length, vs))
        targets = [first + i for _, _, _, vs in self.entries for view, first in vs for i in range(view[1])]
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
        for t, start, length, vlist in self.entries:
            xs.append(thetas[t].narrow(0, start, length))
            ys.append(None if gs[t] is None else gs[t].narrow(0, start, length))
            zs.append(None if vs[t] is None else vs[t].narrow(0, start, length))
            views.append([v for v, _ in vlist])
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
