"""Practitioner quantities derived from the per-group moments (THEORY.md §3(b), §4.1, §4.2).

* ``effective_lr``: η/|θ_A|², the step size a scale-invariant group actually feels (|g_A|² ∝ 1/n).
* ``angular_update``: angle between θ_k and θ_{k+1} of a group, from one step's moments; exact for any
  torch SGD step (no symmetry assumption).  Meaningful for scale and translation groups, whose columns
  are plain sums; a rescale group's signed columns do not define an angle.
* ``equilibrium_norm``: the fixed point n* of §4.1 (SGD, exact) and of §4.2's full form (momentum, under
  one stated assumption, see its docstring).
* ``time_elapsed``: the continuous time t_k = Σ_{j<k} dτ_j of THEORY D1.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

from .step import StepHyper, check_moments, empirical_forms, evaluate, hyper_floats, step_forms, step_time

TensorLike = Union[float, torch.Tensor]


def effective_lr(lr: TensorLike, n: torch.Tensor) -> torch.Tensor:
    """η/|θ_A|² per scale group (n = column ``xx``): under scale invariance the angular step is ~ η|g̃|/n."""
    return lr / torch.as_tensor(n, dtype=torch.float64)


def angular_update(M: torch.Tensor, hp: StepHyper) -> torch.Tensor:
    """[G] angle (radians) between θ_k and θ_{k+1} = θ_k − η u_k, from step k's moments alone.

    u_k is torch's SGD update direction for the step (weight decay, momentum buffer, dampening, Nesterov,
    first step), expanded exactly with the columns xx, xy, xz, yy, yz, zz; ⟨θ_k, g_k⟩ is taken from the
    data, not assumed zero.  Computed as atan2(η·sqrt(|θ|²|u|² − ⟨θ,u⟩²), |θ|² − η⟨θ,u⟩) (Lagrange's
    identity), which stays accurate for tiny angles.  Zero-norm groups give 0.
    """
    M = check_moments(M)
    eta = hyper_floats(hp)[0]
    values = empirical_forms(M)
    f = step_forms(hp)
    tt = values["tt"]
    theta_u, u_sq = evaluate(f.theta_u, values, tt), evaluate(f.u_sq, values, tt)
    cross_sq = torch.clamp(tt * u_sq - theta_u * theta_u, min=0.0)
    return torch.atan2(eta * torch.sqrt(cross_sq), tt - eta * theta_u)


def equilibrium_norm(lr: TensorLike, weight_decay: TensorLike, G_hat: TensorLike, momentum: float = 0.0,
                     dampening: float = 0.0) -> torch.Tensor:
    """Predicted equilibrium n* = |θ_A|² of a scale group with orbit invariant Ĝ = |g_A|²·|θ_A|².

    SGD (THEORY §4.1, exact fixed point of n' = (1−ηλ)² n + η² Ĝ/n):
        n*² = η Ĝ / (λ (2 − ηλ))          (the paper's continuous n*² = ηĜ/(2λ) to first order in ηλ).
    Heavy-ball momentum β with dampening δ, c = 1−δ (THEORY §4.2, full form at a fixed point with
    a = Ĝ/n and b = ⟨v, g⟩_A = 0, i.e. assuming the gradient is uncorrelated with the buffer, as for
    gradient noise that dominates at equilibrium; b is not fixed by the symmetry, so this is the one
    assumption beyond stationarity):
        n*² = η c Ĝ (1+β) / (λ (1−β) (2(1+β) − ηcλ)),
    which reduces to the SGD value at β = 0.  Derivation: stationarity of n and q gives
    m = 2cλn/(η(1+β)) and q = −cλn/(1+β); inserting them in m's equation with b = 0 gives the above.
    Nesterov is not covered.  Returns a float64 tensor (broadcast of the arguments).
    """
    eta = torch.as_tensor(lr, dtype=torch.float64)
    lam = torch.as_tensor(weight_decay, dtype=torch.float64)
    G = torch.as_tensor(G_hat, dtype=torch.float64)
    beta = float(momentum)
    c = 1.0 if beta == 0.0 else 1.0 - float(dampening)
    n_sq = eta * c * G * (1.0 + beta) / (lam * (1.0 - beta) * (2.0 * (1.0 + beta) - eta * c * lam))
    return torch.sqrt(n_sq)


def time_elapsed(hps: Iterable[StepHyper]) -> torch.Tensor:
    """float64 [K+1]: t_0 = 0 and t_k = Σ_{j<k} dτ_j, dτ = η (SGD) or η(1−δ) (momentum) (THEORY D1, §3(c))."""
    t, out = 0.0, [0.0]
    for hp in hps:
        t += step_time(hp)
        out.append(t)
    return torch.tensor(out, dtype=torch.float64)


__all__ = ["effective_lr", "angular_update", "equilibrium_norm", "time_elapsed"]
