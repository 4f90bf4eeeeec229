"""Rotational equilibrium of scale groups under AdamW, Lion and SGD(M): predictions that use no measured
alignment (THEORY_ADAPTIVE.md §3.3–3.5; Kosson, Messmer & Jaggi 2024; Wan et al. 2021).

* :func:`equilibrium_closed_form`: n* = |θ_A|² and the angular update per step η_r at constant settings,
  form "D" (derived, discrete) or "K" (Kosson et al.'s leading-order forms).
* :func:`time_constants`: the relaxation times of §3.5 in steps (fast, slow).
* :class:`EquilibriumRecursion`: the schedule-aware online recursions of §3.4 (O(1) per group and step,
  float64, no host sync): expected n_k and the expected angle of each step, plus the elapsed time in
  units of the time constant.

Accuracy against training (§3.3, §3.4 measured, model P): AdamW n within a few % (β₂ = .99; slower when
2ηλ ≳ 1 − β₂), angle within 2–6 %; SGDM n within 3–7 %, angle within 1–4 %; Lion 5–20 %.  The errors are
those of the random-walk model (§3.7: slightly anti-correlated minibatch gradients, a small negative mean
KSB), not of the arithmetic.  Coupled Adam has no prediction from these moments (§3.6 needs Σθ²/D): NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .adaptive_forms import AdaptiveHyper
from .derived import equilibrium_norm
from ..schema import COL
from .step import StepHyper, check_moments, evaluate, hyper_floats, step_forms

Scalar = Union[float, torch.Tensor]
_ASIN_TAYLOR = {1: 1.0, 3: 1.0 / 6.0, 5: 3.0 / 40.0, 7: 5.0 / 112.0}  # asin x = Σ a_p x^p (§3.4c)


def lion_correlation(beta1: float, beta2: float) -> Tuple[float, float]:
    """(r₁, V) of §3.3: lag-1 correlation of Lion's c and its variance per unit gradient variance."""
    V = (1 - beta1) ** 2 + beta1 ** 2 * (1 - beta2) / (1 + beta2)
    return beta1 * (1 - beta2) * ((1 - beta1) + beta1 * beta2 / (1 + beta2)) / V, V


def _lion_S_over_C(rho: Scalar, beta1: float, beta2: float) -> Scalar:
    """S/C = 1 + 2 Σ_{i≥1} ρ^i (2/π) asin(r₁ β₂^{i−1}) (§3.3): exact asin until r₁β₂^{i−1} < 1e-4, then
    the geometric tail with asin x = x (its relative error x²/6 < 2e-9)."""
    r1, _ = lion_correlation(beta1, beta2)
    terms = max(1, math.ceil(math.log(1e-4 / r1) / math.log(beta2)) + 1) if 0 < beta2 < 1 and r1 > 1e-4 else 1
    i = torch.arange(1, terms + 1, dtype=torch.float64)
    rho_t = torch.as_tensor(rho, dtype=torch.float64)
    powers = rho_t.unsqueeze(-1) ** i  # [..., I]
    head = (powers * torch.asin(r1 * beta2 ** (i - 1))).sum(-1)
    tail = r1 * rho_t ** (terms + 1) * beta2 ** terms / (1 - rho_t * beta2)
    out = 1.0 + (4.0 / math.pi) * (head + tail)
    return float(out) if not isinstance(rho, torch.Tensor) else out


def equilibrium_closed_form(family: str, lr: Scalar, weight_decay: Scalar, *, betas=(0.9, 0.999),
                            momentum: float = 0.0, dampening: float = 0.0, sizes: Scalar = None,
                            G_hat: Scalar = None, form: str = "D") -> Tuple[torch.Tensor, torch.Tensor]:
    """(n*, η_r) of a scale group at constant settings (§3.3), float64 tensors.

    Args:
        family: "adamw", "lion", "sgd" ("adam", coupled L2, has none here: NaN, §3.6).
        lr, weight_decay: η and the effective λ (numbers or [G] tensors; NaN flags a group whose members differ).
        betas: (β₁, β₂) of Adam/Lion.  momentum, dampening: SGD's β and δ.
        sizes: C, the group size (AdamW, Lion).  G_hat: SGD's scale-free gradient power Ĝ = |g_A|²·n.
        form: "D" (derived discrete random-walk forms) or "K" (Kosson et al.: AdamW ηC/(2λ) and
            sqrt(2ηλ(1−β₁)/(1+β₁)); Lion (ηC/(2λ))·2/(πV) and sqrt(π/2)sqrt(2ηλV); SGD sqrt(ηĜ/(2λ(1−β))) and
            sqrt(2ηλ/(1+β)), with η → η(1−δ) under dampening).
    """
    if form not in ("D", "K"):
        raise ValueError(f"form must be 'D' or 'K', got {form!r}")
    eta = torch.as_tensor(lr, dtype=torch.float64)
    lam = torch.as_tensor(weight_decay, dtype=torch.float64)
    rho = 1.0 - eta * lam
    if family == "adamw" or family == "lion":
        if sizes is None:
            raise ValueError(f"equilibrium_closed_form: {family} needs sizes (C per group)")
        C = torch.as_tensor(sizes, dtype=torch.float64)
        b1, b2 = (float(b) for b in betas)
        if family == "adamw":
            if form == "K":
                return eta * C / (2 * lam), torch.sqrt(2 * eta * lam * (1 - b1) / (1 + b1))
            n = eta ** 2 * C * (1 - b1) * (1 + b1 * rho) / ((1 + b1) * (1 - b1 * rho) * (1 - rho ** 2))
            return n, torch.sqrt((1 - rho ** 2) * (1 - b1 * rho) / (1 + b1 * rho))
        _, V = lion_correlation(b1, b2)
        if form == "K":
            return eta * C / (2 * lam) * 2 / (math.pi * V), math.sqrt(math.pi / 2) * torch.sqrt(2 * eta * lam * V)
        S = _lion_S_over_C(rho, b1, b2)
        return eta ** 2 * C * S / (1 - rho ** 2), torch.sqrt((1 - rho ** 2) / S)
    if family == "sgd":
        if G_hat is None:
            raise ValueError("equilibrium_closed_form: sgd needs G_hat (|g_A|²·n, measured)")
        beta = float(momentum)
        c = 1.0 if beta == 0.0 else 1.0 - float(dampening)
        if form == "K":
            G = torch.as_tensor(G_hat, dtype=torch.float64)
            return torch.sqrt(eta * c * G / (2 * lam * (1 - beta))), torch.sqrt(2 * eta * c * lam / (1 + beta))
        # stationarity: E|v'|² = 2cλn/(η(1+β)), E⟨θ,u⟩ = ηE|u|²/2, so η_r² = η²(U − A²/n)/n = x − x²/4
        x = 2 * eta * c * lam / (1 + beta)
        return equilibrium_norm(eta, lam, G_hat, beta, float(dampening)), torch.sqrt(x - x * x / 4)
    if family == "adam":
        nan = torch.full_like(rho, float("nan"))
        return nan, nan.clone()
    raise ValueError(f"family must be 'adamw', 'adam', 'lion' or 'sgd', got {family!r}")


def time_constants(family: str, lr: float, weight_decay: float, *, betas=(0.9, 0.999), momentum: float = 0.0,
                   dampening: float = 0.0, kind: str = "scale") -> Tuple[float, float]:
    """(τ_fast, τ_slow) in steps, the relaxation times of §3.5 at these settings (linearised model).

    scale, AdamW: roots of μ² − (2ε+δ)μ + εδ with ε = 1−ρ², δ = 1−β₂ (the β₂ lag of v̂), τ = 1/μ;
    scale, Lion: 1/(1−ρ²) (both);  scale, SGD(M): γ' = (1−β)/(1+β), ω'² = 8η'λ/(1+β), η' = η(1−δ):
    1/(γ' ∓ sqrt(γ'² − ω'²)) overdamped, 1/γ' for both underdamped;  translation (AdamW, Lion): 1/(ηλ).
    λ = 0 gives inf; coupled Adam, and SGD translation (THEORY.md §4.2 has its own oscillator), give NaN.
    """
    eta, lam = float(lr), float(weight_decay)
    nan = (float("nan"), float("nan"))
    if kind == "translation":
        if family not in ("adamw", "lion"):
            return nan
        tau = 1.0 / (eta * lam) if eta * lam > 0 else float("inf")
        return tau, tau
    if kind != "scale":
        return nan
    eps = 1.0 - (1.0 - eta * lam) ** 2
    if family == "adam":
        return nan
    if eps <= 0:
        return float("inf"), float("inf")
    if family == "lion":
        return 1.0 / eps, 1.0 / eps
    if family == "adamw":
        d = 1.0 - float(betas[1])
        disc = math.sqrt(4 * eps * eps + d * d)
        return 2.0 / ((2 * eps + d) + disc), (2.0 / ((2 * eps + d) - disc) if d > 0 else 1.0 / eps)
    if family == "sgd":
        beta = float(momentum)
        etap = eta * (1.0 if beta == 0.0 else 1.0 - float(dampening))
        g, w2 = (1 - beta) / (1 + beta), 8 * etap * lam / (1 + beta)
        if g * g <= w2:
            return 1.0 / g, 1.0 / g
        r = math.sqrt(g * g - w2)
        return 1.0 / (g + r), 1.0 / (g - r)
    raise ValueError(f"family must be 'adamw', 'adam', 'lion' or 'sgd', got {family!r}")


def _angle(eta: float, rho: float, N: torch.Tensor, A: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """(2.2) with expected moments: atan2(η sqrt(NU − A²), ρN − ηA)."""
    return torch.atan2(eta * torch.sqrt(torch.clamp(N * U - A * A, min=0.0)), rho * N - eta * A)


class EquilibriumRecursion:
    """Schedule-aware expected n and angular update of scale groups (§3.4), driven by no measured alignment.

    Args:
        family: "adamw", "lion", "sgd" or "adam" (coupled: ``unsupported`` is set and everything is NaN).
        M0: [G, 9] moments of the first tracked step.  AdamW/Lion: the (θ, p, u) streams, only n₀ = xx is
            read.  SGD: the ``sgdm`` streams (θ, g, v) of THEORY.md, n₀ = xx, ⟨θ,v⟩ = xz, |v|² = zz (exact start).
        sizes: [G] group sizes C (AdamW, Lion).
        mixed: optional bool [G]: groups whose members have different λ or lr; they give NaN (the closed
            forms need one λ per group, §0).

    Per step, ``advance(hp, M)`` with the step's :class:`AdaptiveHyper` (or StepHyper for SGD) and its moments:

    * AdamW, the pure prediction (a) with the β₂ lag: state (N, Q, K, W) per group (K: the kinetic EMA),
          W' = β₂W + (1−β₂)/N,  χ = (1/N)/(W'/bc₂),  K' = β₁²K + (1−β₁)²Cχ,
          N' = ρ²N − 2ηρβ₁Q/bc₁ + η²K'/bc₁²,  Q' = ρβ₁Q − ηK'/bc₁;
      and the |u|²-driven recursion (b) from the measured U = zz (``prediction_kinetic()``):
          N' = ρ²N − 2ηρβ₁Q/bc₁ + η²U,  Q' = ρβ₁Q − η bc₁U.
    * Lion (c): N' = ρ²N + 2ηρC(2/π)Σ_p a_p r₁^p R_p + η²C,  R_p' = β₂^p ρ R_p + η  (p = 1, 3, 5, 7).
    * SGD(M) (d): THEORY.md §4.2's full form (``step.step_forms``, any momentum, dampening, Nesterov,
      first step) with ⟨θ,g⟩ = 0, b = ⟨v,g⟩ := 0 and |g|² := Ĝ_k/N, Ĝ_k = yy·xx measured (scale-free).

    ``angle`` after ``advance`` is the expected angle of the step just consumed, (2.2) with the expected
    moments (at the fixed point: η_r of :func:`equilibrium_closed_form` up to O(cos²(θ,u)) ≈ 1 %).
    ``elapsed`` is Σ_k 1/τ_slow(η_k, λ_k), the time in units of the time constant.
    With an optimizer already running (AdamW: hp.step > 1; Lion: hp.step > 1, meaning its momentum is not
    empty) the recursion starts from the stationary memory of the first step's settings: an approximation
    that the first few time constants wash out.
    """

    def __init__(self, family: str, M0: torch.Tensor, sizes: Scalar = None, mixed: Optional[torch.Tensor] = None):
        if family not in ("adamw", "adam", "lion", "sgd"):
            raise ValueError(f"family must be 'adamw', 'adam', 'lion' or 'sgd', got {family!r}")
        M0 = check_moments(M0, "M0")
        self.family = family
        self.num_groups = G = M0.shape[0]
        self.unsupported = ("coupled Adam: the equilibrium is on Σθ²/D (§3.6), which the (θ, m', u) moments "
                            "do not carry") if family == "adam" else None
        if family in ("adamw", "lion"):
            if sizes is None:
                raise ValueError(f"EquilibriumRecursion: {family} needs sizes (C per group)")
            self._C = torch.as_tensor(sizes, dtype=torch.float64, device=M0.device).expand(G).clone()
        self._nan = None if mixed is None else mixed.to(device=M0.device, dtype=torch.bool)
        n0 = M0[:, COL["xx"]].clone()
        zero = torch.zeros_like(n0)
        self._s = {"N": n0}
        if family == "adamw":
            self._s.update(Q=zero, K=zero.clone(), W=zero.clone(), NU=n0.clone(), QU=zero.clone())
        elif family == "lion":
            self._s.update({f"R{p}": zero.clone() for p in _ASIN_TAYLOR})
        elif family == "sgd":
            self._s.update(Q=M0[:, COL["xz"]].clone(), V=M0[:, COL["zz"]].clone())
        self.angle = torch.full_like(n0, float("nan"))
        self.elapsed = 0.0
        self.steps = 0

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        if self.unsupported is not None:
            return torch.full_like(x, float("nan"))
        return x if self._nan is None else torch.where(self._nan, torch.full_like(x, float("nan")), x)

    def prediction(self) -> torch.Tensor:
        """[G] expected n = |θ_A|² at the current step (the pure prediction; AdamW: recursion (a))."""
        return self._masked(self._s["N"])

    def prediction_kinetic(self) -> torch.Tensor:
        """[G] AdamW only: the |u|²-driven expected n (recursion (b), semi-empirical); NaN otherwise."""
        return self._masked(self._s["NU"]) if self.family == "adamw" else torch.full_like(self._s["N"], float("nan"))

    def state_dict(self) -> dict:
        """Everything needed to resume: the family, the step count, the elapsed time and the state tensors."""
        return {"family": self.family, "steps": self.steps, "elapsed": self.elapsed, "angle": self.angle.clone(),
                **{k: v.clone() for k, v in self._s.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from :meth:`state_dict`; a wrong family or group count raises ValueError."""
        if sd.get("family") != self.family:
            raise ValueError(f"state_dict is for family {sd.get('family')!r}, this recursion is {self.family!r}")
        for k in list(self._s) + ["angle"]:
            if sd[k].shape != (self.num_groups,):
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(sd[k].shape)}, expected ({self.num_groups},)")
        device = self._s["N"].device
        for k in self._s:
            self._s[k] = sd[k].detach().to(device=device, dtype=torch.float64).clone()
        self.angle = sd["angle"].detach().to(device=device, dtype=torch.float64).clone()
        self.steps, self.elapsed = int(sd["steps"]), float(sd["elapsed"])

    def advance(self, hp, M: Optional[torch.Tensor] = None) -> None:
        """Consume step k's settings (and moments: required for SGD, optional for AdamW's (b))."""
        if self.family == "sgd":
            if not isinstance(hp, StepHyper):
                raise ValueError("EquilibriumRecursion('sgd').advance needs a StepHyper")
            lr, beta, damp, lam = hyper_floats(hp)
            taus = time_constants("sgd", lr, lam, momentum=beta, dampening=damp)
        else:
            if not isinstance(hp, AdaptiveHyper) or hp.family != self.family:
                raise ValueError(f"EquilibriumRecursion({self.family!r}).advance needs an AdaptiveHyper of that family")
            lr, lam = float(hp.lr), float(hp.weight_decay)
            taus = time_constants(self.family, lr, lam, betas=hp.betas)
        if M is not None:
            M = check_moments(M, "M", self.num_groups)
        if self.family == "adamw":
            self._adamw(hp, M)
        elif self.family == "lion":
            self._lion(hp)
        elif self.family == "sgd":
            if M is None:
                raise ValueError("EquilibriumRecursion('sgd').advance needs the step's sgdm moments (Ĝ = yy·xx)")
            self._sgd(hp, M)
        else:
            self.angle = torch.full_like(self._s["N"], float("nan"))
        self.angle = self._masked(self.angle)
        self.elapsed += 1.0 / taus[1] if taus[1] > 0 else float("nan")
        self.steps += 1

    def _adamw(self, hp: AdaptiveHyper, M) -> None:
        s, C = self._s, self._C
        b1, b2 = hp.betas
        eta, rho = float(hp.lr), hp.rho
        bc1, bc2 = hp.bias_corrections
        if self.steps == 0 and hp.step > 1:  # running optimizer: stationary memory of these settings
            t = hp.step - 1
            s["W"] = (1 - b2 ** t) / s["N"]
            s["K"] = (1 - b1) ** 2 * C * (1 - b1 ** (2 * t)) / (1 - b1 ** 2)
            s["Q"] = -eta * s["K"] / (bc1 * (1 - rho * b1))
            if M is not None:
                s["QU"] = -eta * bc1 * M[:, COL["zz"]] / (1 - rho * b1)
        N, Q = s["N"], s["Q"]
        W = b2 * s["W"] + (1 - b2) / N
        K = b1 * b1 * s["K"] + (1 - b1) ** 2 * C * ((1 / N) / (W / bc2))
        A, U = b1 * Q / bc1, K / (bc1 * bc1)
        self.angle = _angle(eta, rho, N, A, U)
        s["N"] = rho * rho * N - 2 * eta * rho * A + eta * eta * U
        s["Q"], s["K"], s["W"] = rho * b1 * Q - eta * K / bc1, K, W
        if M is not None:
            NU, QU, Um = s["NU"], s["QU"], M[:, COL["zz"]]
            s["NU"] = rho * rho * NU - 2 * eta * rho * b1 * QU / bc1 + eta * eta * Um
            s["QU"] = rho * b1 * QU - eta * bc1 * Um
        else:
            s["NU"] = torch.full_like(N, float("nan"))

    def _lion(self, hp: AdaptiveHyper) -> None:
        s, C = self._s, self._C
        b1, b2 = hp.betas
        eta, rho = float(hp.lr), hp.rho
        r1, _ = lion_correlation(b1, b2)
        if self.steps == 0 and hp.step > 1:
            for p in _ASIN_TAYLOR:
                s[f"R{p}"] = torch.full_like(s["N"], eta / (1 - b2 ** p * rho))
        N = s["N"]
        A = -C * (2 / math.pi) * sum(a * r1 ** p * s[f"R{p}"] for p, a in _ASIN_TAYLOR.items())
        self.angle = _angle(eta, rho, N, A, C)
        s["N"] = rho * rho * N - 2 * eta * rho * A + eta * eta * C
        for p in _ASIN_TAYLOR:
            s[f"R{p}"] = b2 ** p * rho * s[f"R{p}"] + eta

    def _sgd(self, hp: StepHyper, M: torch.Tensor) -> None:
        s = self._s
        N = s["N"]
        G_hat = M[:, COL["yy"]] * M[:, COL["xx"]]
        values = {"tt": N, "tg": 0.0, "tv": s["Q"], "gg": G_hat / N, "gv": 0.0, "vv": s["V"]}
        f = step_forms(hp)
        A, U = evaluate(f.theta_u, values, N), evaluate(f.u_sq, values, N)
        self.angle = _angle(float(hp.lr), 1.0, N, A, U)
        s["N"], s["Q"], s["V"] = (evaluate(form, values, N) for form in (f.n_next, f.q_next, f.m_next))


__all__ = ["lion_correlation", "equilibrium_closed_form", "time_constants", "EquilibriumRecursion"]
