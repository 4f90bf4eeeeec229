"""Figures of a tracked run (matplotlib, PNG), from a history dict as ``SymmetryTracker.history()`` or
``sinks.read_run(run_dir)`` returns it, plus the family list (``families.json`` of a run folder).

* :func:`plot_kind` — the paper's Fig. 5 (SGD) / Fig. 6 (momentum) for one symmetry kind: per-layer
  curves coloured by depth, the ``exact`` and ``paper`` predictions dashed on top, and their errors.
* :func:`plot_fig1` — the paper's Fig. 1: raw weights next to the per-filter norms of the same layer.
* :func:`plot_residuals` — the gradient-constraint residual of every family over time.
* :func:`plot_scale_rates` — effective learning rate η/|θ_A|² and angular update of scale layers.
* :func:`plot_equilibrium` — adaptive optimizers (Kosson et al. 2024): angular update and norm of each scale
  layer against their rotational equilibrium, the alignment cos(θ, u) and its kinetic-symmetry-breaking part.
* :func:`plot_training` — loss and accuracy.

Every x-axis of a dynamics plot is t = Σ_k η_k (the cumulative learning rate, the paper's time).
Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so this works headless.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

KIND_TITLES = {
    "scale": "Scale symmetry: per-layer |θ_A|² summed over filters (THEORY Eq. 19 / §4)",
    "rescale": "Rescale symmetry: per-layer |θ_A1|² − |θ_A2|² summed over units (Eq. 20 / §4)",
    "translation": "Translation symmetry: per-layer Σθ over the groups (Eq. 18 / §4)",
}
KIND_YLABEL = {"scale": "Σ_k |θ_A,k|²  (squared norm)", "rescale": "Σ_k r_k = Σ_k (|θ_A1,k|² − |θ_A2,k|²)",
               "translation": "Σ_k s_k = Σ_k Σ_{i∈A_k} θ_i"}
KIND_COLOURS = {"scale": "tab:blue", "rescale": "tab:orange", "translation": "tab:green"}
T_LABEL = "t = Σ η  (cumulative learning rate)"
EXACT_STYLE = dict(color="black", linestyle=(0, (4, 2)), linewidth=1.1)
PAPER_STYLE = dict(color="crimson", linestyle=(0, (1, 1.5)), linewidth=1.4)


def _figure(w: float, h: float, ncols: int = 1, width_ratios=None):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, gridspec_kw={"width_ratios": width_ratios} if width_ratios else None)
    return fig, np.atleast_1d(axes)


def _depth_colours(n: int, cmap: str = "viridis"):
    import matplotlib
    cm = matplotlib.colormaps[cmap]
    return [cm(0.05 + 0.85 * i / max(n - 1, 1)) for i in range(n)]


def _depth_colorbar(fig, ax, labels: Sequence[str], cmap: str = "viridis"):
    """A discrete colour bar naming the layers (first = input side)."""
    import matplotlib
    from matplotlib.colors import BoundaryNorm, ListedColormap
    n = len(labels)
    colours = ListedColormap(_depth_colours(n, cmap))
    norm = BoundaryNorm(np.arange(n + 1) - 0.5, n)
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colours), ax=ax, ticks=np.arange(n),
                      fraction=0.05, pad=0.02, aspect=30)
    step = max(1, int(np.ceil(n / 14)))           # at most ~14 tick labels stay legible
    cb.set_ticks(np.arange(0, n, step))
    cb.set_ticklabels([_short(labels[i], 36) for i in range(0, n, step)], fontsize=7)
    cb.ax.invert_yaxis()                          # depth grows downwards, like the network's listing
    cb.set_label("layer (depth →)", fontsize=8)
    return cb


def compact_labels(labels: Sequence[str]) -> List[str]:
    """Drop as many leading module names from every dotted name as keeps the labels distinct:
    ``features.bn1_1 → features.conv1_2`` becomes ``bn1_1 → conv1_2``; ``layer1.0.conv1`` keeps its
    prefix when ``layer2.0.conv1`` is in the set too."""
    def drop(label: str, k: int) -> str:
        def one(name: str) -> str:
            head, sep, tail = name.partition(" ")
            parts = head.split(".")
            return ".".join(parts[min(k, len(parts) - 1):]) + sep + tail
        return " → ".join(one(n) for n in label.split(" → "))

    depth = max((len(n.split(" ")[0].split(".")) for l in labels for n in l.split(" → ")), default=1)
    for k in range(depth - 1, 0, -1):
        candidate = [drop(l, k) for l in labels]
        if len(set(candidate)) == len(set(labels)):
            return candidate
    return list(labels)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


def family_layer(fam: dict) -> str:
    """A short label for a family: its layer (``features.conv2_1``), ``→ consumer`` for rescale, and
    which part for translation (``classifier.fc3 columns``)."""
    layer, _, rest = fam.get("name", fam.get("family", "")).partition(" (")
    if fam["kind"] == "translation" and rest.startswith("translation, "):
        layer += " " + rest[len("translation, "):].split(")", 1)[0]
    return layer


def running_error(h: Dict[str, np.ndarray], prediction: str) -> np.ndarray:
    """Per logged step: max over groups of |pred − emp| divided by the family's max magnitude so far
    (DESIGN.md §3's metric, step by step); NaN where there is no prediction."""
    pred, emp = h.get(prediction), h.get("empirical")
    if pred is None or emp is None or len(emp) == 0:
        return np.zeros(0)
    err = np.abs(pred - emp)
    with np.errstate(invalid="ignore"):
        per_step = np.where(np.isfinite(err).any(1), np.nanmax(np.where(np.isfinite(err), err, -np.inf), 1), np.nan)
    mag = np.maximum.accumulate(np.nanmax(np.abs(h["magnitude"]), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mag > 0, per_step / mag, np.nan)


def _log_plain(ax):
    """Log y-axis labelled with plain numbers (6, 10, 20, 40) where the range allows it."""
    from matplotlib.ticker import LogLocator, ScalarFormatter
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / lo < 1e3 and lo > 1e-3:
        for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            f = ScalarFormatter()
            f.set_scientific(False)
            axis_fmt(f)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))


def _end_labels(ax, curves, min_gap_px: float = 11.0):
    """Name each curve at its right end, nudging labels apart so that curves which end close together
    (layers with equal initial norms) stay readable.  ``curves``: [(x, y, label, colour)]."""
    ends = [(float(x[-1]), float(y[-1]), label, colour) for x, y, label, colour in curves
            if len(x) and np.isfinite(y[-1])]
    if not ends:
        return
    x0, x1 = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if x0 <= t <= x1]
    ax.set_xlim(x0, x1 + 0.22 * (x1 - x0))     # room for the labels
    ax.set_xticks(ticks)                       # no ticks under the labels
    ax.get_ylim()                              # settle autoscaling before converting to pixels
    to_px, to_data = ax.transData, ax.transData.inverted()
    pix = sorted(((to_px.transform((x, y))[1], x, label, colour) for x, y, label, colour in ends))
    ys = [p[0] for p in pix]
    for i in range(1, len(ys)):                      # push up what overlaps the label below ...
        ys[i] = max(ys[i], ys[i - 1] + min_gap_px)
    ys[-1] = min(ys[-1], ax.bbox.y1 - 6)              # ... then keep the stack inside the axes
    for i in range(len(ys) - 2, -1, -1):
        ys[i] = min(ys[i], ys[i + 1] - min_gap_px)
    for py, (_, x, label, colour) in zip(ys, pix):
        y = to_data.transform((0, py))[1]
        r, g, b = colour[:3]
        if 0.3 * r + 0.59 * g + 0.11 * b > 0.6:   # light colours (viridis' yellow) unreadable on white
            colour = (0.7 * r, 0.7 * g, 0.7 * b)
        ax.annotate(label, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=7, color=colour,
                    va="center", ha="left", fontweight="bold")


def _positive(y):
    return np.where(np.asarray(y) > 0, y, np.nan)


def plot_kind(history: Dict[str, Dict[str, np.ndarray]], families: List[dict], kind: str, path: str,
              optimizer_text: str = "", hide: Sequence[str] = ()) -> Optional[str]:
    """The paper's Fig. 5/6 for one kind; returns ``path`` or None when the run has no such family.

    Left: per-layer sums of the family quantity (s, n or r) over t, one colour per layer (viridis,
    input side dark), with the exact prediction (black dashes) and the paper's formula (red dots).
    Families named in ``hide`` (values at rounding level, e.g. biases in front of BatchNorm initialised
    at 0, see ``report.add_magnitudes``) are left out and counted in the title.  Middle (translation
    only): the individual
    groups of the largest translation family, as the paper draws the classifier's column sums.
    Right: relative error of both predictions per layer, log scale.
    """
    fams = [f for f in families if f["kind"] == kind and f["name"] in history and len(history[f["name"]].get("step", ()))]
    if not fams:
        return None
    quiet = [f for f in fams if f["name"] in set(hide)]
    fams = [f for f in fams if f not in quiet] or fams
    fams_curves = fams
    ncols = 3 if kind == "translation" else 2
    fig, axes = _figure(15 if ncols == 3 else 14, 5.2, ncols, [1.3, 1.1, 1] if ncols == 3 else [1.5, 1])
    ax = axes[0]
    colours = _depth_colours(len(fams_curves))
    for f, col in zip(fams_curves, colours):
        h = history[f["name"]]
        ax.plot(h["t"], h["empirical_sum"], color=col, linewidth=2.4, alpha=0.85)
        ax.plot(h["t"], h["exact_sum"], **EXACT_STYLE)
        ax.plot(h["t"], h["paper_sum"], **PAPER_STYLE)
    if kind == "scale":
        _log_plain(ax)
    ax.set_xlabel(T_LABEL)
    ax.set_ylabel(KIND_YLABEL[kind])
    title = f"{kind}: per-layer sums, {len(fams_curves)} layers"
    if quiet:
        title += f" (+{len(quiet)} that stay at 0, not drawn)"
    ax.set_title(title, fontsize=10)
    names = compact_labels([family_layer(f) for f in fams_curves])
    _end_labels(ax, [(history[f["name"]]["t"], history[f["name"]]["empirical_sum"], _short(n, 30), col)
                     for f, n, col in zip(fams_curves, names, colours)])
    ax.legend(handles=_legend_handles(), loc="best", fontsize=8, framealpha=0.85)
    ax.grid(alpha=0.3)
    if len(fams_curves) > 3:   # a few curves are named well enough by their end labels
        _depth_colorbar(fig, ax, compact_labels([family_layer(f) for f in fams_curves]))

    if kind == "translation":
        axg = axes[1]
        big = max(fams, key=lambda f: f["groups"] * float(np.nanmax(np.abs(history[f["name"]]["empirical"]))))
        h = history[big["name"]]
        G = h["empirical"].shape[1]
        pick = np.unique(np.linspace(0, G - 1, min(G, 16)).round().astype(int))
        gcol = _depth_colours(len(pick), "plasma")
        for g, col in zip(pick, gcol):
            axg.plot(h["t"], h["empirical"][:, g], color=col, linewidth=2.0, alpha=0.8)
            axg.plot(h["t"], h["exact"][:, g], **EXACT_STYLE)
            axg.plot(h["t"], h["paper"][:, g], **PAPER_STYLE)
        axg.set_xlabel(T_LABEL)
        axg.set_ylabel("s_k = Σ_{i∈A_k} θ_i  (one group each)")
        axg.set_title(f"{_short(big['name'], 50)}: {len(pick)} of its {G} groups", fontsize=10)
        axg.grid(alpha=0.3)

    axe = axes[-1]
    for f, col in zip(fams, _depth_colours(len(fams))):
        h = history[f["name"]]
        axe.plot(h["t"], _positive(running_error(h, "exact")), color=col, linewidth=1.6)
        axe.plot(h["t"], _positive(running_error(h, "paper")), color=col, linewidth=1.2, linestyle=(0, (1, 1.5)))
    axe.set_yscale("log")
    axe.set_xlabel(T_LABEL)
    axe.set_ylabel("|prediction − empirical| / max magnitude")
    axe.set_title("prediction error per layer (max over groups)", fontsize=10)
    from matplotlib.lines import Line2D
    axe.legend(handles=[Line2D([], [], color="gray", linewidth=1.6, label="exact (THEORY §4)"),
                        Line2D([], [], color="gray", linewidth=1.2, linestyle=(0, (1, 1.5)),
                               label="paper (Eqs. 18–20, §3c)")], fontsize=8, loc="best")
    axe.grid(alpha=0.3, which="both")
    fig.suptitle(KIND_TITLES[kind] + (f" — {optimizer_text}" if optimizer_text else ""), fontsize=11)
    fig.savefig(path)
    return path


def _legend_handles():
    from matplotlib.lines import Line2D
    return [Line2D([], [], color="tab:green", linewidth=2.4, alpha=0.85, label="empirical (colour = layer)"),
            Line2D([], [], label="exact prediction (THEORY §4)", **EXACT_STYLE),
            Line2D([], [], label="paper's formula (Eqs. 18–20)", **PAPER_STYLE)]


def plot_fig1(history, families: List[dict], raw: Optional[dict], raw_values: Optional[Dict[str, np.ndarray]],
              path: str) -> Optional[str]:
    """The paper's Fig. 1: random individual weights of one layer (left) next to the per-filter squared
    norms of the same layer (right, with the exact prediction dashed).  Without raw weights (an old or
    cut-short run) only the right panel is drawn."""
    fam = None
    if raw is not None:
        fam = next((f for f in families if f["name"] == raw["family"]), None)
    if fam is None:
        fam = next((f for f in families if f["kind"] == "scale"), None) or \
            next((f for f in families if f["kind"] == "rescale"), None)
    if fam is None or fam["name"] not in history or not len(history[fam["name"]].get("step", ())):
        return None
    h = history[fam["name"]]
    have_raw = raw is not None and raw_values and len(raw_values.get("step", ())) > 0
    fig, axes = _figure(13 if have_raw else 7.5, 4.8, 2 if have_raw else 1)
    if have_raw:
        ax = axes[0]
        # map raw-weight steps to t through the tracker's (step, t) pairs
        t = np.interp(raw_values["step"], h["step"], h["t"])
        cols = [k for k in raw_values if k != "step"]
        for col, c in zip(cols, _depth_colours(len(cols), "tab20")):
            ax.plot(t, raw_values[col], color=c, linewidth=1.1)
        ax.axhline(0, color="gray", linewidth=0.6)
        ax.set_xlabel(T_LABEL)
        ax.set_ylabel("weight value")
        ax.set_title(f"{len(cols)} random individual weights of {raw['param']}", fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    G = h["empirical"].shape[1]
    pick = np.unique(np.linspace(0, G - 1, min(G, 24)).round().astype(int))
    for g, c in zip(pick, _depth_colours(len(pick), "tab20")):
        ax.plot(h["t"], h["empirical"][:, g], color=c, linewidth=2.0, alpha=0.85)
        ax.plot(h["t"], h["exact"][:, g], **EXACT_STYLE)
    from matplotlib.lines import Line2D
    ax.legend(handles=[Line2D([], [], color="tab:blue", linewidth=2, label="empirical, one colour per filter"),
                       Line2D([], [], label="exact prediction", **EXACT_STYLE)], fontsize=8, loc="best")
    what = "|W[k]|² + b[k]²" if fam["kind"] == "scale" else "r_k = |θ_A1,k|² − |θ_A2,k|²"
    ax.set_xlabel(T_LABEL)
    ax.set_ylabel(f"per-filter {what}")
    ax.set_title(f"{len(pick)} of {G} filters: {_short(fam['name'], 48)}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.suptitle("Individual parameters move erratically; per-filter quantities follow the symmetry's law "
                 "(paper's Fig. 1)", fontsize=11)
    fig.savefig(path)
    return path


def single_parameter_groups(fam: dict) -> bool:
    """True when every group of the family is one parameter (e.g. each bias in front of BatchNorm):
    its constraint residual |Σg|/(|g|·√|A|) is 1 by construction whenever g is rounding noise."""
    return all(v[0] * v[2] == 1 for _, v, _ in fam["members"]) and len(fam["members"]) == 1


def plot_residuals(history, families: List[dict], path: str, hide: Sequence[str] = ()) -> Optional[str]:
    """Max over groups of the gradient-constraint residual (THEORY §1.1: the cosine between g_A and the
    symmetry's generator) of every family over t, one colour per kind.  Families of one-parameter groups
    (see :func:`single_parameter_groups`) and those in ``hide`` (values at rounding level) are left out
    and counted in the title: their residual compares rounding noise with itself."""
    fams = [f for f in families if f["name"] in history and len(history[f["name"]].get("step", ()))
            and np.isfinite(history[f["name"]]["residual"]).any()]  # adaptive streams carry no gradient: none
    if not fams:
        return None

    def degenerate(f):
        # values at rounding level, or one-parameter groups measured by a residual that reads 1 for any
        # nonzero rounding-noise gradient (a residual scaled by the typical gradient does not: keep those)
        r = history[f["name"]]["residual"]
        return f["name"] in set(hide) or (single_parameter_groups(f) and len(r) and np.nanmedian(r) > 0.5)

    skipped = [f for f in fams if degenerate(f)]
    fig, axes = _figure(12, 5.0)
    ax = axes[0]
    for f in fams:
        if f in skipped:
            continue
        h = history[f["name"]]
        ax.plot(h["t"], _positive(h["residual"]), color=KIND_COLOURS[f["kind"]], linewidth=1.0, alpha=0.75)
        r = np.nan_to_num(h["residual"], nan=0.0)
        if len(r) and r.max() > 1e-3:   # name the outliers (see the report's caption for why they occur)
            i = int(np.argmax(r))
            ax.annotate(family_layer(f), (h["t"][i], r[i]), xytext=(6, -2), textcoords="offset points",
                        fontsize=8, color=KIND_COLOURS[f["kind"]], fontweight="bold")
    from matplotlib.lines import Line2D
    ax.legend(handles=[Line2D([], [], color=c, label=k) for k, c in KIND_COLOURS.items()
                       if any(f["kind"] == k for f in fams)], fontsize=8, loc="best", title="kind (one line per family)",
              title_fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(T_LABEL)
    ax.set_ylabel("max_k |⟨g, generator_k⟩| / (|g_A,k| |generator_k|)")
    title = ("Gradient-constraint residuals (0 for an exact symmetry; float32 rounding ≈ 1e-7;\n"
             "BatchNorm's eps makes scale groups ≈ 1e-5)")
    if skipped:
        title += (f"\n{len(skipped)} families not drawn: values at rounding level (e.g. biases in front of "
                  "BatchNorm initialised at 0), where the residual compares noise with noise")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path)
    return path


def plot_scale_rates(history, families: List[dict], path: str) -> Optional[str]:
    """Scale layers: mean effective learning rate η/|θ_A|² and mean angular update per step, over t."""
    fams = [f for f in families if f["kind"] == "scale" and f["name"] in history
            and "effective_lr" in history[f["name"]] and len(history[f["name"]]["step"])]
    if not fams:
        return None
    fig, axes = _figure(13, 4.8, 2)
    for f, col in zip(fams, _depth_colours(len(fams))):
        h = history[f["name"]]
        axes[0].plot(h["t"], np.nanmean(h["effective_lr"], 1), color=col, linewidth=1.6)
        angle = h["angular_update"] if "angular_update" in h else h["angle"]  # SGD's column, or the adaptive one
        axes[1].plot(h["t"], np.degrees(np.nanmean(angle, 1)), color=col, linewidth=1.2)
    axes[0].set_ylabel("η / |θ_A|²  (mean over filters)")
    axes[0].set_title("effective learning rate of scale-invariant filters", fontsize=10)
    axes[1].set_ylabel("angle between θ_k and θ_k+1  (degrees, mean over filters)")
    axes[1].set_title("angular update per step", fontsize=10)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel(T_LABEL)
        ax.grid(alpha=0.3, which="both")
    _depth_colorbar(fig, axes[1], compact_labels([family_layer(f) for f in fams]))
    fig.suptitle("Scale layers: weight decay shrinks |θ_A|², which raises the step size they feel", fontsize=11)
    fig.savefig(path)
    return path


def _layer_mean(h: Dict[str, np.ndarray], key: str) -> np.ndarray:
    """Mean over a layer's groups per logged step (NaN where the column has none)."""
    v = h[key]
    return np.nanmean(np.where(np.isfinite(v), v, np.nan), 1) if np.isfinite(v).any() else np.full(len(v), np.nan)


def plot_equilibrium(history, families: List[dict], path: str, optimizer_text: str = "") -> Optional[str]:
    """Adaptive optimizers: per scale layer (colour = depth) over the optimizer steps,
    (a) the angular update φ (2.2) and its rotational-equilibrium prediction (dashed), (b) |θ_A|² and its
    predicted equilibrium value (dashed), (c) the alignment cos(θ_A, u_A), (d) its KSB part — means over the
    layer's groups, (c) and (d) smoothed.  None when the history has no equilibrium columns."""
    fams = [f for f in families if f["kind"] == "scale" and f["name"] in history
            and "angle_equilibrium" in history[f["name"]] and len(history[f["name"]]["step"])]
    if not fams:
        return None
    from matplotlib.figure import Figure
    fig = Figure(figsize=(14, 9), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    colours = _depth_colours(len(fams))
    predicted = False
    for f, col in zip(fams, colours):
        h = history[f["name"]]
        x, n = h["step"], max(1, len(h["step"]) // 50)
        axes[0].plot(x, _smooth(_layer_mean(h, "angle"), n), color=col, linewidth=1.6)
        axes[1].plot(x, _layer_mean(h, "empirical"), color=col, linewidth=1.8)
        for ax, key in ((axes[0], "angle_equilibrium"), (axes[1], "norm_equilibrium")):
            pred = _layer_mean(h, key)
            predicted |= bool(np.isfinite(pred).any())
            ax.plot(x, pred, color=col, linestyle=(0, (4, 2)), linewidth=1.1)
        axes[2].plot(x, _smooth(_layer_mean(h, "alignment"), n), color=col, linewidth=1.4)
        axes[3].plot(x, _smooth(_layer_mean(h, "ksb"), n), color=col, linewidth=1.4)
    axes[0].set_ylabel("angle between θ_k and θ_k+1  (radians, mean over filters)")
    axes[0].set_title("angular update per step; dashed: its rotational equilibrium (THEORY_ADAPTIVE §3.4)",
                      fontsize=10)
    axes[1].set_ylabel("|θ_A|²  (mean over filters)")
    axes[1].set_title("squared norm; dashed: the equilibrium recursion (no measured alignment)", fontsize=10)
    axes[2].set_ylabel("cos(θ_A, u_A)  (mean over filters)")
    axes[2].set_title("alignment of the update direction with the weights (2.5)", fontsize=10)
    axes[3].set_ylabel("KSB part of cos(θ_A, u_A)")
    axes[3].set_title("kinetic symmetry breaking: the preconditioner's part of the alignment", fontsize=10)
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax in axes[2:]:
        ax.axhline(0.0, color="gray", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3, which="both")
    if not predicted:
        axes[0].text(0.5, 0.95, "no equilibrium prediction for this optimizer (coupled Adam: THEORY_ADAPTIVE §3.6)",
                     transform=axes[0].transAxes, ha="center", va="top", fontsize=9, color="crimson")
    _depth_colorbar(fig, axes[1], compact_labels([family_layer(f) for f in fams]))
    fig.suptitle("Rotational equilibrium of scale-invariant layers" + (f" — {optimizer_text}" if optimizer_text else ""),
                 fontsize=11)
    fig.savefig(path)
    return path


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) < 2 * n or n <= 1:
        return y
    kernel = np.ones(n) / n
    return np.convolve(np.pad(y, (n - 1, 0), mode="edge"), kernel, mode="valid")


def plot_training(log: Dict[str, np.ndarray], path: str, test_accuracy: Optional[float] = None) -> Optional[str]:
    """Training loss and batch accuracy per step (thin: raw, thick: moving average)."""
    if not log or len(log.get("step", ())) == 0:
        return None
    fig, axes = _figure(12, 4.0, 2)
    n = max(1, len(log["step"]) // 30)
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "batch accuracy")):
        ax.plot(log["step"], log[key], color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        ax.plot(log["step"], _smooth(log[key], n), color="tab:blue", linewidth=2.0, label=f"moving average ({n} steps)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if test_accuracy is not None:
        axes[1].axhline(test_accuracy, color="tab:red", linestyle="--", linewidth=1.2,
                        label=f"test accuracy at the end ({test_accuracy:.1%})")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=8, loc="lower right")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("Training", fontsize=11)
    fig.savefig(path)
    return path
