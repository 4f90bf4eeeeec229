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


class Stream(NamedTuple):
    """The tensors one moment pass reads beside θ, one entry per tracked tensor (None: read as zeros).

    They are the y and z of ``slice_moments``; the optimizer theory chooses them (SGD: the gradient and
    the momentum buffer).  A theory whose fused kernel mode reads more tensors adds fields here."""

    y: List[Optional[torch.Tensor]]
    z: List[Optional[torch.Tensor]]

    def part(self, r: range) -> "Stream":
        """The entries of the plan's tensors ``r`` (a bucket)."""
        return Stream(self.y[r.start:r.stop], self.z[r.start:r.stop])


def read_moments(plan: MomentPlan, stream: Stream, tensors: Optional[range] = None) -> torch.Tensor:
    """The one fused pass over ``stream`` (of the plan's tensors ``tensors``, default all of them)."""
    return plan.slice_moments(stream.y, stream.z, tensors=tensors)


def moment_pass(plan: MomentPlan, sharded=None, backward: Optional["BackwardBuckets"] = None
                ) -> Callable[[Stream], torch.Tensor]:
    """The pass the pre-hook makes on a step's stream: sharded, gathered from buckets, or plain."""
    if sharded is not None:
        return lambda stream: sharded(stream.y, stream.z)
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
