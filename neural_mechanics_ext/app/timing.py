"""Wall-clock timing shared by the commands: device synchronisation, the time of one training step, and the
spread of repeated timings."""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_step(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], inputs, targets, *,
                       repeats: int = 3, lr: float = 1e-3) -> float:
    """Median wall time of one training step (forward, backward, ``torch.optim.SGD`` step) on
    ``(inputs, targets)``, on a deep copy of ``model`` (after one warm-up step); the yardstick of a
    check's cost."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
    device = next(m.parameters()).device
    times = []
    for i in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(m(inputs), targets).backward()
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def spread(values: Sequence[Optional[float]]) -> Dict[str, float]:
    """Median, quartiles (linear interpolation, as ``numpy.percentile``), min, max and count of the
    values that are not None: how every repeated timing of ``train`` and ``bench`` is reported."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": math.nan, "q1": math.nan, "q3": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    q1, median, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0],) * 3
    return {"median": median, "q1": q1, "q3": q3, "min": v[0], "max": v[-1], "n": len(v)}
