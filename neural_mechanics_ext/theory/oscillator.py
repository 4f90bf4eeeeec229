"""Exact propagator of the damped oscillator ẍ + 2γẋ + ω²x = 0 over one time step (THEORY.md §3(c)).

The paper's momentum dynamics (§3(c)) are linear second-order ODEs.  Instead of the authors' separable
Green's-function buffers, which grow like e^{γτ} and overflow (THEORY D7), the state (x, ẋ) is carried
step by step with the exact transfer matrix

    Φ(t) = exp(t·[[0, 1], [−ω², −2γ]]) = e^{−γt} [[ch + γ·sh, sh], [−ω²·sh, ch − γ·sh]],
    ch = cosh(μt), sh = sinh(μt)/μ, μ² = γ² − ω².

For μ² < 0 (underdamped) ch = cos(νt), sh = sin(νt)/ν with ν² = −μ²; at μ = 0 (critical) ch = 1, sh = t.
Both are power series in μ²t², so one formula covers the three regimes and λ = 0 (ω = 0, μ = γ) and is
continuous (indeed analytic) across the critical point; no branch is chosen by an exact float
comparison (compare D11).  In the overdamped branch everything is written with e^{(μ−γ)t} ≤ 1 and
e^{−2μt} ≤ 1, so nothing overflows for γ ≥ 0, ω² ≥ 0: a run of any length stays finite.  Error: rounding
only (relative ~1e-15 per step, measured against ``torch.linalg.matrix_exp`` and RK4 in the tests).
"""
from __future__ import annotations

import math
from typing import Tuple


def _sinh_over(mu: float, t: float) -> float:
    """e^{−μt} sinh(μt)/μ = t·(1 − e^{−2μt})/(2μt), accurate for small μt, → t as μ → 0."""
    x = 2.0 * mu * t
    return t if x == 0.0 else t * (-math.expm1(-x) / x)


def _sin_over(nu: float, t: float) -> float:
    """sin(νt)/ν, → t as ν → 0."""
    y = nu * t
    return t if y == 0.0 else t * (math.sin(y) / y)


def oscillator_propagator(dt: float, gamma: float, omega2: float) -> Tuple[float, float, float, float]:
    """Φ(dt) = exp(dt·[[0, 1], [−ω², −2γ]]) as (Φ11, Φ12, Φ21, Φ22), all Python floats.

    (x, ẋ)(t + dt) = (Φ11 x + Φ12 ẋ, Φ21 x + Φ22 ẋ).  Φ11 is the homogeneous solution Hm(dt) and
    Φ12 the Green's function G(dt) of THEORY §3(c)'s table.
    """
    dt, gamma, omega2 = float(dt), float(gamma), float(omega2)
    disc = gamma * gamma - omega2  # μ²
    if disc > 0.0:  # overdamped (includes ω = 0)
        mu = math.sqrt(disc)
        slow = math.exp((mu - gamma) * dt)  # e^{(μ−γ)t} = e^{α₊ t}
        ch = slow * 0.5 * (1.0 + math.exp(-2.0 * mu * dt))  # e^{−γt} cosh(μt)
        sh = slow * _sinh_over(mu, dt)  # e^{−γt} sinh(μt)/μ
    else:  # underdamped, or critical when disc == 0 (ν = 0 gives ch = e^{−γt}, sh = t e^{−γt})
        nu = math.sqrt(-disc)
        decay = math.exp(-gamma * dt)
        ch = decay * math.cos(nu * dt)
        sh = decay * _sin_over(nu, dt)
    return ch + gamma * sh, sh, -omega2 * sh, ch - gamma * sh
