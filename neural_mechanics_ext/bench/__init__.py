"""The benchmark suite (``neural-mechanics bench``): the fused kernels and the tracker against every peer.

Every comparison is made side by side in one process, so that ratios hold on a noisy machine: the
peers of one case are run in interleaved rounds (each round times every peer once, in a rotated order),
and every ratio is the median over rounds of the ratio *within* a round.  Medians, quartiles and the
number of rounds are reported with every time.

Parts (``--parts``):
  moments   ``slice_moments`` on the parameter sets of vgg16_bn, resnet50 and a GPT-2-small-sized
            transformer (θ, g, v; fp32 g and bf16 g) against the eager reference, ``torch.compile`` of
            the reference, ``torch._foreach_norm`` (per-tensor norms: a lower bound on launch
            overhead) and a plain streaming read of the same bytes (the memory floor).
  scaling   time against parameter count (1 M .. 300 M on CPU, .. 2 B on CUDA).
  count     time against the number of tensors at a fixed element count (launch overhead).
  tracker   training-step time with no tracker, a naive tracker (eager per-parameter ops in Python hooks
            with a host sync), and ``SymmetryTracker`` in both hook modes, interleaved in blocks.

Definitions used in the tables:
  bytes     Σ over tensors of numel × (bytes per element of θ + g + v): what one pass must read.
  GB/s      bytes / time (10^9 bytes per second), for every peer, so that peers compare on one scale.
  floor     the fastest plain-torch way measured to read the bytes once: per round, the faster of
            ``stream`` (one ``torch.sum`` per tensor of θ, g and v) and ``foreach_norm`` (three
            ``torch._foreach_norm`` calls); it reads the same bytes and does less arithmetic.
  read/copy bandwidth  of the machine, measured on one large contiguous buffer (``sum`` / ``copy_``;
            copy counts the bytes read plus the bytes written).

Everything is importable for the pytest-benchmark micro-benchmarks in ``bench/`` and for the smoke
test; ``bench_main(args)`` is the command.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

View = Tuple[int, int, int]
MB = 1e6
GB = 1e9

ALL_SETS = ("vgg16_bn", "resnet50", "gpt2")
ALL_PARTS = ("moments", "scaling", "count", "tracker")
ALL_PEERS = ("ours", "reference", "compiled", "foreach_norm", "stream")
READ_PEERS = ("stream", "foreach_norm")      # peers that only read the bytes: candidates for the floor
GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}

# The goals, reported (never asserted).  "min" goals are met when measured >= target.
GOALS = {
    "cpu": [("speed-up vs eager reference", "reference", 15.0),
            ("speed-up vs torch.compile", "compiled", 1.0),
            ("fraction of the streaming-read floor", "floor", 0.70),
            ("tracker overhead (demo net)", "tracker", 0.02)],
    "cuda": [("fraction of copy bandwidth", "copy", 0.80),
             ("speed-up vs torch.compile", "compiled", 1.2),
             ("tracker overhead (VGG-16-BN, batch 128)", "tracker", 0.01)],
}


# ================================================================================== parameter sets
@dataclass
class ParamSet:
    """Named parameter shapes and the views the tracker would read them with (no tensors yet)."""
    name: str
    shapes: List[Tuple[str, Tuple[int, ...]]]
    views: List[List[View]]
    note: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_slices(self) -> int:
        return sum(v[1] for vs in self.views for v in vs)

    def table(self) -> List[int]:
        """The op's flat ``(tensor, A, K, B, offset, a_stride)`` table (what the reference takes)."""
        from ..views import full
        out = []
        for i, vs in enumerate(self.views):
            for v in vs:
                out += [i, *full(v)]
        return out


def rows_view(shape: Sequence[int]) -> View:
    """Rows of a weight (one slice per output unit) or the entries of a vector: ``(1, out, rest)``."""
    n = math.prod(shape)
    out = shape[0] if len(shape) else 1
    return (1, out, n // out if out else 0)


def columns_view(shape: Sequence[int]) -> View:
    """Input columns of a Linear weight ``(out, in)``: ``(out, in, 1)``."""
    return (shape[0], shape[1], 1)


def _make_set(name, shapes, column_params, note) -> ParamSet:
    views = []
    for pname, shape in shapes:
        vs = [rows_view(shape)]
        if pname in column_params:
            vs.append(columns_view(shape))
        views.append(vs)
    return ParamSet(name, list(shapes), views, note)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn_shapes(num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """torchvision ``vgg16_bn`` parameter names and shapes, written out (no torchvision needed)."""
    shapes, i, cin = [], 0, 3
    for v in VGG16_CFG:
        if v == "M":
            i += 1
            continue
        shapes += [(f"features.{i}.weight", (v, cin, 3, 3)), (f"features.{i}.bias", (v,)),
                   (f"features.{i + 1}.weight", (v,)), (f"features.{i + 1}.bias", (v,))]
        i, cin = i + 3, v
    shapes += [("classifier.0.weight", (4096, 512 * 7 * 7)), ("classifier.0.bias", (4096,)),
               ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
               ("classifier.6.weight", (num_classes, 4096)), ("classifier.6.bias", (num_classes,))]
    return shapes


def resnet50_shapes(num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """torchvision ``resnet50`` parameter names and shapes, written out (no torchvision needed)."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for li, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p, out = f"layer{li}.{b}", planes * 4
            for c, (co, ci, k) in enumerate(((planes, inplanes, 1), (planes, planes, 3), (out, planes, 1)), start=1):
                shapes += [(f"{p}.conv{c}.weight", (co, ci, k, k)), (f"{p}.bn{c}.weight", (co,)),
                           (f"{p}.bn{c}.bias", (co,))]
            if b == 0:
                shapes += [(f"{p}.downsample.0.weight", (out, inplanes, 1, 1)),
                           (f"{p}.downsample.1.weight", (out,)), (f"{p}.downsample.1.bias", (out,))]
            inplanes = out
    shapes += [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]
    return shapes


def gpt2_shapes(vocab: int = 50257, positions: int = 1024, d: int = 768, layers: int = 12):
    """GPT-2 small in nn.Linear convention (weights ``(out, in)``); the LM head is tied to ``wte``."""
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (positions, d))]
    for b in range(layers):
        p = f"h.{b}"
        shapes += [(f"{p}.ln_1.weight", (d,)), (f"{p}.ln_1.bias", (d,)),
                   (f"{p}.attn.c_attn.weight", (3 * d, d)), (f"{p}.attn.c_attn.bias", (3 * d,)),
                   (f"{p}.attn.c_proj.weight", (d, d)), (f"{p}.attn.c_proj.bias", (d,)),
                   (f"{p}.ln_2.weight", (d,)), (f"{p}.ln_2.bias", (d,)),
                   (f"{p}.mlp.c_fc.weight", (4 * d, d)), (f"{p}.mlp.c_fc.bias", (4 * d,)),
                   (f"{p}.mlp.c_proj.weight", (d, 4 * d)), (f"{p}.mlp.c_proj.bias", (d,))]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def vgg16_bn_set() -> ParamSet:
    shapes = vgg16_bn_shapes()
    cols = {n for n, s in shapes if n.startswith("classifier.") and len(s) == 2}
    return _make_set("vgg16_bn", shapes, cols,
                     "rows of every weight and bias; columns of classifier.0/3/6")


def resnet50_set() -> ParamSet:
    return _make_set("resnet50", resnet50_shapes(), {"fc.weight"}, "rows of every weight and bias; columns of fc")


def gpt2_set() -> ParamSet:
    shapes = gpt2_shapes()
    # A pre-LN block's LayerNorm gain γ rescales against the input columns of the Linear that reads
    # the LN output (γ_i·α, W[:, i]/α): c_attn and c_fc; ln_f feeds the tied LM head, whose columns are
    # also the cross-entropy translation groups.  c_proj reads attention / GELU outputs: rows only.
    cols = {n for n, _ in shapes if n.endswith(("c_attn.weight", "c_fc.weight"))} | {"wte.weight"}
    return _make_set("gpt2", shapes, cols,
                     "rows of every weight and bias; columns of c_attn, c_fc (LN → Linear) and wte (tied head)")


SET_BUILDERS: Dict[str, Callable[[], ParamSet]] = {"vgg16_bn": vgg16_bn_set, "resnet50": resnet50_set,
                                                   "gpt2": gpt2_set}


def shrink(pset: ParamSet, factor: int) -> ParamSet:
    """The same architecture with every dimension above 8 divided by ``factor`` (quick runs, tests)."""
    if factor <= 1:
        return pset
    names = {n for n, _ in pset.shapes}
    small = [(n, tuple(max(1, d // factor) if d > 8 else d for d in s)) for n, s in pset.shapes]
    cols = {n for (n, _), vs in zip(pset.shapes, pset.views) if len(vs) > 1} & names
    return _make_set(f"{pset.name}/{factor}", small, cols, pset.note)


def scaling_set(numel: int, width: int = 2048) -> ParamSet:
    """About ``numel`` parameters as square ``width × width`` layers (fewer, smaller ones below one
    layer), rows on every layer and columns on the last (a classifier): a model-like mix whose tensor
    count grows with its size."""
    if numel >= width * width:
        shapes = [(f"layer{i}.weight", (width, width)) for i in range(max(1, round(numel / (width * width))))]
    else:
        side = max(1, int(math.isqrt(numel)))
        shapes = [("layer0.weight", (side, max(1, numel // side)))]
    return _make_set(f"scale-{_fmt_count(numel)}", shapes, {shapes[-1][0]}, "rows of every layer; columns of the last")


def count_set(total: int, count: int, inner: int = 256) -> ParamSet:
    """``total`` elements in ``count`` equal tensors of shape ``(total/count/inner, inner)``, rows view."""
    per = max(1, total // count)
    rows, cols = (per // inner, inner) if per >= inner else (1, per)
    shapes = [(f"t{i}", (rows, cols)) for i in range(count)]
    return _make_set(f"count-{count}", shapes, set(), "rows of every tensor")


# ================================================================================== inputs and peers
@dataclass
class Inputs:
    """Materialised θ, g, v for one parameter set."""
    pset: ParamSet
    xs: List[torch.Tensor]
    gs: List[torch.Tensor]
    vs: List[torch.Tensor]
    grad_dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.xs + self.gs + self.vs)


def materialize(pset: ParamSet, device, grad_dtype=torch.float32, seed: int = 0) -> Inputs:
    """Random θ (fp32), g (``grad_dtype``) and v (fp32) of the set's shapes, on ``device``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    xs, gs, vs = [], [], []
    for _, shape in pset.shapes:
        xs.append(torch.randn(shape, device=device, generator=gen))
        gs.append((torch.randn(shape, device=device, generator=gen) * 1e-3).to(grad_dtype))
        vs.append(torch.randn(shape, device=device, generator=gen) * 1e-2)
    return Inputs(pset, xs, gs, vs, grad_dtype, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeerFailed(Exception):
    """A peer that cannot run on a case (compile failure, not enough memory): reported, not raised."""


def reference_peak_bytes(inp: Inputs) -> int:
    """Memory the eager reference needs beyond its inputs: per view, three float64 copies and six
    float64 products of the largest tensor (the reference keeps all nine columns alive at once)."""
    return max(t.numel() for t in inp.xs) * 8 * 10


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def make_peer(name: str, inp: Inputs, compile_mode: str = "default") -> Tuple[Callable[[], Any], Dict[str, Any]]:
    """The zero-argument callable that runs peer ``name`` on ``inp``, and facts about its setup
    (``compile_s`` for compiled peers).  Raises PeerFailed with a readable reason."""
    from .. import ops as nmx_ops
    from ..reference import slice_moments_reference

    xs, gs, vs, views = inp.xs, inp.gs, inp.vs, inp.pset.views
    info: Dict[str, Any] = {}
    if name == "ours":
        return (lambda: nmx_ops.slice_moments(xs, views, gs, vs)), info
    if name in ("reference", "compiled"):
        need, avail = reference_peak_bytes(inp), available_bytes(inp.device)
        if name == "reference" and need > 0.8 * avail:
            raise PeerFailed(f"skipped: needs ~{need / GB:.1f} GB of float64 temporaries, "
                             f"{avail / GB:.1f} GB available")
        table = inp.pset.table()
        if name == "reference":
            return (lambda: slice_moments_reference(xs, gs, vs, table)), info
        try:
            torch._dynamo.reset()
            fn = torch.compile(slice_moments_reference, mode=None if compile_mode == "default" else compile_mode,
                               dynamic=False)
            start = time.perf_counter()
            fn(xs, gs, vs, table)
            sync(inp.device)
            info["compile_s"] = time.perf_counter() - start
        except Exception as exc:  # inductor errors come in many types; any of them is a failed peer
            raise PeerFailed(f"compile failed: {type(exc).__name__}: {_first_line(exc)}") from None
        return (lambda: fn(xs, gs, vs, table)), info
    if name == "foreach_norm":
        return (lambda: (torch._foreach_norm(xs), torch._foreach_norm(gs), torch._foreach_norm(vs))), info
    if name == "stream":
        tensors = xs + gs + vs
        return (lambda: [t.sum() for t in tensors]), info
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(ALL_PEERS)}")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ================================================================================== timing
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


def time_calls(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls (synchronised before and after on CUDA)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


@dataclass
class Measurement:
    """Per-round seconds per call of each peer (None where a peer sat a round out)."""
    rounds: Dict[str, List[Optional[float]]]
    calls: Dict[str, int]


def measure(peers: Dict[str, Callable[[], Any]], device: torch.device, rounds: int, *, min_time: float = 0.05,
            max_calls: int = 200, slow_budget: float = 30.0, deadline: Optional[Deadline] = None,
            baseline: str = "ours", first: Optional[Dict[str, float]] = None) -> Measurement:
    """Interleaved timing: every round times each peer once (``calls`` back-to-back calls, enough for
    ``min_time`` seconds), in an order rotated by one each round so no peer always follows the same
    one.  A slow peer (one call over ``slow_budget / rounds``) runs in only as many rounds as fit into
    ``slow_budget`` seconds, at least one; its warm-up call counts as its first round when a single
    call takes over a second.  ``first`` holds single-call times already taken (they replace the
    warm-up call).  Rounds stop early at the deadline, after two complete rounds (or one when even
    that does not fit)."""
    names = list(peers)
    times: Dict[str, List[Optional[float]]] = {n: [None] * rounds for n in names}
    calls, allowed = {}, {}
    for n in names:  # warm up and calibrate
        t1 = (first or {}).get(n)
        if t1 is None:
            t1 = time_calls(peers[n], 1, device)
        calls[n] = int(min(max_calls, max(1, math.ceil(min_time / max(t1, 1e-7)))))
        allowed[n] = rounds if t1 * rounds <= slow_budget else max(1, int(slow_budget // max(t1, 1e-9)))
        if t1 > 1.0:
            times[n][0] = t1
    done = 0
    for r in range(rounds):
        if deadline is not None and deadline.passed() and done >= min(2, rounds):
            break
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if times[n][r] is not None or r >= allowed[n]:
                continue
            if n != baseline and deadline is not None and deadline.passed() and r > 0:
                continue
            times[n][r] = time_calls(peers[n], calls[n], device)
        done = r + 1
    for n in names:
        if done < rounds:
            times[n] = times[n][:done]
    return Measurement(times, calls)


def quantiles(values: Sequence[float]) -> Dict[str, float]:
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": math.nan, "q1": math.nan, "q3": math.nan, "min": math.nan, "max": math.nan, "n": 0}

    def q(p):
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"median": q(0.5), "q1": q(0.25), "q3": q(0.75), "min": v[0], "max": v[-1], "n": len(v)}


def paired_ratios(num: Sequence[Optional[float]], den: Sequence[Optional[float]]) -> Dict[str, float]:
    """Quantiles of num[r] / den[r] over the rounds where both ran."""
    return quantiles([a / b for a, b in zip(num, den) if a is not None and b is not None and b > 0])


def floor_rounds(m: Measurement) -> Tuple[List[Optional[float]], Dict[str, int]]:
    """Per round, the fastest read-only peer (the streaming-read floor), and how often each won."""
    out, wins = [], {}
    n = len(next(iter(m.rounds.values()))) if m.rounds else 0
    for r in range(n):
        cands = [(m.rounds[p][r], p) for p in READ_PEERS if p in m.rounds and m.rounds[p][r] is not None]
        if cands:
            t, p = min(cands)
            out.append(t)
            wins[p] = wins.get(p, 0) + 1
        else:
            out.append(None)
    return out, wins


# ================================================================================== machine bandwidth
def bandwidth(device: torch.device, nbytes: int, rounds: int = 5) -> Dict[str, float]:
    """Read (``sum``) and copy (``copy_``, read + write bytes) rates of one large fp32 buffer, GB/s."""
    n = nbytes // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    read = measure({"read": lambda: a.sum(), "copy": lambda: b.copy_(a)}, device, rounds, min_time=0.1,
                   baseline="read")
    out = {"buffer_bytes": float(n * 4)}
    for name, factor in (("read", 1), ("copy", 2)):
        q = quantiles(read.rounds[name])
        out[f"{name}_gbps"] = factor * n * 4 / q["median"] / GB
        out[f"{name}_gbps_best"] = factor * n * 4 / q["min"] / GB
    del a, b
    return out


# ================================================================================== one moments case
def run_case(pset: ParamSet, device: torch.device, grad_dtype: torch.dtype, peer_names: Sequence[str], *,
             rounds: int, compile_mode: str = "default", deadline: Optional[Deadline] = None,
             min_time: float = 0.05, slow_budget: float = 30.0, check: bool = True,
             log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Time ``slice_moments`` and its peers on one parameter set; a JSON-ready record."""
    inp = materialize(pset, device, grad_dtype)
    rec: Dict[str, Any] = {
        "set": pset.name, "note": pset.note, "grad_dtype": _dtype_name(grad_dtype), "params": pset.numel,
        "tensors": pset.num_tensors, "slices": pset.num_slices, "bytes": inp.nbytes, "peers": {},
    }
    peers, infos, failed = {}, {}, {}
    for name in peer_names:
        try:
            start = time.perf_counter()
            fn, info = make_peer(name, inp, compile_mode)
            peers[name], infos[name] = fn, info
            if "compile_s" in info:
                log(f"    {name}: compiled in {info['compile_s']:.1f} s")
            elif time.perf_counter() - start > 1:
                log(f"    {name}: set up in {time.perf_counter() - start:.1f} s")
        except PeerFailed as exc:
            failed[name] = str(exc)
            log(f"    {name}: {exc}")
    if "ours" not in peers:
        raise RuntimeError("the 'ours' peer must be measured (it is every ratio's denominator)")

    errors, first = {}, {}
    if check and "reference" in peers:
        # The reference's result checks ours and the compiled one; its (long) call is also its warm-up.
        sync(device)
        start = time.perf_counter()
        want = peers["reference"]()
        sync(device)
        first["reference"] = time.perf_counter() - start
        scale = want.abs().amax(0).clamp_min(1e-300)
        for name in ("ours", "compiled"):
            if name in peers:
                got = peers[name]()
                errors[name] = float(((got - want).abs().amax(0) / scale).max())
        del want
    m = measure(peers, device, rounds, min_time=min_time, slow_budget=slow_budget, deadline=deadline, first=first)
    floor, wins = floor_rounds(m)
    ours = m.rounds["ours"]
    for name in peer_names:
        if name in failed:
            rec["peers"][name] = {"status": failed[name]}
            continue
        q = quantiles(m.rounds[name])
        entry = {"status": "ok", "seconds": q, "calls": m.calls[name], "gbps": inp.nbytes / q["median"] / GB,
                 **infos[name]}
        if name != "ours":
            entry["ratio"] = paired_ratios(m.rounds[name], ours)   # > 1: ours is faster
        if name in errors:
            entry["max_rel_error"] = errors[name]
        rec["peers"][name] = entry
    if any(t is not None for t in floor):
        q = quantiles(floor)
        rec["floor"] = {"seconds": q, "gbps": inp.nbytes / q["median"] / GB, "winner": wins,
                        "fraction": paired_ratios(floor, ours)}   # floor time / our time: our share of it
    del peers, inp
    gc.collect()
    return rec


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dt]


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v >= 10 or v == int(v) else f"{v:.1f}{unit}"
    return str(int(n))


# ================================================================================== tracker overhead
@dataclass
class Workload:
    """A training step to time: a model factory (same initial weights every call), one fixed batch,
    the loss, and how the batch was chosen."""
    name: str
    make_model: Callable[[], torch.nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable = torch.nn.functional.cross_entropy
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    note: str = ""
    families: Optional[list] = None
    flush_every: Optional[int] = None   # the tracker's flush interval in this workload's real use


def vgg16_bn_model(num_classes: int = 200) -> torch.nn.Module:
    """VGG-16-BN with torchvision's parameter names, built without torchvision."""
    nn = torch.nn
    layers, cin = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    model = nn.Sequential()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    model.flatten = nn.Flatten()
    model.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(4096, num_classes))
    return model


def vgg16_bn_workload(device, batch: int = 128, size: int = 64, classes: int = 200) -> Workload:
    """VGG-16-BN on one Tiny-ImageNet-shaped batch (``batch`` × 3 × ``size`` × ``size``, 200 classes)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)

    def make():
        torch.manual_seed(0)
        return vgg16_bn_model(classes).to(device)

    return Workload(f"vgg16_bn b{batch} {size}x{size}", make, x, y,
                    note=f"VGG-16-BN (torchvision layout, {classes} classes), batch {batch} of 3x{size}x{size} "
                         "(Tiny ImageNet shape), SGD lr 0.01 momentum 0.9 wd 5e-4, one fixed batch")


def standin_net() -> torch.nn.Module:
    """A small VGG-style CNN (the stand-in for the demo net until ``models.demo_net`` exists)."""
    nn = torch.nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                         nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, 10))


def demo_workload(device, batch: Optional[int] = None) -> Workload:
    """The demo net as ``neural-mechanics demo`` trains it: ``models.demo_net()`` (3×32×32 inputs, 10
    classes) with the demo's batch size, SGD settings and tracker flush interval (``runner.RunConfig``
    defaults: batch 128, lr 0.05, momentum 0.9, weight decay 5e-4, flush every 25), on one fixed batch.
    Without ``neural_mechanics_ext.models`` (a partial installation) a stand-in CNN of the same kind is
    used and named as such in the results."""
    try:
        models = importlib.import_module("neural_mechanics_ext.app.models")
        make_net, name = models.demo_net, "demo_net"
    except (ImportError, AttributeError):
        make_net, name = standin_net, "stand-in CNN"
    settings = {"batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "flush_every": 25}
    try:
        from ..app.runner import RunConfig
        defaults = RunConfig()
        settings = {k: getattr(defaults, k, v) for k, v in settings.items()}
    except Exception:  # the runner is optional here: its defaults are copied above
        pass
    batch = batch or int(settings["batch_size"])
    shape = (3, 32, 32)

    def make():
        torch.manual_seed(0)
        return make_net().to(device)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch,) + shape, generator=gen).to(device)
    with torch.no_grad():
        probe = make()
        classes = probe(x[:2]).shape[-1]
        params = sum(p.numel() for p in probe.parameters())
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    what = ("models.demo_net" if name == "demo_net" else
            "STAND-IN for the demo net (neural_mechanics_ext.models.demo_net not available): 7-layer VGG-style CNN")
    note = (f"{what} ({_fmt_count(params)} parameters), batch {batch} of 3x32x32, {classes} classes, SGD lr "
            f"{settings['lr']} momentum {settings['momentum']} wd {settings['weight_decay']}, one fixed batch")
    return Workload(f"{name} b{batch}", make, x, y, lr=settings["lr"], momentum=settings["momentum"],
                    weight_decay=settings["weight_decay"], note=note, flush_every=int(settings["flush_every"]))


def load_factory(spec: str) -> Callable[..., Workload]:
    """``module:callable`` → the callable (called with ``device``)."""
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--model wants MODULE:CALLABLE, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


class NaiveTracker:
    """What a user would write by hand: in an optimizer step pre-hook, for every member of every
    family, nine eager reductions over the ``(A, K, B)`` view of θ, g and v in the parameters' dtype,
    summed into the family's groups with their signs, then brought to the host (one sync per family)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, families):
        self.optimizer = optimizer
        named = dict(model.named_parameters())
        self.families = [(f, [(named[n], v, s) for n, v, s in f.members]) for f in families]
        self.history: List[List[list]] = []
        self._handle = optimizer.register_step_pre_hook(self._hook)

    @torch.no_grad()
    def _hook(self, optimizer, args, kwargs):
        row = []
        for f, members in self.families:
            acc = None
            for p, (a, k, b), sign in members:
                x = p.view(a, k, b)
                g = p.grad.view(a, k, b) if p.grad is not None else torch.zeros_like(x)
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                v = buf.view(a, k, b) if buf is not None else torch.zeros_like(x)
                m = torch.stack([t.sum((0, 2)) for t in (x, g, v, x * x, g * g, v * v, x * g, x * v, g * v)], 1)
                acc = sign * m if acc is None else acc + sign * m
            row.append(acc.cpu().tolist())
        self.history.append(row)

    def close(self):
        self._handle.remove()


TRACKER_VARIANTS = ("none", "naive", "ours-optimizer", "ours-backward")


def tracker_overhead(workload: Workload, device: torch.device, *, rounds: int, block_steps: int,
                     warmup_steps: int, flush_every: int, variants: Sequence[str] = TRACKER_VARIANTS,
                     deadline: Optional[Deadline] = None, log: Callable[[str], None] = lambda s: None
                     ) -> Dict[str, Any]:
    """Training-step time of each variant on ONE model and optimizer (separate copies differ by a few
    percent in speed by themselves: memory placement), interleaved in blocks of ``block_steps`` steps
    (one round = one block of every variant, order rotated per round).  Each block attaches its
    variant's tracker before the clock starts and includes the tracker's ``sync()`` (processing every
    step of the block on the host) before it stops, so no processing escapes the measurement."""
    from ..tracker import SymmetryTracker

    families = workload.families
    setup = {}
    if families is None:
        from ..symmetry import find_symmetries
        start = time.perf_counter()
        base = workload.make_model()
        families = find_symmetries(base, workload.inputs[:4])
        setup["find_symmetries_s"] = time.perf_counter() - start
        del base
        log(f"    find_symmetries: {len(families)} families in {setup['find_symmetries_s']:.1f} s")
    model = workload.make_model()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=workload.lr, momentum=workload.momentum,
                          weight_decay=workload.weight_decay)

    def attach(v):
        if v == "naive":
            return NaiveTracker(model, opt, families)
        if v.startswith("ours-"):
            return SymmetryTracker(model, opt, families=families, hook=v.split("-", 1)[1], flush_every=flush_every)
        return None

    def step():
        opt.zero_grad(set_to_none=True)
        loss = workload.loss_fn(model(workload.inputs), workload.targets)
        loss.backward()
        opt.step()

    own: Dict[str, List[float]] = {v: [] for v in variants}

    def block(v, steps):
        tracker = attach(v)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if isinstance(tracker, SymmetryTracker):
            tracker.sync()
        sync(device)
        elapsed = (time.perf_counter() - start) / steps
        if isinstance(tracker, SymmetryTracker):
            own[v].append((tracker.timing["hook_seconds"] / steps, tracker.timing["process_seconds"] / steps))
        if tracker is not None:
            tracker.close()
        return elapsed

    for v in variants:
        block(v, warmup_steps)
    for v in variants:
        own[v].clear()
    times: Dict[str, List[float]] = {v: [] for v in variants}
    for r in range(rounds):
        if deadline is not None and deadline.passed() and r >= 2:
            break
        order = list(variants[r % len(variants):]) + list(variants[: r % len(variants)])
        for v in order:
            times[v].append(block(v, block_steps))
    rec: Dict[str, Any] = {"workload": workload.name, "note": workload.note, "device": str(device),
                           "rounds": len(times[variants[0]]), "block_steps": block_steps,
                           "warmup_steps": warmup_steps, "flush_every": flush_every,
                           "families": len(families), "groups": sum(f.num_groups for f in families),
                           "tracked_params": _tracked_params(model, families), **setup,
                           "variants": {}}
    for v in variants:
        entry = {"step_ms": {k: (x * 1e3 if k != "n" else x) for k, x in quantiles(times[v]).items()}}
        if v != "none" and "none" in times:
            ratio = paired_ratios(times[v], times["none"])
            entry["overhead"] = {k: (x - 1 if k != "n" else x) for k, x in ratio.items()}
        if own[v]:
            # The tracker's own host time (hook + processing) as a share of a plain step: immune to the
            # step-time noise of a busy machine, blind to indirect costs (caches, GPU time not waited for).
            entry["hook_ms_per_step"] = statistics.median(h for h, _ in own[v]) * 1e3
            entry["process_ms_per_step"] = statistics.median(p for _, p in own[v]) * 1e3
            if "none" in times:
                total = statistics.median(h + p for h, p in own[v])
                entry["own_share"] = total / quantiles(times["none"])["median"]
        rec["variants"][v] = entry
    del model, opt
    gc.collect()
    return rec


def _tracked_params(model, families) -> int:
    named = dict(model.named_parameters())
    return sum(named[n].numel() for n in {n for f in families for n in f.param_names})


# ================================================================================== machine information
def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on: processor, memory, accelerator, versions, date, load."""
    from .. import _backend

    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "memory_gb": _mem_total_gb(),
        "build_info": _backend.build_info(), "git": _git_head(),
        "package": os.path.dirname(os.path.abspath(_backend.__file__)),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_sms=props.multi_processor_count, cuda_runtime=torch.version.cuda,
                    gpu_capability=f"{props.major}.{props.minor}")
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                info["nvidia_smi"] = out.stdout.strip()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gb() -> Optional[float]:
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    return None


def _git_head() -> Optional[str]:
    with contextlib.suppress(Exception):
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=10"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    return None


# ================================================================================== goals and tables
def evaluate_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each goal against the measurement that decides it: the worst case over the moments table
    (every set and gradient dtype must meet it), and the tracker's worse hook mode."""
    dev = results["meta"]["device"]
    rows = []
    cases = results.get("moments", [])
    for label, key, target in GOALS["cuda" if dev == "cuda" else "cpu"]:
        measured, where = None, ""
        if key in ("reference", "compiled"):
            vals = [(c["peers"][key]["ratio"]["median"], c) for c in cases
                    if c["peers"].get(key, {}).get("status") == "ok"]
            if vals:
                measured, c = min(vals, key=lambda t: t[0])
                where = f"{c['set']} {c['grad_dtype']}"
        elif key == "floor":
            vals = [(c["floor"]["fraction"]["median"], c) for c in cases if "floor" in c]
            if vals:
                measured, c = min(vals, key=lambda t: t[0])
                where = f"{c['set']} {c['grad_dtype']}"
        elif key == "copy":
            bw = results.get("bandwidth", {}).get("copy_gbps")
            vals = [(c["peers"]["ours"]["gbps"] / bw, c) for c in cases if bw]
            if vals:
                measured, c = min(vals, key=lambda t: t[0])
                where = f"{c['set']} {c['grad_dtype']}"
        elif key == "tracker" and results.get("tracker"):
            t = results["tracker"]
            # The goal is about the default hook ("optimizer", the faster safe mode); the backward
            # mode's row is reported beside it in the tracker table.
            if "ours-optimizer" in t["variants"]:
                measured = t["variants"]["ours-optimizer"]["overhead"]["median"]
                where = f"{t['workload']}, hook=optimizer (default)"
        is_max = key == "tracker"
        met = None if measured is None else (measured <= target if is_max else measured >= target)
        rows.append({"goal": label, "target": target, "max" if is_max else "min": True, "measured": measured,
                     "where": where, "met": met})
    return rows


def _ms(s: Optional[float]) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(r: Optional[float]) -> str:
    if r is None or math.isnan(r):
        return "-"
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def moments_table(cases: List[Dict[str, Any]]) -> str:
    """Markdown: one row per (set, g dtype, peer) with time, spread, GB/s and ours' speed-up."""
    head = ("| set | g | params | tensors | MB | peer | ms (median) | IQR ms | rounds | GB/s | ours faster by "
            "| notes |\n|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|---|")
    lines = [head]
    for c in cases:
        first = True
        rows = list(c["peers"].items())
        if "floor" in c:
            rows.append(("floor", {"status": "ok", "seconds": c["floor"]["seconds"], "gbps": c["floor"]["gbps"],
                                   "fraction": c["floor"]["fraction"], "winner": c["floor"]["winner"]}))
        for name, p in rows:
            lead = (f"| {c['set']} | {c['grad_dtype']} | {_fmt_count(c['params'])} | {c['tensors']} | "
                    f"{c['bytes'] / MB:.0f} |" if first else "| | | | | |")
            first = False
            if p["status"] != "ok":
                lines.append(f"{lead} {name} | - | - | - | - | - | {p['status']} |")
                continue
            s = p["seconds"]
            notes = []
            if "compile_s" in p:
                notes.append(f"compile {p['compile_s']:.1f} s")
            if "max_rel_error" in p:
                notes.append(f"max rel err {p['max_rel_error']:.1e}")
            if name == "floor":
                notes.append("fastest of " + ", ".join(f"{k} {v}" for k, v in p["winner"].items()))
                speed = f"{p['fraction']['median'] * 100:.0f}% of floor"
            else:
                speed = "" if name == "ours" else _x(p["ratio"]["median"])
                if name != "ours" and p["ratio"]["n"] > 1:
                    speed += f" ({_x(p['ratio']['q1'])}-{_x(p['ratio']['q3'])})"
            lines.append(f"{lead} {name} | {_ms(s['median'])} | {_ms(s['q1'])}-{_ms(s['q3'])} | {s['n']} | "
                         f"{p['gbps']:.1f} | {speed} | {'; '.join(notes)} |")
    return "\n".join(lines)


def sweep_table(points: List[Dict[str, Any]], key: str) -> str:
    peers = []
    for pt in points:
        for n in pt["peers"]:
            if n not in peers:
                peers.append(n)
    head = f"| {key} | params | tensors | " + " | ".join(f"{p} ms" for p in peers) + " | ours GB/s | floor GB/s |"
    lines = [head, "|" + "--:|" * (3 + len(peers) + 2)]
    for pt in points:
        cells = []
        for p in peers:
            e = pt["peers"].get(p)
            cells.append("-" if e is None else (_ms(e["seconds"]["median"]) if e["status"] == "ok" else "skip"))
        floor = pt.get("floor", {}).get("gbps")
        lines.append(f"| {pt['label']} | {_fmt_count(pt['params'])} | {pt['tensors']} | " + " | ".join(cells)
                     + f" | {pt['peers']['ours']['gbps']:.1f} | {'-' if floor is None else f'{floor:.1f}'} |")
    return "\n".join(lines)


def tracker_table(t: Dict[str, Any]) -> str:
    lines = ["| variant | ms/step (median) | IQR ms | overhead (median) | overhead IQR | hook ms/step "
             "| flush ms/step | own time / plain step |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for v, e in t["variants"].items():
        s = e["step_ms"]
        o = e.get("overhead")
        ov = "-" if o is None else f"{o['median'] * 100:+.2f}%"
        oq = "-" if o is None else f"{o['q1'] * 100:+.2f}% .. {o['q3'] * 100:+.2f}%"
        hook = f"{e['hook_ms_per_step']:.2f}" if "hook_ms_per_step" in e else "-"
        proc = f"{e['process_ms_per_step']:.2f}" if "process_ms_per_step" in e else "-"
        own = f"{e['own_share'] * 100:.2f}%" if "own_share" in e else "-"
        lines.append(f"| {v} | {s['median']:.2f} | {s['q1']:.2f}-{s['q3']:.2f} | {ov} | {oq} | {hook} | {proc} "
                     f"| {own} |")
    return "\n".join(lines)


def goals_table(goals: List[Dict[str, Any]]) -> str:
    lines = ["| goal | target | measured (worst case) | where | |", "|---|--:|--:|---|---|"]
    for g in goals:
        pct = "overhead" in g["goal"] or "fraction" in g["goal"]
        fmt = (lambda v: f"{v * 100:.1f}%") if pct else (lambda v: f"{v:.2f}x")
        target = ("≤ " if g.get("max") else "≥ ") + fmt(g["target"])
        measured = "-" if g["measured"] is None else fmt(g["measured"])
        mark = "not measured" if g["met"] is None else ("met" if g["met"] else "**MISSED**")
        lines.append(f"| {g['goal']} | {target} | {measured} | {g['where']} | {mark} |")
    return "\n".join(lines)


def machine_lines(meta: Dict[str, Any]) -> str:
    b = meta.get("build_info", {})
    parts = [f"- date: {meta['date']}; git {meta.get('git') or '?'}; package {meta.get('package', '?')}",
             f"- CPU: {meta['cpu']}, {meta['cpu_count']} logical cores, torch threads {meta['torch_threads']}, "
             f"RAM {meta.get('memory_gb')} GB",
             f"- versions: python {meta['python']}, torch {meta['torch']}, numpy {meta.get('numpy', '?')}, "
             f"neural-mechanics-ext {b.get('version')} (compiled={b.get('compiled')}, cuda kernels={b.get('cuda')}, "
             f"openmp={b.get('openmp')})"]
    if meta["device"] == "cuda":
        parts.append(f"- GPU: {meta.get('gpu')} ({meta.get('gpu_memory_gb')} GiB, {meta.get('gpu_sms')} SMs, "
                     f"sm_{str(meta.get('gpu_capability', '')).replace('.', '')}), CUDA {meta.get('cuda_runtime')}, "
                     f"nvidia-smi: {meta.get('nvidia_smi', '?')}")
    if "load_average" in meta:
        la = meta["load_average"]
        end = meta.get("load_average_end")
        parts.append(f"- load average at start {la[0]:.2f}" + (f", at end {end[0]:.2f}" if end else "")
                     + f" (on {meta['cpu_count']} cores: above ~0.5 per core the numbers are noisy)")
    if meta.get("args"):
        parts.append(f"- command: `neural-mechanics bench {meta['args']}`")
    return "\n".join(parts)


def render_markdown(results: Dict[str, Any], plot_name: Optional[str] = None) -> str:
    """The results as one markdown section (also what goes into RESULTS.md)."""
    meta = results["meta"]
    out = [machine_lines(meta), ""]
    bw = results.get("bandwidth")
    if bw:
        out += [f"Machine bandwidth ({bw['buffer_bytes'] / MB:.0f} MB fp32 buffer): read (sum) "
                f"{bw['read_gbps']:.1f} GB/s (best {bw['read_gbps_best']:.1f}), copy (read + write) "
                f"{bw['copy_gbps']:.1f} GB/s (best {bw['copy_gbps_best']:.1f}).", ""]
    if results.get("goals"):
        out += ["**Goals**", "", goals_table(results["goals"]), ""]
    if results.get("moments"):
        out += ["**slice_moments on model parameter sets** (θ fp32, v fp32, g as listed; 'ours faster by' = "
                "median over rounds of peer time / our time in the same round, IQR in brackets)", "",
                moments_table(results["moments"]), ""]
    if results.get("scaling"):
        out += ["**Scaling with parameter count**", "", sweep_table(results["scaling"], "size"), ""]
    if results.get("count"):
        c = results["count"]
        out += [f"**Scaling with tensor count** (fixed {_fmt_count(c[0]['params'])} elements)", "",
                sweep_table(c, "tensors"), ""]
    if plot_name:
        out += [f"![scaling curves]({plot_name})", ""]
    if results.get("tracker"):
        t = results["tracker"]
        out += [f"**Tracker overhead**: {t['note']}; {t['families']} families, {t['groups']} groups, "
                f"{_fmt_count(t['tracked_params'])} tracked parameters; {t['rounds']} interleaved rounds of "
                f"{t['block_steps']} steps per variant (flush every {t['flush_every']})", "", tracker_table(t), ""]
    if results.get("skipped"):
        out += ["Skipped: " + "; ".join(results["skipped"]), ""]
    return "\n".join(out)


def plot_scaling(results: Dict[str, Any], path: str) -> Optional[str]:
    """Time against parameter count and against tensor count, one line per peer; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(k, t) for k, t in (("scaling", "parameters"), ("count", "tensors (fixed element count)"))
              if results.get(k)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    bw = results.get("bandwidth", {}).get("read_gbps")
    for ax, (key, xlabel) in zip(axes[0], panels):
        pts = results[key]
        xs = [p["params"] if key == "scaling" else p["tensors"] for p in pts]
        names = list(dict.fromkeys(n for p in pts for n in p["peers"]))
        for n in names:
            sel = [(x, p["peers"][n]["seconds"]) for x, p in zip(xs, pts)
                   if p["peers"].get(n, {}).get("status") == "ok"]
            if sel:
                ax.errorbar([x for x, _ in sel], [s["median"] * 1e3 for _, s in sel],
                            yerr=[[(s["median"] - s["q1"]) * 1e3 for _, s in sel],
                                  [(s["q3"] - s["median"]) * 1e3 for _, s in sel]],
                            marker="o", ms=3, capsize=2, label=n, lw=2.2 if n == "ours" else 1.2)
        if bw:
            ax.plot(xs, [p["bytes"] / (bw * GB) * 1e3 for p in pts], "k--", lw=1,
                    label=f"bytes / read bandwidth ({bw:.0f} GB/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    meta = results["meta"]
    where = meta.get("gpu") if meta["device"] == "cuda" else f"{meta['cpu']} ({meta['torch_threads']} threads)"
    fig.suptitle(f"slice_moments (θ, g, v fp32) on {where}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RESULTS_HEADER = """# Benchmark results

Written by `neural-mechanics bench --results bench/RESULTS.md` (one section per machine and device,
replaced on every run on that machine; see bench/README.md for what each column means and how the
suite measures).  Do not edit the sections by hand: rerun the suite.
"""


def section_key(meta: Dict[str, Any]) -> str:
    who = meta.get("gpu") if meta["device"] == "cuda" else f"{meta['cpu']} x{meta['cpu_count']}"
    return f"{meta['device']}: {who}"


def update_results_file(path: str, results: Dict[str, Any], plot_path: Optional[str]) -> str:
    """Replace (or append) this machine's section of the RESULTS.md at ``path``; copy the plot next to it."""
    key = section_key(results["meta"])
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")[:60]
    plot_name = None
    if plot_path and os.path.exists(plot_path):
        plot_name = f"scaling-{slug}.png"
        target = os.path.join(os.path.dirname(os.path.abspath(path)), plot_name)
        if os.path.abspath(plot_path) != target:
            import shutil
            shutil.copyfile(plot_path, target)
    begin, end = f"<!-- nmx-bench begin {key} -->", f"<!-- nmx-bench end {key} -->"
    body = f"{begin}\n## {key}\n\n{render_markdown(results, plot_name)}\n{end}\n"
    text = open(path).read() if os.path.exists(path) else RESULTS_HEADER
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        _, after = rest.split(end, 1)
        text = before + body.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(text)
    return key


def compact_summary(results: Dict[str, Any]) -> str:
    """The short plain-text table printed at the end of a run (the markdown files hold everything)."""
    meta = results["meta"]
    lines = [f"neural-mechanics bench: {section_key(meta)}; torch {meta['torch']}; {meta['date']}; "
             f"load {', '.join(f'{x:.1f}' for x in meta.get('load_average', [])[:1])}"
             + (f" -> {meta['load_average_end'][0]:.1f}" if meta.get("load_average_end") else "")]
    bw = results.get("bandwidth")
    if bw:
        lines.append(f"bandwidth: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s")
    cases = results.get("moments", [])
    if cases:
        peers = [p for p in ALL_PEERS if p != "ours" and any(p in c["peers"] for c in cases)]
        lines.append("")
        lines.append(f"{'set':14s} {'g':4s} {'ours ms':>9s} {'GB/s':>7s} {'floor':>6s} {'copy':>6s} "
                     + " ".join(f"{p:>13s}" for p in peers))
        copy = bw.get("copy_gbps") if bw else None
        for c in cases:
            o = c["peers"]["ours"]
            fl = f"{c['floor']['fraction']['median'] * 100:.0f}%" if "floor" in c else "-"
            cp = f"{o['gbps'] / copy * 100:.0f}%" if copy else "-"
            cells = []
            for p in peers:
                e = c["peers"].get(p)
                cells.append("-" if e is None else (_x(e["ratio"]["median"]) if e["status"] == "ok"
                                                    else ("failed" if "fail" in e["status"] else "skipped")))
            lines.append(f"{c['set']:14s} {c['grad_dtype']:4s} {_ms(o['seconds']['median']):>9s} {o['gbps']:7.1f} "
                         f"{fl:>6s} {cp:>6s} " + " ".join(f"{x:>13s}" for x in cells))
        lines.append("(floor / copy: our GB/s as a share of the streaming-read floor / of copy bandwidth; "
                     "peer columns: how many times faster ours is)")
    for key, title in (("scaling", "params"), ("count", "tensors")):
        pts = results.get(key)
        if pts:
            lines.append("")
            lines.append(f"{key}: " + "; ".join(
                f"{p['label']} {_ms(p['peers']['ours']['seconds']['median'])} ms "
                f"{p['peers']['ours']['gbps']:.0f} GB/s"
                + (f" (floor {p['floor']['gbps']:.0f})" if "floor" in p else "") for p in pts))
    t = results.get("tracker")
    if t:
        lines.append("")
        lines.append(f"tracker ({t['workload']}): " + "; ".join(
            f"{v} {e['step_ms']['median']:.2f} ms" + (f" {e['overhead']['median'] * 100:+.2f}%" if "overhead" in e else "")
            + (f" (own time {e['own_share'] * 100:.2f}%)" if "own_share" in e else "")
            for v, e in t["variants"].items()))
    if results.get("goals"):
        lines.append("")
        for g in results["goals"]:
            pct = "overhead" in g["goal"] or "fraction" in g["goal"]
            fmt = (lambda v: f"{v * 100:.1f}%") if pct else (lambda v: f"{v:.2f}x")
            mark = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
            lines.append(f"goal {g['goal']}: {'<=' if g.get('max') else '>='} {fmt(g['target'])}, measured "
                         f"{'-' if g['measured'] is None else fmt(g['measured'])} ({g['where'] or '-'}): {mark}")
    if results.get("skipped"):
        lines.append("skipped: " + "; ".join(results["skipped"]))
    return "\n".join(lines)


# ================================================================================== the command
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    parser.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma list of {', '.join(ALL_PARTS)}")
    parser.add_argument("--sets", default=",".join(ALL_SETS), help=f"comma list of {', '.join(ALL_SETS)}")
    parser.add_argument("--grad-dtypes", default="fp32,bf16", help="gradient dtypes of the moments part")
    parser.add_argument("--peers", default=",".join(ALL_PEERS), help=f"comma list of {', '.join(ALL_PEERS)}")
    parser.add_argument("--sweep-peers", default="ours,reference,foreach_norm,stream",
                        help="peers of the scaling and count sweeps (torch.compile recompiles at every point)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few rounds: a run of seconds to a minute (plumbing, not numbers)")
    parser.add_argument("--shrink", type=int, default=None,
                        help="divide every dimension above 8 of the model sets by this (default 1, quick 4)")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved rounds per case (default 7, quick 3)")
    parser.add_argument("--out", default=None, help="folder for results.json, results.md and scaling.png")
    parser.add_argument("--results", default=None, help="RESULTS.md to update with this machine's section")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the 'compiled' peer (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--budget", type=float, default=None,
                        help="soft time budget in seconds for the whole run (rounds and sweep points are cut)")
    parser.add_argument("--scaling-sizes", default=None, help="comma list of parameter counts, e.g. 1e6,1e8")
    parser.add_argument("--count-total", type=float, default=None, help="elements of the tensor-count sweep")
    parser.add_argument("--counts", default=None, help="comma list of tensor counts")
    parser.add_argument("--ref-max-params", type=float, default=None,
                        help="largest sweep point at which the eager reference runs (default 32M CPU, 2B CUDA)")
    parser.add_argument("--ref-max-tensors", type=int, default=4096,
                        help="largest tensor count at which the eager reference runs in the count sweep")
    parser.add_argument("--model", default=None,
                        help="tracker workload factory MODULE:CALLABLE (called with the device); default: the demo "
                             "net on CPU, VGG-16-BN batch 128 at 64x64 on CUDA")
    parser.add_argument("--tracker-rounds", type=int, default=None, help="interleaved blocks per variant")
    parser.add_argument("--tracker-steps", type=int, default=None, help="steps per block (default = flush interval)")
    parser.add_argument("--flush-every", type=int, default=None,
                        help="SymmetryTracker flush_every of the tracker part (default: the workload's, else 50)")


def _parse_sizes(text: str) -> List[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def bench_main(args: argparse.Namespace) -> int:
    """Run the selected parts, print the table, write JSON / markdown / plot / RESULTS.md."""
    threads = torch.get_num_threads()
    try:
        return _bench(args)
    finally:
        torch.set_num_threads(threads)


def _bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("neural-mechanics bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    quick = args.quick
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in ALL_PARTS:
            print(f"neural-mechanics bench: unknown part {p!r}; known: {', '.join(ALL_PARTS)}", file=sys.stderr)
            return 2
    rounds = args.repeat or (3 if quick else 7)
    started = time.monotonic()
    budget = Deadline(args.budget)
    weights = {"moments": 5.0, "scaling": 2.0, "count": 1.5, "tracker": 2.0}

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {msg}", flush=True)

    meta = machine_info(device)
    argv = " ".join(sys.argv[2:]) if len(sys.argv) > 2 and sys.argv[1] == "bench" else ""
    meta["args"] = argv
    results: Dict[str, Any] = {"meta": meta, "skipped": []}
    log(f"bench on {section_key(meta)}; parts {', '.join(parts)}; {rounds} rounds; load {meta.get('load_average')}")

    bw_bytes = (256 << 20) if quick else ((2 << 30) if cuda else (512 << 20))
    results["bandwidth"] = bandwidth(device, bw_bytes, rounds=3 if quick else 7)
    log(f"bandwidth: read {results['bandwidth']['read_gbps']:.1f} GB/s, copy {results['bandwidth']['copy_gbps']:.1f} GB/s")

    remaining = sum(weights[p] for p in parts)
    min_time = 0.02 if quick else (0.05 if cuda else 0.2)
    slow_budget = 5.0 if quick else 30.0

    def checkpoint() -> None:
        """Write what is measured so far (a run cut short by a time limit still leaves its numbers)."""
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            tmp = os.path.join(args.out, "results.json.tmp")
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1, default=_json_default)
            os.replace(tmp, os.path.join(args.out, "results.json"))

    for part in parts:
        deadline = budget.share(weights[part], remaining)
        remaining -= weights[part]
        try:
            if part == "moments":
                _moments_part(args, device, rounds, quick, deadline, min_time, slow_budget, log, results,
                              checkpoint)
            elif part in ("scaling", "count"):
                _sweep_part(part, args, device, rounds, quick, deadline, min_time, log, results, checkpoint)
            elif part == "tracker":
                results["tracker"] = _tracker_part(args, device, quick, deadline, log)
        except Exception as exc:  # one failed part must not lose the others' numbers
            import traceback
            traceback.print_exc()
            results["skipped"].append(f"{part}: failed ({type(exc).__name__}: {_first_line(exc)})")
            log(f"{part}: FAILED {type(exc).__name__}: {exc}")
        if cuda:
            torch.cuda.empty_cache()
        checkpoint()

    with contextlib.suppress(OSError):
        meta["load_average_end"] = list(os.getloadavg())
    meta["wall_s"] = time.monotonic() - started
    results["goals"] = evaluate_goals(results)
    checkpoint()

    plot_path = None
    if args.out:
        plot_path = plot_scaling(results, os.path.join(args.out, "scaling.png"))
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"## {section_key(meta)}\n\n" + render_markdown(results, "scaling.png" if plot_path else None))
    if args.results:
        if plot_path is None:
            import tempfile
            plot_path = plot_scaling(results, os.path.join(tempfile.mkdtemp(), "scaling.png"))
        key = update_results_file(args.results, results, plot_path)
        log(f"updated section '{key}' of {args.results}")
    print("\n" + compact_summary(results), flush=True)
    log(f"done in {meta['wall_s']:.0f} s")
    return 0


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, set):
        return sorted(o)
    return repr(o)


def _moments_part(args, device, rounds, quick, deadline, min_time, slow_budget, log, results, checkpoint):
    sets = [s for s in args.sets.split(",") if s]
    dtypes = [d for d in args.grad_dtypes.split(",") if d]
    peers = [p for p in args.peers.split(",") if p]
    if "ours" not in peers:
        peers.insert(0, "ours")
    for s in sets:
        if s not in SET_BUILDERS:
            raise ValueError(f"unknown set {s!r}; known: {', '.join(SET_BUILDERS)}")
    cases = [(s, d) for d in dtypes for s in sets]   # every set in fp32 first: what a cut run keeps
    out = results.setdefault("moments", [])
    for i, (s, d) in enumerate(cases):
        pset = shrink(SET_BUILDERS[s](), args.shrink or (4 if quick else 1))
        case_deadline = deadline.share(1, len(cases) - i)
        if i > 0 and deadline.passed():
            results["skipped"].append(f"moments {pset.name} {d}: time budget spent")
            continue
        log(f"moments: {pset.name} ({_fmt_count(pset.numel)} params, {pset.num_tensors} tensors) g {d}")
        rec = run_case(pset, device, GRAD_DTYPES[d], peers, rounds=rounds, compile_mode=args.compile_mode,
                       deadline=case_deadline, min_time=min_time, slow_budget=slow_budget, log=log)
        o = rec["peers"]["ours"]
        log(f"    ours {o['seconds']['median'] * 1e3:.2f} ms ({o['gbps']:.1f} GB/s)" +
            "".join(f", {n} {_x(p['ratio']['median'])}" for n, p in rec["peers"].items()
                    if n != "ours" and p["status"] == "ok")
            + (f", {rec['floor']['fraction']['median'] * 100:.0f}% of floor" if "floor" in rec else ""))
        out.append(rec)
        checkpoint()


def _sweep_part(kind, args, device, rounds, quick, deadline, min_time, log, results, checkpoint):
    cuda = device.type == "cuda"
    peers = [p for p in args.sweep_peers.split(",") if p]
    if "ours" not in peers:
        peers.insert(0, "ours")
    if kind == "scaling":
        if args.scaling_sizes:
            sizes = _parse_sizes(args.scaling_sizes)
        elif quick:
            sizes = [1_000_000, 4_000_000, 16_000_000]
        else:
            sizes = [1_000_000, 4_000_000, 16_000_000, 64_000_000, 128_000_000, 300_000_000]
            if cuda:
                sizes += [1_000_000_000, 2_000_000_000]
        ref_max = args.ref_max_params or (2e9 if cuda else 32e6)
        points = [(scaling_set(n), n <= ref_max, _fmt_count(n)) for n in sizes]
    else:
        total = int(args.count_total or ((1 << 22) if quick else (1 << 26)))
        counts = _parse_sizes(args.counts) if args.counts else ([1, 16, 256, 4096] if quick else
                                                                [1, 16, 256, 4096, 65536])
        points = [(count_set(total, c), c <= args.ref_max_tensors, str(c)) for c in counts]
    out = results.setdefault(kind, [])
    sweep_rounds = max(3, min(rounds, 5))
    for i, (pset, ref_ok, label) in enumerate(points):
        need = pset.numel * 12
        if need > 0.8 * available_bytes(device):
            results["skipped"].append(f"{kind} {label}: needs {need / GB:.1f} GB")
            continue
        if i > 0 and deadline.passed():
            results["skipped"].append(f"{kind} {label} and larger: time budget spent")
            break
        use = [p for p in peers if p != "reference" or ref_ok]
        log(f"{kind}: {label} ({_fmt_count(pset.numel)} params, {pset.num_tensors} tensors)")
        rec = run_case(pset, device, torch.float32, use, rounds=sweep_rounds, compile_mode=args.compile_mode,
                       deadline=deadline.share(1, len(points) - i), min_time=min_time,
                       slow_budget=5.0 if quick else 15.0, check=False, log=log)
        if "reference" in peers and not ref_ok:
            rec["peers"]["reference"] = {"status": "skipped (above --ref-max)"}
        rec["label"] = label
        o = rec["peers"]["ours"]
        log(f"    ours {o['seconds']['median'] * 1e3:.3g} ms ({o['gbps']:.1f} GB/s)"
            + (f", floor {rec['floor']['gbps']:.1f} GB/s" if "floor" in rec else ""))
        out.append(rec)
        checkpoint()


def _tracker_part(args, device, quick, deadline, log):
    cuda = device.type == "cuda"
    if args.model:
        workload = load_factory(args.model)(device)
    elif cuda:
        workload = vgg16_bn_workload(device, batch=16 if quick else 128, size=32 if quick else 64)
    else:
        workload = demo_workload(device, batch=32 if quick else None)
    flush = args.flush_every or workload.flush_every or 50
    if quick:
        flush = min(flush, 5)
    steps = args.tracker_steps or flush
    rounds = args.tracker_rounds or (2 if quick else 7)
    log(f"tracker: {workload.name}; {rounds} rounds x {steps} steps per variant")
    rec = tracker_overhead(workload, device, rounds=rounds, block_steps=steps, warmup_steps=flush,
                           flush_every=flush, deadline=deadline, log=log)
    for v, e in rec["variants"].items():
        o = e.get("overhead")
        log(f"    {v:15s} {e['step_ms']['median']:.2f} ms/step" + ("" if o is None else f"  {o['median'] * 100:+.2f}%"))
    return rec
