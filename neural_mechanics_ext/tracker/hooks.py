"""The step path's reads: what one moment pass reads (``Stream``) and the three ways the pass is made.

* plain: one ``slice_moments`` call in the optimizer's step pre-hook;
* backward mode: one call per bucket of about ``bucket_elems`` elements, started as soon as the bucket's
  gradients are accumulated (on a side stream on CUDA), re-done at the step for any bucket whose
  gradients changed since (clipping, unscaling and accumulation bump their version counters);
* sharded (FSDP2): :class:`~neural_mechanics_ext.distributed.ShardedMoments`, one all_reduce per step.

All three give the same ``[slices, 9]`` tensor and never synchronise with the host.
"""
from __future__ import annotations

import functools
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..plan import MomentPlan
from ..theory import update_direction


class Stream(NamedTuple):
    """The tensors one moment pass reads beside θ, one entry per tracked tensor (None: read as zeros).

    Plain streams (``mode`` None) are the y and z of ``slice_moments``: SGD's gradient and momentum buffer.
    A fused stream (``mode`` "adam" or "lion") holds the gradients in ``y`` and the optimizer state in
    ``state`` ((exp_avg, exp_avg_sq, max_exp_avg_sq) lists); the kernel forms (p, u) from them while it
    sums the moments (``adam_moments``/``lion_moments``), with each tensor's scalars in ``scalars`` and
    its step settings in ``meta``."""

    y: List[Optional[torch.Tensor]]
    z: List[Optional[torch.Tensor]]
    meta: Optional[list] = None
    mode: Optional[str] = None
    state: Optional[Tuple[list, list, list]] = None
    scalars: Optional[List[Tuple[float, ...]]] = None

    def part(self, r: range) -> "Stream":
        """The entries of the plan's tensors ``r`` (a bucket)."""
        cut = lambda xs: None if xs is None else xs[r.start:r.stop]
        state = None if self.state is None else tuple(cut(s) for s in self.state)
        return Stream(cut(self.y), cut(self.z), cut(self.meta), self.mode, state, cut(self.scalars))

    def formed(self, params) -> "Stream":
        """The plain stream (p, u) of a fused one, formed with the reference ``update_direction``: for the
        passes that take plain streams only (sharded, FSDP2).  Costs two tensors per parameter."""
        if self.mode is None:
            return self
        ys, zs = [], []
        with torch.no_grad():
            for i, (p, g, hp) in enumerate(zip(params, self.y, self.meta)):
                if g is None:
                    ys.append(None), zs.append(None)
                    continue
                names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                state = {n: s[i] for n, s in zip(names, self.state) if s[i] is not None}
                pre, u = update_direction(p.detach(), g, state, hp)
                ys.append(pre), zs.append(u)
        return Stream(ys, zs, self.meta)


def read_moments(plan: MomentPlan, stream: Stream, tensors: Optional[range] = None) -> torch.Tensor:
    """The one fused pass over ``stream`` (of the plan's tensors ``tensors``, default all of them)."""
    if stream.mode is not None:
        return plan.stream_moments(stream.mode, stream.y, stream.state, stream.scalars, tensors=tensors)
    return plan.slice_moments(stream.y, stream.z, tensors=tensors)


def moment_pass(plan: MomentPlan, sharded=None, backward: Optional["BackwardBuckets"] = None
                ) -> Callable[[Stream], torch.Tensor]:
    """The pass the pre-hook makes on a step's stream: sharded, gathered from buckets, or plain."""
    if sharded is not None:
        return lambda stream: sharded(*stream.formed(plan.params)[:2])
    if backward is not None:
        return backward.gather
    return functools.partial(read_moments, plan)


def _grad_stamp(grads) -> list:
    """Identity and version of each gradient: any in-place change since bumps the version."""
    return [None if g is None else (id(g), g._version) for g in grads]


class BackwardBuckets:
    """Backward mode: the moments of each bucket of tensors, started when its gradients are ready.

    Args:
        plan: the tracker's plan.
        bucket_elems: about this many parameter elements per bucket.
        stream_of: the stream of a range of the plan's tensors, read at the time of the call.
        timing: the tracker's timers (``hook_seconds`` counts the work done in the gradient hooks).
    """

    def __init__(self, plan: MomentPlan, bucket_elems: int, stream_of: Callable[[range], Stream],
                 timing: Dict[str, float]):
        self.plan, self._stream_of, self._timing = plan, stream_of, timing
        self.buckets: List[range] = []
        start, size = 0, 0
        for t, p in enumerate(plan.params):
            size += p.numel()
            if size >= bucket_elems or t == len(plan.params) - 1:
                self.buckets.append(range(start, t + 1))
                start, size = t + 1, 0
        self._bucket_of = {t: b for b, r in enumerate(self.buckets) for t in r}
        self._ready: set = set()
        self._launched: Dict[int, Tuple[torch.Tensor, list]] = {}
        device = plan.params[0].device
        self._device = device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._warned_accumulation = False
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, t))
                        for t, p in enumerate(plan.params)]

    def _on_grad(self, t: int, param: torch.Tensor):
        start = time.perf_counter()
        if t in self._ready and not self._warned_accumulation:  # a second backward before the step
            self._warned_accumulation = True
            warnings.warn("SymmetryTracker(hook='backward'): gradients are accumulated over several backward "
                          "passes; the moments are taken at the optimizer step instead", stacklevel=2)
        self._ready.add(t)
        b = self._bucket_of[t]
        r = self.buckets[b]
        if all(i in self._ready for i in r):
            stream = self._stream_of(r)
            if self._side is not None:
                self._side.wait_stream(torch.cuda.current_stream(self._device))
                with torch.cuda.stream(self._side):
                    out = read_moments(self.plan, stream, r)
                for g in stream.y:
                    if g is not None:
                        g.record_stream(self._side)
            else:
                out = read_moments(self.plan, stream, r)
            self._launched[b] = (out, _grad_stamp(stream.y))
        self._timing["hook_seconds"] += time.perf_counter() - start

    def gather(self, stream: Stream) -> torch.Tensor:
        """The moments of every bucket: launched during backward when still valid, else computed now."""
        if self._side is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._side)
        pieces = []
        for b, r in enumerate(self.buckets):
            launched = self._launched.get(b)
            now = stream.part(r)
            if launched is None or self._warned_accumulation or launched[1] != _grad_stamp(now.y):
                pieces.append(read_moments(self.plan, now, r))
            else:
                pieces.append(launched[0])
        self._ready.clear()
        self._launched.clear()
        return torch.cat(pieces)
