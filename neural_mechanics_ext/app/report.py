"""``neural-mechanics report RUN_DIR``: the figures (``figures/*.png``) and a self-contained
``report.html`` of a run folder, finished or interrupted.

Everything is read from the folder (see :mod:`neural_mechanics_ext.runfolder` for its files).  When
``summary.json`` is missing (the run was killed, or is still going), the errors and residuals are
computed from the per-group history in ``groups/*.npz`` instead, with the metric of DESIGN.md §3, and
the report says so.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import os
import sys
from typing import Any, Dict, List

import numpy as np

from .. import SymmetryFamily
from ..schema import PREDICTIONS
from ..sinks import write_atomically
from ..symmetry import format_members
from ..runfolder import load_run



def optimizer_text(config: Dict[str, Any]) -> str:
    """``SGD lr 0.05, momentum 0.9, weight decay 0.0005`` (or ``AdamW lr 0.001, betas (0.9, 0.999), ...``)
    from a config; a framework callback's run folder describes its optimizer itself, in ``optimizer``."""
    name = config.get("optimizer", "sgd")
    if name not in ("sgd", "adamw", "adam", "lion"):
        return name
    if name != "sgd":
        label = {"adamw": "AdamW", "adam": "Adam", "lion": "Lion"}[name]
        parts = [f"{label} lr {config['lr']:g}", "betas (" + ", ".join(f"{b:g}" for b in config["betas"]) + ")"]
        if name in ("adam", "adamw"):
            parts.append(f"eps {config['eps']:g}")
        parts.append(f"{'' if name == 'adam' else 'decoupled '}weight decay {config['weight_decay']:g}")
        if config.get("schedule", "constant") != "constant":
            parts.append(f"{config['schedule']} schedule")
        return ", ".join(parts)
    parts = [f"SGD lr {config['lr']:g}"]
    if config.get("momentum"):
        parts.append(f"momentum {config['momentum']:g}" + (" (Nesterov)" if config.get("nesterov") else ""))
        if config.get("dampening"):
            parts.append(f"dampening {config['dampening']:g}")
    parts.append(f"weight decay {config['weight_decay']:g}")
    if config.get("schedule", "constant") != "constant":
        parts.append(f"{config['schedule']} schedule")
    return ", ".join(parts)


# ---- figures ---------------------------------------------------------------------------------------
FIGURES = [  # (file, caption); the paper-style figures first
    ("fig5_scale.png", "<b>Scale families</b> (paper Fig. 5 centre; Fig. 6 with momentum). Left: per-layer sum over "
     "filters of |W[k]|² + b[k]² of every conv in front of BatchNorm, coloured by depth, with the exact prediction "
     "(black dashes) and the paper's formula (red dots) on top. Right: how far each prediction is from the measured "
     "values, relative to the layer's magnitude. Under gradient flow these norms would be conserved; weight decay "
     "pulls them in and the finite learning rate pushes them out (Eq. 19)."),
    ("fig5_rescale.png", "<b>Rescale families</b> (paper Fig. 5 right): per-layer sum of |θ_A1|² − |θ_A2|² between a "
     "unit's incoming weights (or a BatchNorm affine) and its outgoing weights, across each ReLU (Eq. 20)."),
    ("fig5_translation.png", "<b>Translation families</b> (paper Fig. 5 left): sums of the softmax classifier's "
     "columns and bias, which only weight decay changes (Eq. 18: s(t) = e^(−λt) s(0)); middle: single columns."),
    ("fig1_filters.png", "<b>Individual weights against per-filter quantities</b> (paper Fig. 1): the raw weights "
     "of one layer wander with the data; the squared norm of each of its filters follows the symmetry's law, "
     "which the exact prediction reproduces from the initial value and the measured gradient statistics alone."),
    ("residuals.png", "<b>Gradient-constraint residuals</b> (THEORY §1.1): the cosine between a group's gradient "
     "and the symmetry's generator, max over the family's groups. Exact symmetries sit at float32 rounding "
     "(1e-8–1e-6); BatchNorm's eps lifts scale families to ~1e-5."),
    ("scale_rates.png", "<b>Scale layers</b>: effective learning rate η/|θ_A|² (the step a scale-invariant filter "
     "feels) and the angle each filter turns per step, mean over the filters of a layer."),
    ("training.png", "<b>Training</b>: cross-entropy loss and accuracy of each batch; the dashed line is the "
     "accuracy on the held-out set at the end."),
]


def write_figures(run: Dict[str, Any]) -> List[str]:
    """Draw every figure the run's data allows into RUN_DIR/figures; returns the files written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []   # the report says how to get figures
    from . import plot
    out = os.path.join(run["dir"], "figures")
    os.makedirs(out, exist_ok=True)
    h, fams = run["history"], run["families"]
    opt = optimizer_text(run["config"])
    made = []
    hide = [r["family"] for r in run["rows"] if r.get("near_zero")]
    for kind in ("scale", "rescale", "translation"):
        made.append(plot.plot_kind(h, fams, kind, os.path.join(out, f"fig5_{kind}.png"), opt, hide))
    made.append(plot.plot_fig1(h, fams, run["raw"], run["raw_values"], os.path.join(out, "fig1_filters.png")))
    made.append(plot.plot_residuals(h, fams, os.path.join(out, "residuals.png"), hide))
    made.append(plot.plot_scale_rates(h, fams, os.path.join(out, "scale_rates.png")))
    test_acc = (run["summary"] or {}).get("test_accuracy")
    made.append(plot.plot_training(run["train_log"], os.path.join(out, "training.png"), test_acc))
    return [m for m in made if m]


# ---- HTML ------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; border-bottom: 1px solid #ddd; padding-bottom: 4px;
       margin-top: 36px; }
.sub { color: #555; margin-top: 0; }
.status { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600; font-size: 13px; }
.finished { background: #d7f0dc; color: #1b5e20; } .interrupted, .incomplete { background: #ffe0b2; color: #8a4b00; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-family: Menlo, Consolas, monospace; }
tr.kind-scale td:first-child { border-left: 4px solid #1f77b4; }
tr.kind-rescale td:first-child { border-left: 4px solid #ff7f0e; }
tr.kind-translation td:first-child { border-left: 4px solid #2ca02c; }
figure { margin: 18px 0 28px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 14px; margin-top: 4px; }
.note { background: #f6f8fa; border-left: 4px solid #8aa; padding: 8px 12px; font-size: 14px; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 12px; }
.kv td:first-child { font-weight: 600; white-space: nowrap; }
.small { font-size: 12px; color: #555; }
tr.nearzero td.num { color: #aaa; }
"""


def fmt(x, spec: str = ".2e") -> str:
    """How the report prints a number (tests compare against the files with this function)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _num_cell(x, spec: str = ".2e") -> str:
    value = "" if x is None else repr(float(x))
    return f'<td class="num" data-value="{value}">{fmt(x, spec)}</td>'


def _img(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(path))}">'


def _status(run) -> str:
    if run["summary"]:
        return run["summary"].get("status", "finished")
    return "incomplete"


def _families_table(families: List[dict]) -> str:
    out = ['<table id="families"><tr><th>#</th><th>kind</th><th>family</th><th>groups</th><th>members</th>'
           '<th>residual at discovery</th><th>tolerance</th><th>note</th></tr>']
    for i, f in enumerate(families):
        try:
            members = format_members(SymmetryFamily(f["kind"], f["name"], [tuple(m) for m in f["members"]]))
        except (ValueError, TypeError):
            members = str(f["members"])
        out.append(f'<tr class="kind-{f["kind"]}"><td>{i}</td><td>{f["kind"]}</td><td>{html.escape(f["name"])}</td>'
                   f'<td class="num">{f["groups"]}</td><td><code>{html.escape(members)}</code></td>'
                   f'{_num_cell(f.get("residual"), ".1e")}{_num_cell(f.get("tolerance"), ".1e")}'
                   f'<td class="small">{html.escape(f.get("note") or "")}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _error_table(rows: List[dict]) -> str:
    out = ['<table id="errors"><tr><th>family</th><th>kind</th><th>groups</th><th>steps</th>'
           '<th>exact error</th><th>paper error</th><th>modified (MF2) error</th><th>max constraint residual</th>'
           '<th>assumptions that failed / notes</th></tr>']
    for r in rows:
        notes = [html.escape(a) for a in r.get("assumptions") or []]
        if r.get("near_zero"):
            notes.insert(0, f"<b>values stay at rounding level</b> (max magnitude {fmt(r.get('max_magnitude'))}, "
                            "e.g. a bias in front of BatchNorm initialised at 0): the relative errors and the "
                            "residual compare rounding noise with itself")
        notes = "<br>".join(notes)
        near = " nearzero" if r.get("near_zero") else ""
        out.append(f'<tr class="kind-{r["kind"]}{near}" data-family="{html.escape(r["family"])}">'
                   f'<td>{html.escape(r["family"])}</td><td>{r["kind"]}</td>'
                   f'<td class="num">{r["groups"]}</td><td class="num">{r["steps"]}</td>'
                   + "".join(_num_cell(r.get(f"error_{p}")) for p in PREDICTIONS)
                   + f'{_num_cell(r.get("residual"))}<td class="small">{notes}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _kv_table(d: Dict[str, Any], table_id: str) -> str:
    out = [f'<table class="kv" id="{table_id}">']
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        out.append(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _worst(rows, kind, key):
    vals = [r[key] for r in rows if r["kind"] == kind and r.get(key) is not None and not r.get("near_zero")]
    return max(vals) if vals else None


def _overview(run) -> str:
    c, s, rows = run["config"], run["summary"], run["rows"]
    status = _status(run)
    kinds = {}
    for f in run["families"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    steps_done = s["steps"] if s else max((r["steps"] for r in rows), default=0)
    items = [f"<b>{len(run['families'])}</b> symmetry families: "
             + ", ".join(f"{n} {k}" for k, n in kinds.items()),
             f"model <b>{html.escape(c['model'])}</b> on <b>{html.escape(str(c['data']))}</b> "
             + (f"({c.get('num_classes')} classes, {c.get('image_size')}×{c.get('image_size')}), "
                if c.get("num_classes") else ", ")
             + f"{optimizer_text(c)}, batch {c['batch_size']}, {'float64 (--exact)' if c.get('exact') else 'float32'}"
             + (", AMP" if c.get("amp") else ""),
             f"<b>{steps_done}</b> of {c.get('steps')} steps tracked"]
    if s and s.get("final_loss") is not None:
        acc = s.get("test_accuracy")
        items.append(f"loss {fmt(s.get('initial_loss'), '.3f')} → <b>{fmt(s['final_loss'], '.3f')}</b>, "
                     f"train accuracy {fmt(s['final_train_accuracy'], '.1%')}"
                     + (f", test accuracy <b>{fmt(acc, '.1%')}</b>" if acc is not None else ""))
    elif run["train_log"] and len(run["train_log"].get("loss", ())):
        log = run["train_log"]
        items.append(f"loss {fmt(float(np.mean(log['loss'][:5])), '.3f')} → "
                     f"<b>{fmt(float(np.mean(log['loss'][-10:])), '.3f')}</b> at step {int(log['step'][-1])} "
                     f"(train_log.csv), train accuracy {fmt(float(np.mean(log['accuracy'][-10:])), '.1%')}")
    worst = []
    for kind in ("scale", "rescale", "translation"):
        e, p = _worst(rows, kind, "error_exact"), _worst(rows, kind, "error_paper")
        if e is not None or p is not None:
            worst.append(f"{kind}: exact <span class='num' id='worst-exact-{kind}'>{fmt(e)}</span>, "
                         f"paper <span class='num' id='worst-paper-{kind}'>{fmt(p)}</span>")
    if worst:
        items.append("worst relative error per kind — " + "; ".join(worst))
    if s:
        o = s["overhead"]
        text = (f"tracking overhead <b id='overhead-timers'>{fmt(o['timers']['percent'], '.1f')} %</b> "
                f"(tracker's own timers, including writing the run folder: {fmt(o['timers']['hook_seconds'] + o['timers']['process_seconds'], '.1f')} s "
                f"of {fmt(o['timers']['train_step_seconds'], '.1f')} s of training steps)")
        d = o.get("direct")
        if d and "percent" in d:
            q1, q3 = d.get("percent_quartiles") or (None, None)
            text += (f"; measured directly <b id='overhead-direct'>{fmt(d['percent'], '+.1f')} %</b> "
                     f"(median over {d['steps']} steps with vs without a tracker in interleaved blocks, on a copy of the model; "
                     f"quartiles {fmt(q1, '+.0f')} … {fmt(q3, '+.0f')} %)")
        elif d and "error" in d:
            text += f"; the direct measurement failed: {html.escape(d['error'])}"
        items.append(text)
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _explanation(run) -> str:
    c = run["config"]
    fp = ("This run used <b>float64 with BatchNorm eps = 1e-30</b> (<code>--exact</code>): every symmetry "
          "holds exactly, and the exact prediction should agree with the measured values to rounding "
          "(≈1e-10 or better)." if c.get("exact") else
          "This run used <b>float32 with BatchNorm's default eps = 1e-5</b>, as real training does. The eps "
          "breaks the scale symmetry slightly (THEORY.md D12, the violation grows like eps/σ² as weight decay "
          "shrinks the filters), so the <i>exact</i> prediction of scale families and of the BN-affine rescale "
          "families drifts by about 1e-5–1e-3; the other families are exact up to float32 rounding "
          "(≈1e-6). Run with <code>--exact</code> (float64, eps 1e-30) to see rounding-level agreement.")
    return (f'<div class="note"><p><b>How to read the errors.</b> Relative error = max over steps and groups '
            f'of |prediction − empirical| divided by the largest magnitude of the family\'s groups (DESIGN.md §3). '
            f'<i>exact</i> is the discrete recursion of THEORY.md §4 (open loop from the initial values, fed '
            f'only by the measured gradient or momentum statistics the theory names), <i>paper</i> the paper\'s '
            f'continuous-time formulas (Eqs. 18–20, §3(c) for momentum), <i>modified</i> their corrected form '
            f'(MF2 / D4). The paper\'s formulas differ from the discrete dynamics by O(ηλ) and, with momentum, by '
            f'the continuous-time approximation of the oscillator; that is the gap between the dashed black and '
            f'dotted red curves.</p><p>{fp}</p></div>')


def _residual_outliers(run) -> str:
    """A sentence for the residual figure when a translation family's residual rises far above rounding
    (a fitted classifier in float32), so that nobody reads it as a broken symmetry."""
    high = [r["family"] for r in run["rows"] if r["kind"] == "translation" and not r.get("near_zero")
            and (r.get("residual") or 0) > 1e-3 and (r.get("error_exact") or 0) < 1e-3]
    if not high:
        return ""
    return (f" {', '.join(html.escape(h) for h in high)}: once the classifier fits the data (p − y ≈ 1e-6 for most "
            "samples), some columns' gradients are as small as the float32 rounding of the softmax, whose outputs "
            "then no longer sum to exactly 1, and their cosine rises towards 1. The gradient is at rounding level; "
            "the symmetry is not broken, as the small exact-prediction error of the family shows.")


def write_report(run_dir: str) -> str:
    """Draw the figures and write RUN_DIR/report.html (images embedded, no external resources);
    returns the path of the HTML file."""
    run = load_run(run_dir)
    made = write_figures(run)
    status = _status(run)
    c = run["config"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>Neural Mechanics report: {html.escape(os.path.basename(run['dir']))}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Neural Mechanics run report</h1>",
             f"<p class='sub'><code>{html.escape(run['dir'])}</code> &nbsp; "
             f"<span class='status {status}' id='status'>{status}</span></p>"]
    if status == "incomplete":
        parts.append("<div class='note'><b>This run has no summary.json</b>: it was killed, or it is still going. "
                     "Everything below comes from the metrics written up to its last flush; the errors are "
                     "computed from the logged steps of <code>groups/*.npz</code>.</div>")
    elif status == "interrupted":
        parts.append("<div class='note'><b>This run was interrupted</b> (Ctrl-C); the report covers the steps "
                     "done until then.</div>")
    parts.append(_overview(run))
    parts.append("<h2>Dynamics of the symmetry groups</h2>")
    parts.append(_explanation(run))
    by_name = {os.path.basename(p): p for p in made}
    for name, caption in FIGURES:
        if name == "residuals.png":
            caption += _residual_outliers(run)
        if name in by_name:
            parts.append(f"<figure id='{name[:-4]}'>{_img(by_name[name])}<figcaption>{caption}</figcaption></figure>")
    if not made:
        try:
            import matplotlib  # noqa: F401
            parts.append("<p>No figure: the run logged no step yet.</p>")
        except ImportError:
            parts.append("<p>No figures: matplotlib is not installed "
                         "(<code>pip install neural-mechanics-ext[plot]</code>), then run "
                         "<code>neural-mechanics report</code> on this folder.</p>")
    parts.append("<h2>Prediction errors per family</h2>")
    source = ("from summary.json (every step)" if run["summary"] else
              "computed from the logged history (summary.json is missing)")
    parts.append(f"<p class='small'>Source: {source}. Max constraint residual: THEORY §1.1's cosine between "
                 "g_A and the generator, max over steps and groups; for families whose groups are single "
                 "parameters (a bias in front of BatchNorm) it is 1 by construction whenever the gradient is "
                 "rounding noise.</p>")
    parts.append(_error_table(run["rows"]))
    parts.append("<h2>Symmetry families found</h2>")
    parts.append("<p class='small'>Members: parameter(A,K,B) views, group k = slice k of each; after '|' the "
                 "outgoing side of a rescale group. Residual: the gradient check of discovery (float64 copy).</p>")
    parts.append(_families_table(run["families"]))
    parts.append("<h2>Configuration</h2>")
    parts.append(_kv_table(c, "config"))
    if run["summary"]:
        secs = run["summary"].get("seconds", {})
        parts.append(_kv_table({f"{k} (s)": fmt(v, ".1f") for k, v in secs.items()}, "timings"))
    parts.append("<h2>Environment</h2>")
    parts.append(_kv_table(run["environment"] or {}, "environment"))
    parts.append("<p class='small'>Files: config.json, environment.json, families.txt/json, metrics.csv, "
                 "metrics.jsonl, groups/*.npz (per-group history, <code>neural_mechanics_ext.sinks.read_run</code>), "
                 "train_log.csv, raw_weights.csv, summary.json, figures/*.png. Redraw with "
                 f"<code>neural-mechanics report {html.escape(run['dir'])}</code>.</p>")
    parts.append("</body></html>")
    path = os.path.join(run["dir"], "report.html")
    write_atomically(path, "\n".join(parts).encode())
    return path


# ---- command line ----------------------------------------------------------------------------------
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``neural-mechanics report``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `neural-mechanics demo` or `train`")


def report_main(args) -> int:
    """``neural-mechanics report RUN_DIR``."""
    try:
        path = write_report(args.run_dir)
    except FileNotFoundError as exc:
        print(f"neural-mechanics report: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
