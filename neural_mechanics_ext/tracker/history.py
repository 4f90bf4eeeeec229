"""The tracker's record on the host: logged rows per family, running maxima, and the summary rows.

Every integrated block arrives as columns ``[T, G]`` over all groups (``integrate.BlockIntegrator``); the
logged steps (every ``log_every``-th) are cut into one set of rows per family, which ``history()`` returns
and the sinks write.  The maxima behind ``summary()`` cover every step, logged or not.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..schema import PREDICTIONS
from ..symmetry.family import SymmetryFamily

# Columns every optimizer gives that mean something for scale groups only (the theory adds its own).
SCALE_ONLY = ("effective_lr", "grad_sq")


class History:
    """The rows of every tracked family (module docstring).

    Args:
        families: the tracked families, in the plan's order.
        offsets: the first group of each family in the block columns (``plan.offsets``).
        log_every: keep every ``log_every``-th step.
        scale_columns: the optimizer theory's columns that scale families only keep (beside ``SCALE_ONLY``).
    """

    def __init__(self, families: Sequence[SymmetryFamily], offsets: Sequence[int], log_every: int,
                 scale_columns: Tuple[str, ...] = ()):
        self.families, self.offsets, self.log_every = list(families), list(offsets), log_every
        self.scale_only = SCALE_ONLY + tuple(scale_columns)
        self.by_family = {f.name: FamilyHistory(f) for f in self.families}

    def add(self, block: Dict[str, Any]) -> Dict[str, Dict[str, np.ndarray]]:
        """Add an integrated block; returns its logged rows per family (what the sinks write)."""
        steps, columns, stats = block["steps"], block["columns"], block["stats"]
        logged = (steps % self.log_every) == 0
        # The logged rows of every group, converted once; families take views of their groups.
        cols = {name: v[logged].numpy() for name, v in columns.items()}
        starts = np.asarray(self.offsets)
        sums = {p: np.add.reduceat(cols[p], starts, axis=1) if len(cols[p]) else np.zeros((0, len(starts)))
                for p in ("empirical",) + PREDICTIONS}
        worst = np.maximum.reduceat(cols["residual"], starts, axis=1) if len(cols["residual"]) else sums["empirical"]
        new_rows = {}
        for fi, f in enumerate(self.families):
            sl = slice(self.offsets[fi], self.offsets[fi] + f.num_groups)
            rows = {"step": steps[logged].numpy(), "t": cols["t"][:, sl.start], "lr": cols["lr"][:, sl.start]}
            for name, v in cols.items():
                if name not in ("t", "lr") and (f.kind == "scale" or name not in self.scale_only):
                    rows[name] = v[:, sl]
            rows["residual"] = worst[:, fi]
            for p, v in sums.items():
                rows[f"{p}_sum"] = v[:, fi]
            new_rows[f.name] = rows
            self.by_family[f.name].add(len(steps), rows, {k: v[fi] for k, v in stats.items()})
        return new_rows

    def arrays(self) -> Dict[str, Dict[str, np.ndarray]]:
        return {name: h.arrays() for name, h in self.by_family.items()}

    def summary(self, batches, excluded: Sequence[Tuple[SymmetryFamily, str]]) -> List[Dict[str, Any]]:
        """One row per family, tracked ones first (see ``SymmetryTracker.summary``)."""
        rows = []
        batch_of = {fi: b for b in batches for fi in b.families}
        for fi, f in enumerate(self.families):
            h = self.by_family[f.name]
            b = batch_of[fi]
            failed = []
            if b.invalid and b.invalid_step is None:
                failed.append(b.invalid)
            elif b.invalid:
                failed.append(f"from step {b.invalid_step}: {b.invalid} (no predictions after it)")
            for name, integ in b.integrators.items():
                reason = getattr(integ, "unsupported", None)
                if reason:
                    failed.append(f"{name}: {reason}")
            if f.note:
                failed.append(f.note)
            rows.append({"family": f.name, "kind": f.kind, "groups": f.num_groups, "steps": h.steps,
                         **{f"error_{p}": h.max_error(p) for p in PREDICTIONS},
                         "residual": h.max_residual, "assumptions": failed})
        for f, reason in excluded:
            rows.append({"family": f.name, "kind": f.kind, "groups": f.num_groups, "steps": 0,
                         **{f"error_{p}": float("nan") for p in PREDICTIONS}, "residual": float("nan"),
                         "assumptions": [f"not tracked: {reason}"]})
        return rows

    def state_dict(self) -> Dict[str, Any]:
        return {name: h.state_dict() for name, h in self.by_family.items()}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        for name, h in self.by_family.items():
            h.load_state_dict(sd[name])


class FamilyHistory:
    """The logged rows of one family, plus running maxima over every step (logged or not)."""

    def __init__(self, family: SymmetryFamily):
        self.family = family
        self.blocks: List[Dict[str, np.ndarray]] = []
        self.steps = 0
        self.max_abs_error = {p: 0.0 for p in PREDICTIONS}
        self.predicted = {p: False for p in PREDICTIONS}
        self.max_magnitude = 0.0
        self.max_residual = 0.0

    def add(self, steps: int, rows: Dict[str, np.ndarray], stats: Dict[str, float]) -> None:
        """Keep a block's logged rows; ``stats`` are the block's maxima over all its ``steps`` steps."""
        self.steps += steps
        self.max_magnitude = max(self.max_magnitude, stats["magnitude"])
        self.max_residual = max(self.max_residual, stats["residual"])
        for p in PREDICTIONS:
            if stats[f"predicted_{p}"] > 0:
                self.predicted[p] = True
                self.max_abs_error[p] = max(self.max_abs_error[p], stats[f"error_{p}"])
        self.blocks.append(rows)

    def state_dict(self) -> Dict[str, Any]:
        return {"arrays": self.arrays(), "steps": self.steps, "max_abs_error": dict(self.max_abs_error),
                "predicted": dict(self.predicted), "max_magnitude": self.max_magnitude,
                "max_residual": self.max_residual}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.blocks = [dict(sd["arrays"])] if sd["arrays"] else []
        self.steps = sd["steps"]
        self.max_abs_error, self.predicted = dict(sd["max_abs_error"]), dict(sd["predicted"])
        self.max_magnitude, self.max_residual = sd["max_magnitude"], sd["max_residual"]

    def arrays(self) -> Dict[str, np.ndarray]:
        if not self.blocks:
            return {}
        return {k: np.concatenate([b[k] for b in self.blocks]) for k in self.blocks[0]}

    def max_error(self, prediction: str) -> float:
        """DESIGN.md §3: max |pred − emp| over steps and groups over the max magnitude; NaN if never predicted."""
        if not self.predicted[prediction] or self.max_magnitude == 0:
            return float("nan")
        return self.max_abs_error[prediction] / self.max_magnitude
