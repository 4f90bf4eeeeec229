"""torch.optim.Adam / AdamW (every variant torch has) and lion-pytorch's Lion seen by the tracker.

One implementation of :class:`~neural_mechanics_ext.tracker.optimizers.OptimizerTheory`; the algebra lives in
:mod:`neural_mechanics_ext.theory` (THEORY_ADAPTIVE.md).  The stream is (x, y, z) = (θ, p, u): p the
pre-preconditioner direction (Adam: m' = β₁m + (1−β₁)g̃; Lion: c), u the update direction, so that
θ_{k+1} = ρθ_k − ηu_k exactly (ρ = 1 − ηλ for AdamW and Lion, 1 for coupled Adam).  Columns per family:

* ``exact``: (2.1)/(2.7)/(2.6) replayed open loop from the first tracked step, driven by the measured
  moments (agrees with ``empirical`` to rounding: the proof that u was formed as the optimizer forms it);
* ``angle`` (scale): the angle between θ_k and θ_{k+1} (2.2), radians per step;
* ``angle_equilibrium``, ``norm_equilibrium`` (scale): the schedule-aware random-walk recursions of §3.4,
  which use no measured alignment (AdamW: C-driven with the β₂ lag; Lion: C-driven); AdamW also
  ``norm_equilibrium_kinetic``, the |u|²-driven recursion (b).  Coupled Adam has none (§3.6): NaN;
* ``alignment`` = cos(θ_A, u_A) (translation: cos(1_A, u_A)) and ``ksb``, its kinetic-symmetry-breaking
  part (2.5) (translation under AdamW/Lion: ⟨1,u⟩ is all KSB);
* ``set_point`` (translation, AdamW and Lion): s* = −EMA(ξ)/λ of §5.1.

Members of one group with different settings (Hugging Face's default puts biases and norm weights in a
param group without weight decay): the exact replay and the angle apply each member slice's own η and ρ
(``Batch.members``), which is exact; the equilibrium recursion and the set point need one λ per group and
stop with a note in ``summary()``.

Cost: :func:`adaptive_stream` hands the kernel's fused ``adam``/``lion`` modes θ, g and the optimizer state
(``adam_moments``/``lion_moments``), which form (p, u) per element while they sum the moments: one read of
each tensor, no allocation.  A step where some tracked tensor has no gradient, and the sharded (FSDP2) pass,
form (p, u) with the reference ``theory.update_direction`` instead (two parameter-sized tensors each).
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..theory import (AdaptiveExactIntegrator, AdaptiveHyper, EquilibriumRecursion, TranslationSetPoint,
                      adaptive_angle, alignment_split, group_setting, optimizer_family, state_step, step_hyper)
from .hooks import Stream

SCALE, BOTH = ("scale",), ("scale", "translation")
EQUILIBRIUM_TAUS = 3.0      # a family counts as equilibrated after this many slow time constants (e^-3 ≈ 5 %)
WINDOW = 0.4                # summary ratios: means over the last 40 % of the logged steps (the spec's window)


def adaptive_stream(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    hypers: Sequence[AdaptiveHyper]) -> Stream:
    """The stream of the tracked tensors at the step pre-hook: the fused ``adam``/``lion`` mode's inputs
    (gradients, optimizer state, per-tensor scalars), or (p, u) formed by the reference where a tensor has
    no gradient (the kernels need every gradient)."""
    state = [optimizer.state[p] if p in optimizer.state else {} for p in params]
    grads = [p.grad for p in params]
    lion = bool(hypers) and hypers[0].family == "lion"
    stream = Stream(grads, [None] * len(params), list(hypers), "lion" if lion else "adam",
                    tuple([s.get(n) for s in state] for n in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
                    [_scalars(hp) for hp in hypers])
    return stream.formed(params) if any(g is None for g in grads) else stream


def _scalars(hp: AdaptiveHyper) -> Tuple[float, ...]:
    """One tensor's scalars of the fused op: Lion (β₁); Adam (β₁, β₂, ε, bc₁, bc₂, coupled λ, maximize)."""
    b1, b2 = hp.betas
    if hp.family == "lion":
        return (b1,)
    bc1, bc2 = hp.bias_corrections
    return (b1, b2, hp.eps, bc1, bc2, 0.0 if hp.decoupled else hp.weight_decay, 1.0 if hp.maximize else 0.0)


def supported(optimizer: torch.optim.Optimizer) -> Tuple[Optional[str], Optional[str]]:
    """(family, None) when this theory covers the optimizer, else (None, why not)."""
    cls = type(optimizer)
    if cls not in (torch.optim.Adam, torch.optim.AdamW) and not (
            cls.__name__ == "Lion" and cls.__module__.startswith("lion_pytorch")):
        return None, None
    families = {optimizer_family(optimizer, g) for g in optimizer.param_groups}
    if len(families) != 1:
        return None, (f"{cls.__name__} with both coupled and decoupled weight decay across param groups is not "
                      "covered; empirical values and residuals only")
    if any(g.get("differentiable", False) for g in optimizer.param_groups):
        return None, f"{cls.__name__}(differentiable=True) is not covered; empirical values and residuals only"
    return families.pop(), None


class AdaptiveStep(NamedTuple):
    """A batch's settings at one step (what ``settings`` gives ``advance`` and ``derived``)."""
    hp: AdaptiveHyper                       # the first member's (all members' when ``mixed`` is None)
    mixed: Optional[str]                    # why the members' settings differ, or None
    lr_rows: Optional[torch.Tensor] = None  # [R] η per member slice (batches with members)
    rho_rows: Optional[torch.Tensor] = None  # [R] ρ per member slice
    lam_rows: Optional[torch.Tensor] = None  # [R] λ per member slice


class AdaptiveTheory:
    """Adam (coupled L2), AdamW or Lion: y = p, z = u; integrators exact, equilibrium, set point.

    Args:
        optimizer: the optimizer (``supported(optimizer)`` must have accepted it).
    """

    reason = None
    inputs = "parameters, gradients or optimizer states"
    reads_gradient = False      # y = p, not g: the gradient-constraint residual and grad_sq are NaN
    columns = {"angle": SCALE, "angle_equilibrium": SCALE, "norm_equilibrium": SCALE,
               "norm_equilibrium_kinetic": SCALE, "alignment": BOTH, "ksb": BOTH, "set_point": ("translation",)}

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.family = optimizer_family(optimizer)
        self._group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._taken: Dict[int, int] = {}    # Adam steps taken per parameter, counted on the host
        self._last_ids: List[int] = []

    # ---- the step path (no host sync) ---------------------------------------------------------------
    def stream(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Stream:
        """(p, u) of ``params`` for the coming step, with the step's settings per tensor in ``meta``."""
        base: Dict[int, AdaptiveHyper] = {}
        hypers = []
        for p in params:
            gi = self._group_of[id(p)]
            if gi not in base:
                base[gi] = step_hyper(optimizer, optimizer.param_groups[gi], step=1)
            hypers.append(base[gi]._replace(step=self._coming_step(optimizer, p)))
        self._last_ids = [id(p) for p in params]
        return adaptive_stream(optimizer, params, hypers)

    def _coming_step(self, optimizer, p) -> int:
        state = optimizer.state[p] if p in optimizer.state else {}
        if self.family == "lion":  # Lion counts no steps; t > 1 tells the recursion its momentum is not empty
            return 1 + ("exp_avg" in state)
        if id(p) not in self._taken:  # read once (a device step tensor syncs once), then counted here
            self._taken[id(p)] = state_step(state)
        return self._taken[id(p)] + 1

    def record(self, optimizer: torch.optim.Optimizer, stream: Stream) -> Dict[str, Any]:
        """The step's lr per param group (the clock), settings per tensor, tensors without a gradient."""
        no_grad = {i for i, y in enumerate(stream.y) if y is None}
        for i, pid in enumerate(self._last_ids):
            if i not in no_grad and pid in self._taken:  # the optimizer skips parameters without gradient
                self._taken[pid] += 1
        return {"groups": [{"lr": g["lr"]} for g in optimizer.param_groups], "hypers": stream.meta,
                "no_grad": no_grad}

    # ---- block integration (host) -------------------------------------------------------------------
    @staticmethod
    def settings(batch, record: Dict[str, Any], names: Sequence[str]) -> Tuple[AdaptiveStep, Optional[str]]:
        hps = [record["hypers"][t] for t in batch.params]
        h = hps[0]
        differ = sorted(k for k in ("lr", "weight_decay", "betas", "eps") if any(getattr(x, k) != getattr(h, k)
                                                                                  for x in hps[1:]))
        mixed = (f"members of one group have different {', '.join(differ)} (e.g. no weight decay on biases); the "
                 "equilibrium predictions need one setting per group" if differ else None)
        step = AdaptiveStep(h, mixed)
        if batch.members is not None:
            per_row = [record["hypers"][t] for t in batch.members.tensor.tolist()]
            step = step._replace(**{k: torch.tensor([getattr(x, a) for x in per_row], dtype=torch.float64)
                                    for k, a in (("lr_rows", "lr"), ("rho_rows", "rho"),
                                                 ("lam_rows", "weight_decay"))})
        no_grad = [names[t] for t in batch.params if t in record["no_grad"]]
        return step, (f"{', '.join(no_grad)} had no gradient (the optimizer skipped it)" if no_grad else None)

    def integrators(self, batch, M0: torch.Tensor, rows0: Optional[torch.Tensor] = None,
                    step: Optional[AdaptiveStep] = None) -> Dict[str, Any]:
        """exact (per member slice when the batch spans param groups); equilibrium (scale) or set point
        (translation, decoupled decay)."""
        if batch.members is not None:
            exact = AdaptiveExactIntegrator(batch.kind, rows0, batch.members.index, len(batch.groups))
        else:
            exact = AdaptiveExactIntegrator(batch.kind, M0)
        out: Dict[str, Any] = {"exact": exact}
        if batch.kind == "scale":
            out["equilibrium"] = _Equilibrium(self.family, M0, batch.sizes, batch.rescale)
        elif self.family in ("adamw", "lion"):
            out["set_point"] = _SetPoint(len(batch.groups), batch.members)
        if step is not None and step.mixed:
            for name, integ in out.items():
                if name != "exact":  # the exact replay holds per member
                    integ.stop(step.mixed)
        return out

    @staticmethod
    def advance(integrators: Dict[str, Any], step: AdaptiveStep, M: torch.Tensor,
                rows: Optional[torch.Tensor] = None) -> None:
        hp = step.hp
        for name, integ in integrators.items():
            if name == "exact":
                if rows is not None:
                    integ.advance(rows, step.lr_rows, step.rho_rows)
                else:
                    integ.advance(M, hp.lr, hp.rho)
            elif step.mixed:
                integ.stop(step.mixed)
            else:
                integ.advance(step, M)

    @staticmethod
    def derived(batch, Mb: torch.Tensor, steps: List[AdaptiveStep], rows: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """Angle (scale), alignment and KSB [T, G] of a block; rescale groups NaN (signed moments)."""
        T, G = Mb.shape[:2]
        keep = ~batch.rescale
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        split = alignment_split(Mb.reshape(-1, 9), batch.kind, sizes=batch.sizes.repeat(T))
        out = {k: torch.where(keep, split[k].view(T, G), nan) for k in ("alignment", "ksb")}
        if batch.kind == "scale":
            lr = torch.tensor([s.hp.lr for s in steps], dtype=torch.float64)[:, None].expand(T, G)
            rho = torch.tensor([s.hp.rho for s in steps], dtype=torch.float64)[:, None].expand(T, G)
            angle = adaptive_angle(Mb.reshape(-1, 9), lr.reshape(-1), rho.reshape(-1)).view(T, G)
            mixed = torch.tensor([s.mixed is not None for s in steps])
            if rows is not None and bool(mixed.any()):  # each member's own η and ρ (exact, slightly noisier)
                index = (batch.members.index[None] + G * torch.arange(T)[:, None]).reshape(-1)
                per_member = adaptive_angle(rows.reshape(-1, 9), torch.stack([s.lr_rows for s in steps]).reshape(-1),
                                            torch.stack([s.rho_rows for s in steps]).reshape(-1), index, T * G)
                angle = torch.where(mixed[:, None], per_member.view(T, G), angle)
            out["angle"] = torch.where(keep, angle, nan)
        return out

    @staticmethod
    def summary(batch, arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
        """Per family: measured/predicted angle and norm over the last 40 % of the logged steps, the window
        means of the alignment and its KSB part, the elapsed time in units of the slow time constant and
        whether that is ≥ ``EQUILIBRIUM_TAUS``; translation: |s|/|s*| of the window means."""
        out: Dict[str, Any] = {}
        if not arrays or "alignment" not in arrays:  # rescale: no angle, no alignment, no equilibrium
            return out
        n = len(arrays["step"])
        w = slice(int(n * (1 - WINDOW)), None)
        mean = lambda k: float(np.nanmean(arrays[k][w])) if np.isfinite(arrays[k][w]).any() else float("nan")  # noqa: E731
        out["alignment"], out["ksb"] = mean("alignment"), mean("ksb")
        eq = batch.integrators.get("equilibrium")
        if "angle" in arrays and eq is not None:
            out["angle_ratio"] = mean("angle") / mean("angle_equilibrium")
            out["norm_ratio"] = mean("empirical") / mean("norm_equilibrium")
            out["elapsed_tau"] = eq.rec.elapsed
            out["equilibrium_reached"] = bool(eq.rec.elapsed >= EQUILIBRIUM_TAUS)
        if "set_point" in arrays and np.isfinite(arrays["set_point"][w]).all() and n:
            s, s_star = (arrays[k][w].mean(0) for k in ("empirical", "set_point"))
            out["set_point_ratio"] = float(np.linalg.norm(s) / np.linalg.norm(s_star))
        return out


class _Equilibrium:
    """The §3.4 recursion of a scale batch as tracker columns (rescale groups NaN)."""

    def __init__(self, family: str, M0: torch.Tensor, sizes: torch.Tensor, rescale: torch.Tensor):
        self.rec = EquilibriumRecursion(family, M0, sizes=sizes)
        self._rescale, self._stopped = rescale, None
        self.family = family

    @property
    def unsupported(self) -> Optional[str]:
        return self.rec.unsupported or self._stopped

    def stop(self, reason: str) -> None:
        self._stopped = self._stopped or reason

    def _mask(self, v: torch.Tensor) -> torch.Tensor:
        return torch.where(self._rescale, float("nan"), v)

    def columns(self) -> Dict[str, torch.Tensor]:
        return {"norm_equilibrium": self._mask(self.rec.prediction()),
                "norm_equilibrium_kinetic": self._mask(self.rec.prediction_kinetic())}

    def step_columns(self) -> Dict[str, torch.Tensor]:
        """The expected angle of the step just consumed."""
        return {} if self.unsupported else {"angle_equilibrium": self._mask(self.rec.angle)}

    def advance(self, step: AdaptiveStep, M: torch.Tensor) -> None:
        self.rec.advance(step.hp, M)

    def state_dict(self) -> dict:
        return {"rec": self.rec.state_dict(), "stopped": self._stopped}

    def load_state_dict(self, sd: dict) -> None:
        self.rec.load_state_dict(sd["rec"])
        self._stopped = sd["stopped"]


class _SetPoint:
    """§5.1's set point of a translation batch as a tracker column."""

    unsupported = None

    def __init__(self, num_groups: int, members=None):
        self.sp, self._members, self._G = TranslationSetPoint(num_groups), members, num_groups

    def stop(self, reason: str) -> None:
        self.unsupported = self.unsupported or reason

    def columns(self) -> Dict[str, torch.Tensor]:
        return {"set_point": self.sp.prediction()}

    def advance(self, step: AdaptiveStep, M: torch.Tensor) -> None:
        lam = step.hp.weight_decay
        if self._members is not None:  # NaN where the members' λ differ (group_setting)
            lam = group_setting(step.lam_rows, self._members.index, self._G)
        self.sp.advance(M, step.hp.lr, lam)

    def state_dict(self) -> dict:
        return {"sp": self.sp.state_dict(), "stopped": self.unsupported}

    def load_state_dict(self, sd: dict) -> None:
        self.sp.load_state_dict(sd["sp"])
        self.unsupported = sd["stopped"]
