"""The scaling figure: time against parameter count and against tensor count, one line per peer."""
from __future__ import annotations

from typing import Any, Dict, Optional

from .peers import GB


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
