"""How the suite times its peers: ``torch.utils.benchmark`` timers in interleaved rounds.

Each peer gets a ``torch.utils.benchmark.Timer`` (which synchronises the accelerator around every timed
block and runs at the thread count the suite runs at), and every round asks each peer's timer for one
``blocked_autorange`` (block size chosen by the timer, at least ``min_time`` seconds of calls; the
round's value is its median seconds per call).  The rounds are what ``torch.utils.benchmark`` does not
do for us, and they are the point: each round times every peer once, in an order rotated by one every
round, and a ratio is the median over rounds of the ratio *within* a round, so that a burst of load
from another process on a shared machine hits numerator and denominator alike.  Back-to-back
measurements of one peer after the other would put the burst into one side of the ratio only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.benchmark as tb

from ..app.timing import spread
from .peers import GB, READ_PEERS


class Deadline:
    """A soft time budget: phases and rounds check it and stop early (reporting what they did)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if not seconds else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0

    def share(self, weight: float, remaining_weight: float) -> "Deadline":
        """A sub-deadline holding ``weight / remaining_weight`` of the time left (unused time rolls on)."""
        d = Deadline(None)
        if self.end is not None:
            d.end = time.monotonic() + max(0.0, self.left()) * weight / max(remaining_weight, weight)
        return d


@dataclass
class Rounds:
    """Per peer, seconds per call in each round (None where the peer sat a round out), the block size
    of its last round, and its blocks merged into one ``torch.utils.benchmark.Measurement`` (for
    ``Compare``)."""
    seconds: Dict[str, List[Optional[float]]]
    calls: Dict[str, int]
    measurements: Dict[str, tb.Measurement] = field(default_factory=dict)


def measure(peers: Dict[str, Callable[[], Any]], rounds: int, *, min_time: float = 0.05,
            slow_budget: float = 30.0, deadline: Optional[Deadline] = None, baseline: str = "ours",
            first: Optional[Dict[str, float]] = None, timer: Optional[Callable[[], float]] = None,
            label: str = "", sub_label: str = "") -> Rounds:
    """Interleaved rounds of ``blocked_autorange(min_time)`` per peer (see the module's docstring).

    Before the rounds, one ``blocked_autorange`` per peer warms it up and sizes it (``first`` holds
    single-call times already taken: they replace it).  A slow peer (a round of it costing over
    ``slow_budget / rounds``) runs in only as many rounds as fit into ``slow_budget`` seconds, at least
    one; when one call takes over a second, its warm-up counts as its first round.  Rounds stop early at
    the deadline, after two complete rounds (or one when even that does not fit); the baseline peer is
    never cut from a started round.  ``timer`` replaces the wall clock (``time.thread_time`` measures
    the calling thread's CPU time on one thread)."""
    names = list(peers)
    kwargs = {} if timer is None else {"timer": timer}
    timers = {n: tb.Timer("fn()", globals={"fn": peers[n]}, label=label, sub_label=sub_label, description=n,
                          num_threads=torch.get_num_threads(), **kwargs) for n in names}
    seconds: Dict[str, List[Optional[float]]] = {n: [None] * rounds for n in names}
    blocks: Dict[str, List[tb.Measurement]] = {n: [] for n in names}
    allowed = {}
    for n in names:
        t1 = (first or {}).get(n)
        if t1 is None:
            warm = timers[n].blocked_autorange(min_run_time=min_time)
            t1 = warm.median
            if t1 > 1.0:
                blocks[n].append(warm)
        if t1 > 1.0:
            seconds[n][0] = t1
        per_round = max(min_time, 2 * t1)   # blocked_autorange sizes its block with one call, then times
        allowed[n] = rounds if per_round * rounds <= slow_budget else max(1, int(slow_budget // per_round))
    done = 0
    for r in range(rounds):
        if deadline is not None and deadline.passed() and done >= min(2, rounds):
            break
        for n in names[r % len(names):] + names[: r % len(names)]:
            if seconds[n][r] is not None or r >= allowed[n]:
                continue
            if n != baseline and deadline is not None and deadline.passed() and r > 0:
                continue
            m = timers[n].blocked_autorange(min_run_time=min_time)
            seconds[n][r] = m.median
            blocks[n].append(m)
        done = r + 1
    seconds = {n: s[:done] for n, s in seconds.items()}
    merged = {n: tb.Measurement.merge(b)[0] for n, b in blocks.items() if b}
    return Rounds(seconds, {n: b[-1].number_per_run if b else 1 for n, b in blocks.items()}, merged)


def paired_ratios(num: Sequence[Optional[float]], den: Sequence[Optional[float]]) -> Dict[str, float]:
    """Spread of num[r] / den[r] over the rounds where both ran."""
    return spread([a / b for a, b in zip(num, den) if a is not None and b is not None and b > 0])


def floor_rounds(m: Rounds) -> Tuple[List[Optional[float]], Dict[str, int]]:
    """Per round, the fastest read-only peer (the streaming-read floor), and how often each won."""
    out, wins = [], {}
    n = len(next(iter(m.seconds.values()))) if m.seconds else 0
    for r in range(n):
        cands = [(m.seconds[p][r], p) for p in READ_PEERS if p in m.seconds and m.seconds[p][r] is not None]
        if cands:
            t, p = min(cands)
            out.append(t)
            wins[p] = wins.get(p, 0) + 1
        else:
            out.append(None)
    return out, wins


def bandwidth(device: torch.device, nbytes: int, rounds: int = 5) -> Dict[str, float]:
    """Read (``sum``) and copy (``copy_``, read + write bytes) rates of one large fp32 buffer, GB/s."""
    n = nbytes // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    m = measure({"read": lambda: a.sum(), "copy": lambda: b.copy_(a)}, rounds, min_time=0.1, baseline="read")
    out = {"buffer_bytes": float(n * 4)}
    for name, factor in (("read", 1), ("copy", 2)):
        q = spread(m.seconds[name])
        out[f"{name}_gbps"] = factor * n * 4 / q["median"] / GB
        out[f"{name}_gbps_best"] = factor * n * 4 / q["min"] / GB
    del a, b
    return out
