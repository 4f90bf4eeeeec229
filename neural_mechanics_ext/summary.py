"""Per-family summaries computed from a tracker history (``SymmetryTracker.history()`` or a run folder's
``sinks.read_run``): the error table of DESIGN.md §3 and the magnitudes that tell a meaningful error from
rounding noise."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from .schema import PREDICTIONS


def errors_from_history(history: Dict[str, Dict[str, np.ndarray]], families: List[dict]) -> List[Dict[str, Any]]:
    """Per family, the summary row computed from the logged history: max relative error of each
    prediction (max |pred − emp| over logged steps and groups / max magnitude, DESIGN.md §3) and the
    max constraint residual.  Equals ``tracker.summary()`` when every step was logged (log_every=1)."""
    rows = []
    for f in families:
        h = history.get(f["name"])
        row = {"family": f["name"], "kind": f["kind"], "groups": f["groups"], "steps": 0,
               **{f"error_{p}": None for p in PREDICTIONS}, "residual": None, "assumptions": []}
        if h and len(h.get("step", ())):
            row["steps"] = int(h["step"][-1]) + 1
            mag = float(np.nanmax(h["magnitude"]))
            for p in PREDICTIONS:
                err = np.abs(h[p] - h["empirical"])
                if np.isfinite(err).any() and mag > 0:
                    row[f"error_{p}"] = float(np.nanmax(err)) / mag
            row["residual"] = float(np.nanmax(h["residual"]))
            if f.get("note"):
                row["assumptions"].append(f["note"])
        rows.append(row)
    return rows


NEAR_ZERO = 1e-4   # a family this much smaller than the largest of its kind holds only rounding noise


def add_magnitudes(rows: List[dict], history: Dict[str, Dict[str, np.ndarray]]) -> List[dict]:
    """Add ``max_magnitude`` (max over logged steps and groups) and ``near_zero`` to each row.

    ``near_zero`` marks a family whose values stay at rounding level, e.g. conv biases in front of
    BatchNorm initialised at 0: their gradient is zero in exact arithmetic, so they never move, and a
    relative error (or residual) divides rounding noise by rounding noise, which reads as ~1."""
    for r in rows:
        h = history.get(r["family"])
        mag = h.get("magnitude") if h else None
        r["max_magnitude"] = float(np.nanmax(np.abs(mag))) if mag is not None and mag.size else None
    for r in rows:
        same = [q["max_magnitude"] for q in rows if q["kind"] == r["kind"] and q["max_magnitude"] is not None]
        r["near_zero"] = bool(r["max_magnitude"] is not None and same and r["max_magnitude"] < NEAR_ZERO * max(same))
    return rows
