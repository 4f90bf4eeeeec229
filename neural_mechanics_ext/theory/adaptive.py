"""Exact identities of the symmetry groups under Adam, AdamW, Lion and SGD(M) (THEORY_ADAPTIVE.md §2, §5.1).

Inputs are the per-group (or per-member, see below) moments ``M`` [·, 9] (columns ``MOMENTS``) of the
streams (x, y, z) = (θ_k, p_k, u_k) formed at the step pre-hook (:mod:`.adaptive_forms`; the kernel's
``adam`` / ``lion`` modes), and each step's η_k and ρ_k.  Column meaning (§1):

    xx = n (scale) or r (rescale, signed),  x = s (translation),  xz = ⟨θ,u⟩,  zz = |u|²,  z = ⟨1,u⟩,
    xy = ⟨θ,p⟩,  yy = |p|²,  yz = ⟨p,u⟩,  y = Σ p.

* :class:`AdaptiveExactIntegrator`: (2.1)/(2.7) n' = ρ²n − 2ηρ⟨θ,u⟩ + η²|u|², (2.6) s' = ρs − η⟨1,u⟩,
  replayed open loop from the first tracked step and driven by the measured moments (exact: rounding).
* :func:`adaptive_angle`: (2.2), the angle between θ_k and θ_{k+1} of a group, radians.
* :func:`alignment_split`: cos(θ_A, u_A) and its exact split (2.5) into the inertial part κ⟨θ,p⟩ and the
  kinetic symmetry breaking K = ⟨θ, u − κp⟩, κ = ⟨p,u⟩/|p|².  K ≡ 0 when the preconditioner is one
  number on the group (SGD, SGDM: p = u).
* :class:`TranslationSetPoint`: §5.1, s* = −E[ξ]/λ with ξ = ⟨1,u⟩_A.

Members of one group with different weight decay (or lr): pass per-member rows and ``index`` (row → group)
to the integrator and the angle, which then apply each member's own ρ and η (the identities hold per
member and add).  Closed forms that need one λ per group get it from :func:`group_setting`, which is NaN
where the members disagree: the NaN flags the group and propagates to every prediction that needs it.

Everything is float64, vectorised over groups and free of host synchronisation.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..schema import COL
from .step import check_kind, check_moments

Scalar = Union[float, torch.Tensor]


def _f64(v: Scalar, like: torch.Tensor) -> Scalar:
    """A Python number stays one; a tensor is brought to float64 on ``like``'s device (no sync)."""
    return v.to(device=like.device, dtype=torch.float64) if isinstance(v, torch.Tensor) else float(v)


def _to_groups(values: torch.Tensor, index: Optional[torch.Tensor], num_groups: int) -> torch.Tensor:
    if index is None:
        return values
    return torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(0, index, values)


def _check_rows(M, index, num_groups, what="M"):
    M = check_moments(M, what)
    if index is None:
        return M, M.shape[0]
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.shape != (M.shape[0],):
        raise ValueError(f"index must be a long tensor [{M.shape[0]}] mapping each row of {what} to its group")
    if num_groups is None:
        raise ValueError("num_groups is required with index")
    return M, int(num_groups)


def group_setting(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G] the setting (λ or lr) shared by the members of each group, NaN where the members differ.

    ``values`` [R] holds each member row's setting, ``index`` [R] its group.  A group with no rows is NaN.
    """
    values = values.to(torch.float64)
    lo = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=values.device)
    hi = torch.full_like(lo, float("-inf"))
    lo = lo.scatter_reduce(0, index, values, "amin")
    hi = hi.scatter_reduce(0, index, values, "amax")
    return torch.where(lo == hi, lo, torch.full_like(lo, float("nan")))


class AdaptiveExactIntegrator:
    """Exact open-loop replay of n (scale), r (rescale) or s (translation) for θ_{k+1} = ρθ_k − ηu_k.

    Args:
        kind: "translation", "scale" or "rescale".
        M0: float64 moments of the first tracked step: [G, 9] per group, or [R, 9] per member row with
            ``index`` (rescale rows of the second side carry the sign −1, as in the group sums).
        index: optional long [R], the group of each row.
        num_groups: G, required with ``index``.

    ``prediction()`` is the value at the current step; ``advance(M, lr, rho)`` consumes step k's moments
    (columns xx, xz, zz; or x, z for translation) and its η_k, ρ_k and moves to step k+1.  η and ρ are
    Python numbers, or float64 tensors with one entry per row of M.  Works for every optimizer of
    :mod:`.adaptive_forms`, SGD included (ρ = 1, u = its update direction).  Error: rounding (~1e-15).
    """

    def __init__(self, kind: str, M0: torch.Tensor, index: Optional[torch.Tensor] = None,
                 num_groups: Optional[int] = None):
        self.kind = check_kind(kind)
        M0, self.num_groups = _check_rows(M0, index, num_groups, "M0")
        self.index = index
        col = "x" if kind == "translation" else "xx"
        self._value = _to_groups(M0[:, COL[col]].clone(), index, self.num_groups)
        self.steps = 0

    def prediction(self) -> torch.Tensor:
        """[G] predicted s, n or r at the current step (a new tensor every step; do not modify it)."""
        return self._value

    def advance(self, M: torch.Tensor, lr: Scalar, rho: Scalar = 1.0) -> None:
        """Consume step k's moments and scalars (lr = η_k, rho = ρ_k; per row when tensors)."""
        M, _ = _check_rows(M, self.index, self.num_groups)
        if M.shape[0] != (self.num_groups if self.index is None else self.index.shape[0]):
            raise ValueError(f"M has {M.shape[0]} rows, the integrator was built with "
                             f"{self.num_groups if self.index is None else self.index.shape[0]}")
        eta, rho = _f64(lr, M), _f64(rho, M)
        v = self._value
        if self.kind == "translation":
            xi = M[:, COL["z"]]
            if self.index is None:  # (2.6) s' = ρs − η⟨1,u⟩
                self._value = rho * v - eta * xi
            else:  # per member: s' = s + Σ_rows ((ρ_j − 1) s_j − η_j ξ_j), s_j the measured member sums
                self._value = v + _to_groups((rho - 1.0) * M[:, COL["x"]] - eta * xi, self.index, self.num_groups)
        else:
            tu, uu = M[:, COL["xz"]], M[:, COL["zz"]]
            if self.index is None:  # (2.1)/(2.7) n' = ρ²n − 2ηρ⟨θ,u⟩ + η²|u|²
                self._value = rho * rho * v - 2.0 * eta * rho * tu + eta * eta * uu
            else:  # per member: the state carries n, the measured rows split it where ρ differs
                delta = (rho * rho - 1.0) * M[:, COL["xx"]] - 2.0 * eta * rho * tu + eta * eta * uu
                self._value = v + _to_groups(delta, self.index, self.num_groups)
        self.steps += 1

    def state_dict(self) -> dict:
        """{"kind", "steps", "value"}: everything needed to resume (a checkpoint of the tracker)."""
        return {"kind": self.kind, "steps": self.steps, "value": self._value.clone()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from :meth:`state_dict`; a wrong kind or group count raises ValueError."""
        if sd.get("kind") != self.kind:
            raise ValueError(f"state_dict is for kind {sd.get('kind')!r}, this integrator is {self.kind!r}")
        v = sd["value"]
        if v.shape != (self.num_groups,):
            raise ValueError(f"state_dict['value'] has shape {tuple(v.shape)}, expected ({self.num_groups},)")
        self._value = v.detach().to(device=self._value.device, dtype=torch.float64).clone()
        self.steps = int(sd["steps"])


def adaptive_angle(M: torch.Tensor, lr: Scalar, rho: Scalar = 1.0, index: Optional[torch.Tensor] = None,
                   num_groups: Optional[int] = None) -> torch.Tensor:
    """[G] angle (radians) between θ_k and θ_{k+1} = ρθ_k − ηu_k of each group, from step k's moments (2.2).

    One η and ρ per group (index None):  φ = atan2(η·sqrt(n|u|² − ⟨θ,u⟩²), ρn − η⟨θ,u⟩), accurate for tiny
    angles (Lagrange's identity; ~1e-16 rad absolute).  Per-member rows (index given, η and ρ per row):
    θ_{k+1} = θ_k − Δ with Δ = (1−ρ)θ + ηu, φ = atan2(sqrt(n|Δ|² − ⟨θ,Δ⟩²), n − ⟨θ,Δ⟩); the decay parts
    cancel in the root, costing ~ε·(ηλ)²n/(η²|u_⊥|²) relative.  Meaningful for scale and translation groups
    (plain sums); a rescale group's signed columns do not define an angle.
    """
    M, G = _check_rows(M, index, num_groups)
    eta, rho = _f64(lr, M), _f64(rho, M)
    xx, xz, zz = M[:, COL["xx"]], M[:, COL["xz"]], M[:, COL["zz"]]
    if index is None:
        cross = torch.clamp(xx * zz - xz * xz, min=0.0)
        return torch.atan2(eta * torch.sqrt(cross), rho * xx - eta * xz)
    a = 1.0 - rho
    n = _to_groups(xx, index, G)
    t = _to_groups(a * xx + eta * xz, index, G)
    d2 = _to_groups(a * a * xx + 2.0 * a * eta * xz + eta * eta * zz, index, G)
    return torch.atan2(torch.sqrt(torch.clamp(n * d2 - t * t, min=0.0)), n - t)


def alignment_split(M: torch.Tensor, kind: str, sizes: Optional[torch.Tensor] = None) -> dict:
    """cos(θ_A, u_A) and its exact split into inertial and KSB parts (THEORY_ADAPTIVE (2.5), §4, §5.1).

    Args:
        M: [G, 9] group moments of the (θ, p, u) streams.
        kind: "scale" uses ⟨θ,·⟩; "translation" uses ⟨1,·⟩ (ξ = ⟨1,u⟩ = z, the §5.1 drift); "rescale"
            has only signed forms, for which neither a cosine nor a least-squares κ exists: all NaN.
        sizes: [G] group sizes C (translation only: cos(1,u) = ξ/(sqrt(C)|u|)).

    Returns ``{"alignment", "inertial", "ksb", "kappa"}``, each [G]: alignment = inertial + ksb, both
    normalised by |θ||u| (translation: sqrt(C)|u|); kappa = ⟨p,u⟩/|p|² (the best group-scalar preconditioner).
    A group with u = 0 (dead unit) or p = 0 gives 0.  SGD/SGDM (p = u): ksb = 0 to rounding.
    """
    kind = check_kind(kind)
    M = check_moments(M)
    yy, yz, zz = M[:, COL["yy"]], M[:, COL["yz"]], M[:, COL["zz"]]
    zero = torch.zeros_like(yy)
    kappa = torch.where(yy > 0, yz / torch.where(yy > 0, yy, torch.ones_like(yy)), zero)
    if kind == "rescale":
        nan = torch.full_like(yy, float("nan"))
        return {"alignment": nan, "inertial": nan, "ksb": nan.clone(), "kappa": nan.clone()}
    if kind == "scale":
        tu, tp, norm_sq = M[:, COL["xz"]], M[:, COL["xy"]], M[:, COL["xx"]] * zz
    else:
        if sizes is None:
            raise ValueError("alignment_split: translation groups need sizes (C per group)")
        tu, tp = M[:, COL["z"]], M[:, COL["y"]]
        norm_sq = _f64(sizes, M) * zz
    norm = torch.sqrt(norm_sq)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    inertial = kappa * tp
    ksb = tu - inertial  # exact split; the subtraction is the definition K = ⟨θ, u − κp⟩
    part = lambda v: torch.where(norm > 0, v / safe, zero)  # noqa: E731
    return {"alignment": part(tu), "inertial": part(inertial), "ksb": part(ksb), "kappa": kappa}


class TranslationSetPoint:
    """§5.1: the set point s* = −E[ξ]/λ of a translation group under decoupled decay (AdamW, Lion).

    s_{k+1} = ρs_k − ηξ_k is a first-order filter of ξ = ⟨1,u⟩_A (pure KSB) with time constant 1/(ηλ);
    s settles at −E[ξ]/λ.  E[ξ] is estimated by a bias-corrected EMA whose time constant is ``horizon``
    times the filter's (rate ηλ/horizon per step, so it follows schedules), which averages the per-step
    noise that s itself still carries.  (With horizon 1 and no bias correction −EMA/λ would obey s's own
    recursion from s = 0: no prediction.  Measured on the AdamW run of the tests, horizon 2: |s|/|s*| = 0.93
    and correlation 0.99 over the classifier's columns; the spec's window-mean estimate gave 0.93 and 0.977.)
    λ = 0 (no decay: s is a random walk) or NaN (members with different λ, :func:`group_setting`) gives
    NaN.  Coupled decay (Adam, SGD) has no such set point.
    """

    def __init__(self, num_groups: int, horizon: float = 2.0, device=None):
        if not horizon >= 1.0:
            raise ValueError(f"horizon must be >= 1 (in units of the filter's time constant), got {horizon}")
        self.horizon = float(horizon)
        self._ema = torch.zeros(num_groups, dtype=torch.float64, device=device)
        # Σ of the EMA weights, for the bias correction
        self._weight = torch.zeros(num_groups, dtype=torch.float64, device=device)
        self._lam = torch.full((num_groups,), float("nan"), dtype=torch.float64, device=device)

    def advance(self, M: torch.Tensor, lr: Scalar, weight_decay: Scalar) -> None:
        """Consume step k's group moments (column z = ξ) and its η, λ (numbers, or [G] tensors)."""
        M = check_moments(M, "M", self._ema.shape[0])
        eta, lam = _f64(lr, M), _f64(weight_decay, M)
        alpha = torch.clamp(torch.as_tensor(eta * lam / self.horizon, dtype=torch.float64, device=M.device), 0.0, 1.0)
        self._ema = (1.0 - alpha) * self._ema + alpha * M[:, COL["z"]]
        self._weight = (1.0 - alpha) * self._weight + alpha
        self._lam = torch.as_tensor(lam, dtype=torch.float64, device=M.device).expand_as(self._ema).clone()

    def state_dict(self) -> dict:
        """Everything needed to resume (horizon, EMA, its weight and the last λ)."""
        return {"horizon": self.horizon, "ema": self._ema.clone(), "weight": self._weight.clone(),
                "lam": self._lam.clone()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from :meth:`state_dict`; a wrong group count raises ValueError."""
        for k in ("ema", "weight", "lam"):
            if sd[k].shape != self._ema.shape:
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(sd[k].shape)}, expected {tuple(self._ema.shape)}")
        self.horizon = float(sd["horizon"])
        self._ema, self._weight, self._lam = (sd[k].detach().to(self._ema.device, torch.float64).clone()
                                              for k in ("ema", "weight", "lam"))

    def prediction(self) -> torch.Tensor:
        """[G] s* = −EMA(ξ)/λ (NaN before the first step, or where λ is 0 or NaN)."""
        ok = (self._weight > 0) & (self._lam > 0)
        mean = self._ema / torch.where(self._weight > 0, self._weight, torch.ones_like(self._weight))
        return torch.where(ok, -mean / torch.where(ok, self._lam, torch.ones_like(self._lam)),
                           torch.full_like(mean, float("nan")))


__all__ = ["AdaptiveExactIntegrator", "adaptive_angle", "alignment_split", "group_setting", "TranslationSetPoint"]
