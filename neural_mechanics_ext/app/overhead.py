"""The tracker's cost on a training step, measured one way for ``train`` (the direct overhead in
summary.json) and ``bench`` (the tracker table).

ONE model and ONE optimizer train in interleaved blocks: each round runs one block of ``block_steps``
steps per variant (no tracker, a tracker, ...) in an order rotated by one every round, and a variant's
overhead is the median over rounds of (its block / the plain block of the same round) - 1.  Why this
way, and not with the usual independent timings:

* one model, not one copy per variant: separate copies differ by a few percent in speed by themselves
  (memory placement), as much as the overhead being measured;
* paired rounds: on a machine shared with other processes, a burst of load hits the blocks of one round
  alike, so the ratio within a round survives it while the absolute times do not;
* whole blocks, each attaching a fresh tracker before the clock starts and ending with its ``sync()``
  (the host processing of every step of the block) before the clock stops: no processing escapes the
  measurement.  A block shorter than the tracker's flush interval flushes more often than a real run,
  so there the overhead is an upper bound.

The clock is ``torch.utils.benchmark.timer``, which synchronises the accelerator when one is in use.
Beside it, each block's CPU time of this process (``time.process_time``): on a machine whose cores are
shared with other jobs, time taken away by them is not in it (their pressure on caches and memory
bandwidth still is), so its paired ratio (``cpu_overhead``) is less noisy than the wall-clock one; it
misses time spent waiting (an accelerator, I/O), and with several threads it counts their spinning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import time

import torch.utils.benchmark as tb

from .timing import spread

# A variant attaches its tracker (or nothing: None) to the shared model and optimizer; the block closes it.
Variant = Callable[[], Optional[Any]]


@dataclass
class BlockTimes:
    """Per variant, seconds per step of each round's block (wall clock, and CPU time of the process);
    for variants whose tracker keeps ``timing`` (``SymmetryTracker``), its hook and processing seconds
    per step of each block."""
    seconds: Dict[str, List[float]]
    own: Dict[str, List[Tuple[float, float]]] = field(default_factory=dict)
    block_steps: int = 0
    cpu_seconds: Dict[str, List[float]] = field(default_factory=dict)


def interleaved_blocks(step: Callable[[], Any], variants: Dict[str, Variant], *, rounds: int, block_steps: int,
                       warmup_steps: int, stop: Optional[Callable[[], bool]] = None) -> BlockTimes:
    """Time ``step`` (one training step of the shared model) under every variant in interleaved blocks.

    A warm-up block of ``warmup_steps`` per variant comes first (allocations, momentum buffers, first
    calls).  ``stop()`` (a time budget) ends the rounds early, after two complete ones."""
    names = list(variants)
    for name in names:
        _block(step, variants[name], warmup_steps)
    out = BlockTimes({n: [] for n in names}, {n: [] for n in names}, block_steps, {n: [] for n in names})
    for r in range(rounds):
        if stop is not None and r >= 2 and stop():
            break
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds, cpu, own = _block(step, variants[name], block_steps)
            out.seconds[name].append(seconds)
            out.cpu_seconds[name].append(cpu)
            if own is not None:
                out.own[name].append(own)
    return out


def _block(step: Callable[[], Any], attach: Variant, steps: int
           ) -> Tuple[float, float, Optional[Tuple[float, float]]]:
    """Seconds per step of ``steps`` steps with ``attach``'s tracker (wall clock, CPU time of the
    process), and the tracker's own (hook, processing) seconds per step when it keeps ``timing``."""
    tracker = attach()
    try:
        start, cpu_start = tb.timer(), time.process_time()
        for _ in range(steps):
            step()
        if tracker is not None and hasattr(tracker, "sync"):
            tracker.sync()
        elapsed = (tb.timer() - start) / steps
        cpu = (time.process_time() - cpu_start) / steps
        timing = getattr(tracker, "timing", None)
        own = None if timing is None else (timing["hook_seconds"] / steps, timing["process_seconds"] / steps)
    finally:
        if tracker is not None:
            tracker.close()
    return elapsed, cpu, own


def overhead_summary(times: BlockTimes, baseline: str = "none") -> Dict[str, Dict[str, Any]]:
    """Per variant: ``step_ms`` (spread over rounds), ``overhead`` (spread of the paired block ratios
    minus one; not for the baseline), ``cpu_overhead`` (the same of the blocks' CPU times), and for
    trackers with timers ``hook_ms_per_step``, ``process_ms_per_step`` and ``own_share``: the tracker's
    own host time (hook + processing) as a share of a plain step, immune to the step-time noise of a
    busy machine but blind to indirect costs (caches, GPU time that the host does not wait for)."""
    base = times.seconds.get(baseline)
    out: Dict[str, Dict[str, Any]] = {}
    for name, secs in times.seconds.items():
        entry: Dict[str, Any] = {"step_ms": {k: (x * 1e3 if k != "n" else x) for k, x in spread(secs).items()}}
        if name != baseline and base is not None:
            entry["overhead"] = _paired_overhead(secs, base)
            cpu, cpu_base = times.cpu_seconds.get(name), times.cpu_seconds.get(baseline)
            if cpu and cpu_base:
                entry["cpu_overhead"] = _paired_overhead(cpu, cpu_base)
        own = times.own.get(name)
        if own:
            entry["hook_ms_per_step"] = spread([h for h, _ in own])["median"] * 1e3
            entry["process_ms_per_step"] = spread([p for _, p in own])["median"] * 1e3
            if base:
                entry["own_share"] = spread([h + p for h, p in own])["median"] / spread(base)["median"]
        out[name] = entry
    return out


def _paired_overhead(secs: List[float], base: List[float]) -> Dict[str, float]:
    """Spread over rounds of (block / the baseline's block of the same round) − 1."""
    ratio = spread([a / b for a, b in zip(secs, base) if b > 0])
    return {k: (x - 1 if k != "n" else x) for k, x in ratio.items()}
