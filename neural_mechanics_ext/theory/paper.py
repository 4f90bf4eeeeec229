"""The paper's continuous-time predictions (THEORY.md §3), evaluated step by step without overflow.

Time is cumulative, t_k = Σ_{j<k} dτ_j with dτ_j = η_j (plain SGD) or η'_j = η_j(1−δ_j) (momentum)
(THEORY D1); every coefficient is piecewise constant and uses the step's own η_k, β_k, δ_k, λ_k, so
schedules of any of them are covered.  With constant settings each variant equals the closed form
quoted below to rounding.

variant="paper" (the paper's equations, as the authors' code evaluates them):
  * SGD, scale/rescale: MF1, Eq. (19)/(20), integrand |g_A|² (the paper's equation; the code since Dec 2020
    uses |g_A + λθ_A|², D2) with the code's left-point Riemann sum: the impulse η_k·|g_k|²_A·dτ is added
    at t_k and then decays over the step,
        P_{k+1} = e^{−2λ_k η_k} (P_k + η_k² a_k),   a_k = |g_k|²_A (column yy),
    i.e. n(t_K) = e^{−2λt_K} n_0 + Σ_j η_j² e^{−2λ(t_K − t_j)} a_j, the code's `compute_theoretical`.
    Error vs exact SGD: ≲ 2ηλ + ηλ²t relative (D3; 1.5e-3 at η=0.1, λ=1e-2, 3000 steps); zero when λ=0.
  * SGD, translation: Eq. (18), s_{k+1} = e^{−λ_k η_k} s_k.  Error ≲ ηλ/(2e) relative (D3).
  * momentum (heavy ball), scale/rescale: the damped driven oscillator of §3(c),
        ẍ + 2γẋ + ω²x = f,   γ = (1−β)/(η'(1+β)),  ω² = 4λ/(η'(1+β)),  f = 2|v_{k+1}|²_A,
    with f·dτ (dτ = η') added to ẋ at t_k as an impulse (the code's Σ_j 2η' G(t−τ_j)|v_{j+1}|², τ_j = t_j),
    then the exact propagator over the step (``oscillator.py``).  |v_{k+1}|² = |βv_k + c_k(g_k+λθ_k)|²
    is expanded exactly from the step's empirical columns (no symmetry assumption).  Initial velocity
    ẋ_0 = −2⟨θ_A, v_0⟩_A/(1−δ_0) (D10; zero with an empty buffer).
    Error: several 1e-2 relative in THEORY's runs (e.g. 3.6e-2 underdamped, 0.17 with δ = 0.1: D4).
  * momentum, translation: the same oscillator with ω_T² = 2λ/(η'(1+β)), no driving term, and
    ṡ_0 = −Σ_A v_0/(1−δ_0).  Error ~1e-2 relative in THEORY's runs.
  * Nesterov: not covered by the paper (D6): ``unsupported`` is set and the prediction is NaN from then on.

variant="modified" (THEORY §3(b) MF2 and §7's recommendations):
  * SGD: MF2, rate κ_k = 2λ_k(1 + η_kλ_k/2), right-point weights: P_{k+1} = e^{−κ_k η_k} P_k + η_k² a_k,
    i.e. n(t_K) = e^{−κ t_K} n_0 + η² Σ_j e^{−κ(t_K − t_{j+1})} a_j.  Translation rate λ_k(1 + η_kλ_k/2).
    Error vs exact SGD ≲ (2/3)η²λ³t relative (one order beyond MF1; 3.2e-7 at η=0.1, λ=1e-2, 3000 steps).
  * momentum: as "paper" but with the dampening correction of D4, f = 2|v_{k+1}|²_A/(1−δ)²
    (δ = 0.1: 0.17 → 0.035 in THEORY's run).  Translation is the same as "paper".
  * Nesterov: unsupported, as above.

A step with momentum 0 after momentum steps (or the reverse) switches between the two forms; the
velocity is reset to zero at such a switch, as D10 prescribes for an empty buffer.  A step with
η' = 0 (lr 0, or dampening 1) takes no time and changes nothing.
"""
from __future__ import annotations

import math

import torch

from .oscillator import oscillator_propagator
from .step import (COL, StepHyper, check_kind, check_moments, empirical_forms, evaluate, hyper_floats, step_forms,
                   step_time)

VARIANTS = ("paper", "modified")


class PaperIntegrator:
    """Continuous-time prediction of n (scale), r (rescale) or s (translation); see the module docstring.

    Args:
        kind: "translation", "scale" or "rescale".
        M0: float64 moments [G, 9] at the first tracked step; x0 = xx (scale/rescale) or x (translation),
            and the initial velocity comes from xz (or z) at the first momentum step (D10).
        variant: "paper" or "modified".

    ``unsupported`` is None, or the reason why the formula does not cover the settings seen so far; then
    ``prediction()`` is NaN.  ``time`` is the elapsed continuous time t.
    """

    def __init__(self, kind: str, M0: torch.Tensor, variant: str = "paper"):
        self.kind = check_kind(kind)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        M0 = check_moments(M0, "M0")
        self.num_groups = M0.shape[0]
        translation = kind == "translation"
        self._x = M0[:, COL["x" if translation else "xx"]].clone()
        # The buffer term of ẋ_0 (D10): Σ_A v_0 (translation) or 2⟨θ_A, v_0⟩_A; divided by −(1−δ_0)
        # at the first step, when δ_0 is known.
        self._v0_term = M0[:, COL["z"]].clone() if translation else 2.0 * M0[:, COL["xz"]]
        self._xdot = torch.zeros_like(self._x)
        self._was_momentum = None  # None before the first step, then whether the last step had momentum
        self.time = 0.0
        self.steps = 0
        self.unsupported: str | None = None

    def prediction(self) -> torch.Tensor:
        """[G] predicted s / n / r at the current step (NaN when ``unsupported``); never modified in place."""
        if self.unsupported is not None:
            return torch.full_like(self._x, float("nan"))
        return self._x

    def advance(self, hp: StepHyper, M: torch.Tensor) -> None:
        """Consume step k's settings and moments (columns used: see the module docstring)."""
        self.steps += 1
        if self.unsupported is not None:
            return
        eta, beta, damp, lam = hyper_floats(hp)
        if beta != 0.0 and hp.nesterov:
            self.unsupported = ("Nesterov momentum: the paper's continuous-time theory (THEORY §3(c)) covers "
                                "heavy-ball momentum only (THEORY D6); use the exact integrator")
            return
        dtau = step_time(hp)
        if dtau == 0.0:
            return
        momentum = beta != 0.0
        if momentum and self._was_momentum is None:  # the run starts with momentum: ẋ_0 of D10
            self._xdot = (-1.0 / (1.0 - damp)) * self._v0_term
        elif momentum != self._was_momentum:  # switch between plain SGD and momentum
            self._xdot = torch.zeros_like(self._x)
        self._was_momentum = momentum
        if momentum:
            self._advance_oscillator(hp, M, dtau, beta, damp, lam)
        else:
            self._advance_sgd(hp, M, eta, lam)
        self.time += dtau

    def _advance_sgd(self, hp: StepHyper, M: torch.Tensor, eta: float, lam: float) -> None:
        """MF1 (Eq. 18–20, left point) or MF2 (right point) over one step of length η (THEORY §3(b))."""
        rate = lam * (1.0 + 0.5 * eta * lam) if self.variant == "modified" else lam
        if self.kind == "translation":
            self._x = math.exp(-rate * eta) * self._x
            return
        a = check_moments(M, "M", self.num_groups)[:, COL["yy"]]
        decay = math.exp(-2.0 * rate * eta)
        if self.variant == "modified":
            self._x = decay * self._x + (eta * eta) * a
        else:
            self._x = decay * (self._x + (eta * eta) * a)

    def _advance_oscillator(self, hp: StepHyper, M: torch.Tensor, dtau: float, beta: float, damp: float,
                            lam: float) -> None:
        """Impulse 2|v_{k+1}|²·dτ at t_k, then the exact propagator over dτ = η' (THEORY §3(c))."""
        gamma = (1.0 - beta) / (dtau * (1.0 + beta))
        if self.kind == "translation":
            omega2 = 2.0 * lam / (dtau * (1.0 + beta))
        else:
            omega2 = 4.0 * lam / (dtau * (1.0 + beta))
            M = check_moments(M, "M", self.num_groups)
            v_next_sq = evaluate(step_forms(hp).m_next, empirical_forms(M), self._x)  # no symmetry assumed
            kick = 2.0 * dtau
            if self.variant == "modified":
                kick /= (1.0 - damp) ** 2  # D4: |θ̇|² = |v|²/(1−δ)²
            self._xdot = self._xdot + kick * v_next_sq
        p11, p12, p21, p22 = oscillator_propagator(dtau, gamma, omega2)
        self._x, self._xdot = p11 * self._x + p12 * self._xdot, p21 * self._x + p22 * self._xdot

    def state_dict(self) -> dict:
        return {"kind": self.kind, "variant": self.variant, "x": self._x.clone(), "xdot": self._xdot.clone(),
                "v0_term": self._v0_term.clone(), "was_momentum": self._was_momentum, "time": self.time,
                "steps": self.steps, "unsupported": self.unsupported}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != self.kind or sd.get("variant") != self.variant:
            raise ValueError(f"state_dict is for ({sd.get('kind')!r}, {sd.get('variant')!r}), this integrator "
                             f"is ({self.kind!r}, {self.variant!r})")
        device = self._x.device
        for name in ("x", "xdot", "v0_term"):
            v = sd[name]
            if v.shape != (self.num_groups,):
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(v.shape)}, expected ({self.num_groups},)")
            setattr(self, "_" + name, v.detach().to(device=device, dtype=torch.float64).clone())
        self._was_momentum = sd["was_momentum"]
        self.time = float(sd["time"])
        self.steps = int(sd["steps"])
        self.unsupported = sd["unsupported"]
