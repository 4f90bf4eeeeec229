"""``neural-mechanics bench``: the arguments, the parts in order under one soft time budget, and the
files (results.json after every case, results.md, scaling.png, this machine's RESULTS.md section)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.utils.benchmark as tb

from ..app.runner import OPTIMIZERS
from .cases import run_case
from .machine import machine_info, section_key
from .params import SET_BUILDERS, count_set, fmt_count, scaling_set, shrink
from .peers import ALL_PEERS, GB, GRAD_DTYPES, available_bytes, first_line
from .plot import plot_scaling
from .results import compact_summary, evaluate_goals, fmt_ratio, render_markdown, update_results_file
from .timing import Deadline, bandwidth
from .tracker import (TRACKER_OPTIMIZERS, TRACKER_VARIANTS, demo_workload, load_factory, tracker_overhead,
                      vgg16_bn_workload)

ALL_SETS = ("vgg16_bn", "resnet50", "gpt2")
ALL_PARTS = ("moments", "scaling", "count", "tracker")
PART_WEIGHTS = {"moments": 5.0, "scaling": 2.0, "count": 1.5, "tracker": 2.0}   # shares of --budget


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
    parser.add_argument("--optimizers", default=",".join(TRACKER_OPTIMIZERS),
                        help=f"comma list of the tracker part's optimizers, each measured on its own "
                             f"({', '.join(OPTIMIZERS)}; SGD with the workload's settings, the others with train's "
                             "defaults)")
    parser.add_argument("--tracker-variants", default=",".join(TRACKER_VARIANTS),
                        help=f"comma list of the tracker part's variants ({', '.join(TRACKER_VARIANTS)}; 'none', the "
                             "baseline, is always measured)")
    parser.add_argument("--flush-every", type=int, default=None,
                        help="SymmetryTracker flush_every of the tracker part (default: the workload's, else 50)")


@dataclass
class BenchRun:
    """One run of the command: its settings, what it measured so far, and where it writes."""
    args: argparse.Namespace
    device: torch.device
    parts: List[str]
    results: Dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    measurements: List[tb.Measurement] = field(default_factory=list)   # for the Compare tables

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def rounds(self) -> int:
        return self.args.repeat or (3 if self.quick else 7)

    @property
    def min_time(self) -> float:
        """Seconds of back-to-back calls per peer and round (``blocked_autorange``'s ``min_run_time``)."""
        return 0.02 if self.quick else (0.05 if self.cuda else 0.2)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {msg}", flush=True)

    def checkpoint(self) -> None:
        """Write what is measured so far (a run cut short by a time limit still leaves its numbers)."""
        if self.args.out:
            os.makedirs(self.args.out, exist_ok=True)
            tmp = os.path.join(self.args.out, "results.json.tmp")
            with open(tmp, "w") as f:
                json.dump(self.results, f, indent=1, default=_json_default)
            os.replace(tmp, os.path.join(self.args.out, "results.json"))


def bench_main(args: argparse.Namespace) -> int:
    """Run the selected parts, print the table, write JSON / markdown / plot / RESULTS.md."""
    threads = torch.get_num_threads()
    try:
        run = _start(args)
        if run is None:
            return 2
        _run_parts(run)
        _finish(run)
        return 0
    finally:
        torch.set_num_threads(threads)


def _start(args: argparse.Namespace) -> Optional[BenchRun]:
    """Check the device and parts, set the threads, record the machine and measure its bandwidth."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("neural-mechanics bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return None
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        print(f"neural-mechanics bench: unknown part {unknown[0]!r}; known: {', '.join(ALL_PARTS)}", file=sys.stderr)
        return None
    if "tracker" in parts:
        bad = [o for o in args.optimizers.split(",") if o not in OPTIMIZERS]
        if bad or not args.optimizers.strip(","):
            print(f"neural-mechanics bench: unknown optimizer {bad[0] if bad else args.optimizers!r}; known: "
                  f"{', '.join(OPTIMIZERS)}", file=sys.stderr)
            return None
        bad = [v for v in args.tracker_variants.split(",") if v and v not in TRACKER_VARIANTS]
        if bad:
            print(f"neural-mechanics bench: unknown tracker variant {bad[0]!r}; known: {', '.join(TRACKER_VARIANTS)}",
                  file=sys.stderr)
            return None
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = machine_info(device)
    meta["args"] = " ".join(sys.argv[2:]) if len(sys.argv) > 2 and sys.argv[1] == "bench" else ""
    run = BenchRun(args, device, parts, {"meta": meta, "skipped": []})
    run.log(f"bench on {section_key(meta)}; parts {', '.join(parts)}; {run.rounds} rounds; "
            f"load {meta.get('load_average')}")
    bw_bytes = (256 << 20) if run.quick else ((2 << 30) if run.cuda else (512 << 20))
    bw = run.results["bandwidth"] = bandwidth(device, bw_bytes, rounds=3 if run.quick else 7)
    run.log(f"bandwidth: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s")
    return run


def _run_parts(run: BenchRun) -> None:
    """Each part under its share of the budget; a part that fails is reported, the others go on."""
    budget = Deadline(run.args.budget)
    remaining = sum(PART_WEIGHTS[p] for p in run.parts)
    for part in run.parts:
        deadline = budget.share(PART_WEIGHTS[part], remaining)
        remaining -= PART_WEIGHTS[part]
        try:
            if part == "moments":
                _moments_part(run, deadline)
            elif part in ("scaling", "count"):
                _sweep_part(run, part, deadline)
            elif part == "tracker":
                run.results["tracker"] = _tracker_part(run, deadline)
        except Exception as exc:  # one failed part must not lose the others' numbers
            traceback.print_exc()
            run.results["skipped"].append(f"{part}: failed ({type(exc).__name__}: {first_line(exc)})")
            run.log(f"{part}: FAILED {type(exc).__name__}: {exc}")
        if run.cuda:
            torch.cuda.empty_cache()
        run.checkpoint()


def _finish(run: BenchRun) -> None:
    """Goals, results.md, the plot, RESULTS.md, and the tables printed at the end."""
    args, results, meta = run.args, run.results, run.results["meta"]
    with contextlib.suppress(OSError):
        meta["load_average_end"] = list(os.getloadavg())
    meta["wall_s"] = time.monotonic() - run.started
    results["goals"] = evaluate_goals(results)
    run.checkpoint()
    plot_path = None
    if args.out:
        plot_path = plot_scaling(results, os.path.join(args.out, "scaling.png"))
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"## {section_key(meta)}\n\n" + render_markdown(results, "scaling.png" if plot_path else None))
    if args.results:
        if plot_path is None:
            plot_path = plot_scaling(results, os.path.join(tempfile.mkdtemp(), "scaling.png"))
        run.log(f"updated section '{update_results_file(args.results, results, plot_path)}' of {args.results}")
    if run.measurements:
        compare = tb.Compare(run.measurements)
        compare.trim_significant_figures()
        print("\n" + str(compare), flush=True)
    print("\n" + compact_summary(results), flush=True)
    run.log(f"done in {meta['wall_s']:.0f} s")


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, set):
        return sorted(o)
    return repr(o)


def _peer_list(text: str) -> List[str]:
    peers = [p for p in text.split(",") if p]
    return peers if "ours" in peers else ["ours"] + peers


def _moments_part(run: BenchRun, deadline: Deadline) -> None:
    args = run.args
    sets, dtypes = [s for s in args.sets.split(",") if s], [d for d in args.grad_dtypes.split(",") if d]
    for s in sets:
        if s not in SET_BUILDERS:
            raise ValueError(f"unknown set {s!r}; known: {', '.join(SET_BUILDERS)}")
    cases = [(s, d) for d in dtypes for s in sets]   # every set in fp32 first: what a cut run keeps
    out = run.results.setdefault("moments", [])
    for i, (s, d) in enumerate(cases):
        pset = shrink(SET_BUILDERS[s](), args.shrink or (4 if run.quick else 1))
        case_deadline = deadline.share(1, len(cases) - i)
        if i > 0 and deadline.passed():
            run.results["skipped"].append(f"moments {pset.name} {d}: time budget spent")
            continue
        run.log(f"moments: {pset.name} ({fmt_count(pset.numel)} params, {pset.num_tensors} tensors) g {d}")
        rec = run_case(pset, run.device, GRAD_DTYPES[d], _peer_list(args.peers), rounds=run.rounds,
                       compile_mode=args.compile_mode, deadline=case_deadline, min_time=run.min_time,
                       slow_budget=5.0 if run.quick else 30.0, log=run.log, label="slice_moments: model sets",
                       collect=run.measurements)
        o = rec["peers"]["ours"]
        run.log(f"    ours {o['seconds']['median'] * 1e3:.2f} ms ({o['gbps']:.1f} GB/s)" +
                "".join(f", {n} {fmt_ratio(p['ratio']['median'])}" for n, p in rec["peers"].items()
                        if n != "ours" and p["status"] == "ok")
                + (f", {rec['floor']['fraction']['median'] * 100:.0f}% of floor" if "floor" in rec else ""))
        out.append(rec)
        run.checkpoint()


def _sweep_points(run: BenchRun, kind: str):
    """(parameter set, whether the reference runs there, label) of each point of a sweep."""
    args = run.args
    if kind == "scaling":
        if args.scaling_sizes:
            sizes = _parse_sizes(args.scaling_sizes)
        elif run.quick:
            sizes = [1_000_000, 4_000_000, 16_000_000]
        else:
            sizes = [1_000_000, 4_000_000, 16_000_000, 64_000_000, 128_000_000, 300_000_000]
            if run.cuda:
                sizes += [1_000_000_000, 2_000_000_000]
        ref_max = args.ref_max_params or (2e9 if run.cuda else 32e6)
        return [(scaling_set(n), n <= ref_max, fmt_count(n)) for n in sizes]
    total = int(args.count_total or ((1 << 22) if run.quick else (1 << 26)))
    counts = _parse_sizes(args.counts) if args.counts else ([1, 16, 256, 4096] if run.quick else
                                                            [1, 16, 256, 4096, 65536])
    return [(count_set(total, c), c <= args.ref_max_tensors, str(c)) for c in counts]


def _sweep_part(run: BenchRun, kind: str, deadline: Deadline) -> None:
    peers = _peer_list(run.args.sweep_peers)
    points = _sweep_points(run, kind)
    out = run.results.setdefault(kind, [])
    for i, (pset, ref_ok, label) in enumerate(points):
        need = pset.numel * 12
        if need > 0.8 * available_bytes(run.device):
            run.results["skipped"].append(f"{kind} {label}: needs {need / GB:.1f} GB")
            continue
        if i > 0 and deadline.passed():
            run.results["skipped"].append(f"{kind} {label} and larger: time budget spent")
            break
        run.log(f"{kind}: {label} ({fmt_count(pset.numel)} params, {pset.num_tensors} tensors)")
        rec = run_case(pset, run.device, torch.float32, [p for p in peers if p != "reference" or ref_ok],
                       rounds=max(3, min(run.rounds, 5)), compile_mode=run.args.compile_mode,
                       deadline=deadline.share(1, len(points) - i), min_time=run.min_time,
                       slow_budget=5.0 if run.quick else 15.0, check=False, log=run.log,
                       label=f"slice_moments: {kind}", collect=run.measurements)
        if "reference" in peers and not ref_ok:
            rec["peers"]["reference"] = {"status": "skipped (above --ref-max)"}
        rec["label"] = label
        o = rec["peers"]["ours"]
        run.log(f"    ours {o['seconds']['median'] * 1e3:.3g} ms ({o['gbps']:.1f} GB/s)"
                + (f", floor {rec['floor']['gbps']:.1f} GB/s" if "floor" in rec else ""))
        out.append(rec)
        run.checkpoint()


def _tracker_part(run: BenchRun, deadline: Deadline) -> Dict[str, Any]:
    args = run.args
    if args.model:
        workload = load_factory(args.model)(run.device)
    elif run.cuda:
        workload = vgg16_bn_workload(run.device, batch=16 if run.quick else 128, size=32 if run.quick else 64)
    else:
        workload = demo_workload(run.device, batch=32 if run.quick else None)
    flush = args.flush_every or workload.flush_every or 50
    if run.quick:
        flush = min(flush, 5)
    steps = args.tracker_steps or flush
    rounds = args.tracker_rounds or (2 if run.quick else 7)
    optimizers = [o for o in args.optimizers.split(",") if o]
    variants = ["none"] + [v for v in args.tracker_variants.split(",") if v and v != "none"]
    run.log(f"tracker: {workload.name}; {', '.join(optimizers)}; {rounds} rounds x {steps} steps per variant")
    rec = tracker_overhead(workload, run.device, rounds=rounds, block_steps=steps, warmup_steps=flush,
                           flush_every=flush, variants=variants, optimizers=optimizers, deadline=deadline, log=run.log)
    for o in rec["optimizers"]:
        for v, e in o["variants"].items():
            ov = e.get("overhead")
            run.log(f"    {o['optimizer']:6s} {v:15s} {e['step_ms']['median']:.2f} ms/step"
                    + ("" if ov is None else f"  {ov['median'] * 100:+.2f}%"))
    return rec


def _parse_sizes(text: str) -> List[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]
