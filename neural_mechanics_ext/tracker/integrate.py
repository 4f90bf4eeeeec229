"""Block integration: a block of per-slice moments and step records → history columns and per-family maxima.

Per block of T steps, on the host:
1. the per-group moments ``[T, G, 11]`` (the nine signed moments of ``plan.group_moments``, then the
   unsigned |θ_A|² and |g_A|², which rescale magnitudes and residual norms need);
2. per batch of families that share a kind class and optimizer param groups (:class:`Batch`), the optimizer
   theory's predictions and derived columns.  The prediction of step k rests on steps before k; a failed
   assumption at step k ends the batch's predictions from step k + 1 on;
3. the columns every optimizer shares (empirical value, magnitude, gradient-constraint residual, |g_A|²,
   effective lr, lr, t = Σ lr) and the block's maxima per family, which ``summary()`` accumulates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..plan import MomentPlan
from ..schema import COL, PREDICTIONS
from ..symmetry.family import SymmetryFamily
from ..symmetry.residual import constraint_residual

# Columns of a block's group moments: the nine signed moments, then unsigned |θ_A|² and |g_A|² (the
# magnitudes of rescale groups and the norms of the residual, which the signed sums cannot give).
UNSIGNED_XX, UNSIGNED_YY = 9, 10


@dataclass
class Batch:
    """Families integrated together: same kind class and same optimizer param groups."""
    kind: str                   # "translation" or "scale" (rescale shares the scale algebra)
    families: List[int]
    groups: torch.Tensor        # indices into the concatenated groups of the plan
    param_groups: Tuple[int, ...]
    params: List[int]           # plan tensor indices of the batch's parameters
    integrators: Dict[str, Any] = field(default_factory=dict)
    invalid: Optional[str] = None       # why predictions stopped, once they did
    invalid_step: Optional[int] = None


def make_batches(families: Sequence[SymmetryFamily], plan: MomentPlan, param_group: Sequence[int],
                 named: Dict[str, torch.Tensor]) -> List[Batch]:
    """Group the families by (kind class, optimizer param groups of their parameters)."""
    by_key: Dict[tuple, Batch] = {}
    tensor_index = {id(p): i for i, p in enumerate(plan.params)}
    for fi, f in enumerate(families):
        kind = "translation" if f.kind == "translation" else "scale"
        params = sorted({tensor_index[id(named[n])] for n in f.param_names})
        pgroups = tuple(sorted({param_group[t] for t in params}))
        batch = by_key.setdefault((kind, pgroups), Batch(kind, [], torch.empty(0, dtype=torch.long), pgroups, []))
        batch.families.append(fi)
        batch.params = sorted(set(batch.params) | set(params))
    for b in by_key.values():
        b.groups = torch.cat([torch.arange(plan.offsets[fi], plan.offsets[fi] + families[fi].num_groups)
                              for fi in b.families])
    return list(by_key.values())


class BlockIntegrator:
    """The host side of the tracker: integrators per batch, clocks, and the block → columns step.

    Attributes:
        batches: the :class:`Batch` es, with their integrators and validity.
        clock: t = Σ lr so far, per optimizer param group.
        processed: steps integrated so far.
    """

    def __init__(self, families: Sequence[SymmetryFamily], plan: MomentPlan, theory, param_group: Sequence[int],
                 num_param_groups: int, named: Dict[str, torch.Tensor]):
        self.families, self.plan, self.theory = list(families), plan, theory
        self.batches = make_batches(self.families, plan, param_group, named)
        if theory.reason:
            for b in self.batches:
                b.invalid = theory.reason
        self.clock = [0.0] * num_param_groups
        self.processed = 0
        self._family_of_group = torch.repeat_interleave(
            torch.arange(len(self.families)), torch.tensor([f.num_groups for f in self.families]))
        self._translation = torch.zeros(plan.num_groups, dtype=torch.bool)
        for fi, f in enumerate(self.families):
            if f.kind == "translation":
                self._translation[plan.offsets[fi]: plan.offsets[fi] + f.num_groups] = True

    def integrate(self, block: torch.Tensor, records: List[dict]) -> Dict[str, Any]:
        """Integrate the predictions over one block of steps: {"steps", "columns" [T, G], "stats"}."""
        T, G = len(records), self.plan.num_groups
        signed, unsigned = self.plan.group_moments(block[:T].reshape(-1, 9))
        M = torch.cat([signed.view(T, G, 9), unsigned.view(T, G, 9)[:, :, 3:5]], dim=2)
        # The theory's columns: NaN where it predicts nothing (another kind, or after a failed assumption).
        theirs = {name: torch.full((T, G), float("nan"), dtype=torch.float64)
                  for name in self.theory.scale_columns + PREDICTIONS}
        lr = torch.zeros((T, G), dtype=torch.float64)
        elapsed = torch.zeros((T, G), dtype=torch.float64)
        for b in self.batches:
            lr[:, b.groups], elapsed[:, b.groups] = self._integrate_batch(b, M[:, b.groups, :9], records, theirs)
        for rec in records:
            for i, h in enumerate(rec["groups"]):
                self.clock[i] += float(h["lr"])
        steps = torch.arange(self.processed, self.processed + T)
        self.processed += T
        return self._shared_columns(M, lr, elapsed, theirs, steps)

    def _integrate_batch(self, b: Batch, Mb: torch.Tensor, records: List[dict], out: Dict[str, torch.Tensor]):
        """Fill ``out``'s columns of the batch's groups; return its lr and t [T, 1]."""
        # Everything that does not recurse is done for the whole block at once; only the
        # integrators step through it.
        finite = torch.isfinite(Mb).flatten(1).all(1).tolist()
        settings, lrs, times, clock = [], [], [], self.clock[b.param_groups[0]]
        predicted: Dict[str, list] = {name: [] for name in PREDICTIONS}
        for t, rec in enumerate(records):
            hp, problem = self.theory.settings(b, rec, self.plan.names)
            if problem is None and not finite[t]:
                problem = f"non-finite {self.theory.inputs}"
            settings.append(hp)
            lrs.append(float(rec["groups"][b.param_groups[0]]["lr"]))
            times.append(clock)
            clock += lrs[-1]
            if not b.integrators:
                b.integrators = self.theory.integrators(b.kind, Mb[t])
            if b.invalid is None:
                for name, integ in b.integrators.items():
                    if not getattr(integ, "unsupported", None):
                        predicted[name].append((t, integ.prediction()))
                if problem:
                    b.invalid, b.invalid_step = problem, self.processed + t
                else:
                    self.theory.advance(b.integrators, hp, Mb[t])
        for name, rows in predicted.items():
            if rows:
                steps_with = torch.tensor([t for t, _ in rows])
                out[name][steps_with[:, None], b.groups] = torch.stack([v for _, v in rows])
        for name, v in self.theory.derived(b.kind, Mb, settings).items():
            out[name][:, b.groups] = v
        return (torch.tensor(lrs, dtype=torch.float64)[:, None], torch.tensor(times, dtype=torch.float64)[:, None])

    def _shared_columns(self, M, lr, elapsed, theirs, steps) -> Dict[str, Any]:
        """The columns of every optimizer, the theory's, and the block's maxima per family."""
        translation = self._translation
        n = M[:, :, COL["xx"]]
        empirical = torch.where(translation, M[:, :, COL["x"]], n)
        magnitude = torch.where(translation, torch.maximum(M[:, :, COL["x"]].abs(), M[:, :, UNSIGNED_XX].sqrt()),
                                M[:, :, UNSIGNED_XX])
        # Gradient-constraint residuals (THEORY §1.1), the same number the proof of a family reports; the
        # typical gradient element ḡ of each step is taken over the tracked groups.
        counts = self.plan.counts.cpu()
        g_rms_sq = (M[:, :, UNSIGNED_YY].sum(1) / counts.sum())[:, None]
        residual = constraint_residual(translation, M[:, :, COL["y"]], M[:, :, COL["xy"]], M[:, :, UNSIGNED_XX],
                                       M[:, :, UNSIGNED_YY], counts, g_rms_sq)
        columns = {"empirical": empirical, "magnitude": magnitude, "residual": residual,
                   "grad_sq": M[:, :, COL["yy"]], "effective_lr": lr / n,
                   **{k: theirs[k] for k in self.theory.scale_columns},
                   "lr": lr, "t": elapsed, **{p: theirs[p] for p in PREDICTIONS}}
        # Maxima over the block per family, for every family at once (scatter over the group -> family map).
        stats = {"magnitude": self._family_max(magnitude), "residual": self._family_max(residual)}
        for p in PREDICTIONS:
            stats[f"error_{p}"] = self._family_max((theirs[p] - empirical).abs())
            stats[f"predicted_{p}"] = self._family_max(torch.isfinite(theirs[p]).to(torch.float64))
        return {"steps": steps, "columns": columns, "stats": stats}

    def _family_max(self, v: torch.Tensor) -> List[float]:
        """Max over steps and groups of each family, ignoring non-finite values (-inf when none)."""
        per_group = torch.where(torch.isfinite(v), v, float("-inf")).amax(0)
        out = torch.full((len(self.families),), float("-inf"), dtype=torch.float64)
        return out.scatter_reduce(0, self._family_of_group, per_group, "amax").tolist()
