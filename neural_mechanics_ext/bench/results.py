"""The suite's results as text: the goals judged, the markdown tables, this machine's section of
RESULTS.md, and the short summary printed at the end of a run (also from a partial results.json)."""
from __future__ import annotations

import math
import os
import re
import shutil
from typing import Any, Dict, List, Optional

from .machine import section_key
from .params import fmt_count
from .peers import ALL_PEERS, MB

# The goals, reported (never asserted).  "min" goals are met when measured >= target.
GOALS = {
    "cpu": [("speed-up vs eager reference", "reference", 15.0),
            ("speed-up vs torch.compile", "compiled", 1.0),
            ("fraction of the streaming-read floor", "floor", 0.70),
            ("tracker overhead (demo net, every optimizer)", "tracker", 0.02)],
    "cuda": [("fraction of copy bandwidth", "copy", 0.80),
             ("speed-up vs torch.compile", "compiled", 1.2),
             ("tracker overhead (VGG-16-BN, batch 128, every optimizer)", "tracker", 0.01)],
}


def evaluate_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each goal against the measurement that decides it: the worst case over the moments table
    (every set and gradient dtype must meet it), and the tracker's default hook mode under its worst
    optimizer."""
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
            vals = [(o["variants"]["ours-optimizer"]["overhead"]["median"], o) for o in t["optimizers"]
                    if "ours-optimizer" in o["variants"]]
            if vals:
                measured, o = max(vals, key=lambda v: v[0])
                where = f"{t['workload']}, {o['optimizer']}, hook=optimizer (default)"
        is_max = key == "tracker"
        met = None if measured is None else (measured <= target if is_max else measured >= target)
        rows.append({"goal": label, "target": target, "max" if is_max else "min": True, "measured": measured,
                     "where": where, "met": met})
    return rows


def fmt_ms(s: Optional[float]) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(r: Optional[float]) -> str:
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
            lead = (f"| {c['set']} | {c['grad_dtype']} | {fmt_count(c['params'])} | {c['tensors']} | "
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
                speed = "" if name == "ours" else fmt_ratio(p["ratio"]["median"])
                if name != "ours" and p["ratio"]["n"] > 1:
                    speed += f" ({fmt_ratio(p['ratio']['q1'])}-{fmt_ratio(p['ratio']['q3'])})"
            lines.append(f"{lead} {name} | {fmt_ms(s['median'])} | {fmt_ms(s['q1'])}-{fmt_ms(s['q3'])} | {s['n']} | "
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
            cells.append("-" if e is None else (fmt_ms(e["seconds"]["median"]) if e["status"] == "ok" else "skip"))
        floor = pt.get("floor", {}).get("gbps")
        lines.append(f"| {pt['label']} | {fmt_count(pt['params'])} | {pt['tensors']} | " + " | ".join(cells)
                     + f" | {pt['peers']['ours']['gbps']:.1f} | {'-' if floor is None else f'{floor:.1f}'} |")
    return "\n".join(lines)


def tracker_table(t: Dict[str, Any]) -> str:
    """Markdown: one row per (optimizer, variant) of a tracker record."""
    lines = ["| optimizer | variant | ms/step (median) | IQR ms | overhead (median) | overhead IQR "
             "| CPU-time overhead (median, IQR) | hook ms/step | flush ms/step | own time / plain step |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    pct = lambda o, k: f"{o[k] * 100:+.2f}%"  # noqa: E731
    for opt, v, e in ((o, v, e) for o in t["optimizers"] for v, e in o["variants"].items()):
        s = e["step_ms"]
        o, c = e.get("overhead"), e.get("cpu_overhead")
        ov = "-" if o is None else pct(o, "median")
        oq = "-" if o is None else f"{pct(o, 'q1')} .. {pct(o, 'q3')}"
        cpu = "-" if c is None else f"{pct(c, 'median')} ({pct(c, 'q1')} .. {pct(c, 'q3')})"
        hook = f"{e['hook_ms_per_step']:.2f}" if "hook_ms_per_step" in e else "-"
        proc = f"{e['process_ms_per_step']:.2f}" if "process_ms_per_step" in e else "-"
        own = f"{e['own_share'] * 100:.2f}%" if "own_share" in e else "-"
        lead = f"{opt['optimizer']} ({opt['rounds']} rounds)" if v == next(iter(opt["variants"])) else ""
        lines.append(f"| {lead} | {v} | {s['median']:.2f} | {s['q1']:.2f}-{s['q3']:.2f} | {ov} | {oq} | {cpu} | {hook} "
                     f"| {proc} | {own} |")
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
        out += [f"**Scaling with tensor count** (fixed {fmt_count(c[0]['params'])} elements)", "",
                sweep_table(c, "tensors"), ""]
    if plot_name:
        out += [f"![scaling curves]({plot_name})", ""]
    if results.get("tracker"):
        t = results["tracker"]
        out += [f"**Tracker overhead**: {t['note']}; {t['families']} families, {t['groups']} groups, "
                f"{fmt_count(t['tracked_params'])} tracked parameters; per optimizer, interleaved rounds of "
                f"{t['block_steps']} steps per variant (flush every {t['flush_every']}); "
                + "; ".join(f"{o['optimizer']}: {o['settings']}" for o in t["optimizers"]), "", tracker_table(t), ""]
    if results.get("skipped"):
        out += ["Skipped: " + "; ".join(results["skipped"]), ""]
    return "\n".join(out)


RESULTS_HEADER = """# Benchmark results

Written by `neural-mechanics bench --results bench/RESULTS.md` (one section per machine and device,
replaced on every run on that machine; see bench/README.md for what each column means and how the
suite measures).  Do not edit the sections by hand: rerun the suite.
"""


def update_results_file(path: str, results: Dict[str, Any], plot_path: Optional[str]) -> str:
    """Replace (or append) this machine's section of the RESULTS.md at ``path``; copy the plot next to it."""
    key = section_key(results["meta"])
    slug = re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")[:60]
    plot_name = None
    if plot_path and os.path.exists(plot_path):
        plot_name = f"scaling-{slug}.png"
        target = os.path.join(os.path.dirname(os.path.abspath(path)), plot_name)
        if os.path.abspath(plot_path) != target:
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
                cells.append("-" if e is None else (fmt_ratio(e["ratio"]["median"]) if e["status"] == "ok"
                                                    else ("failed" if "fail" in e["status"] else "skipped")))
            lines.append(f"{c['set']:14s} {c['grad_dtype']:4s} {fmt_ms(o['seconds']['median']):>9s} {o['gbps']:7.1f} "
                         f"{fl:>6s} {cp:>6s} " + " ".join(f"{x:>13s}" for x in cells))
        lines.append("(floor / copy: our GB/s as a share of the streaming-read floor / of copy bandwidth; "
                     "peer columns: how many times faster ours is)")
    for key, title in (("scaling", "params"), ("count", "tensors")):
        pts = results.get(key)
        if pts:
            lines.append("")
            lines.append(f"{key}: " + "; ".join(
                f"{p['label']} {fmt_ms(p['peers']['ours']['seconds']['median'])} ms "
                f"{p['peers']['ours']['gbps']:.0f} GB/s"
                + (f" (floor {p['floor']['gbps']:.0f})" if "floor" in p else "") for p in pts))
    t = results.get("tracker")
    if t:
        lines.append("")
        for o in t["optimizers"]:
            lines.append(f"tracker ({t['workload']}, {o['optimizer']}): " + "; ".join(
                f"{v} {e['step_ms']['median']:.2f} ms"
                + (f" {e['overhead']['median'] * 100:+.2f}%" if "overhead" in e else "")
                + (f" (CPU time {e['cpu_overhead']['median'] * 100:+.2f}%)" if "cpu_overhead" in e else "")
                + (f" (own time {e['own_share'] * 100:.2f}%)" if "own_share" in e else "")
                for v, e in o["variants"].items()))
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
