"""One torch.optim.SGD step written as per-group bilinear forms (THEORY.md §4.2, §4.3).

Every SGD variant that torch implements (plain, heavy ball, dampening, Nesterov, first step of the
buffer, a stale buffer left over while ``momentum == 0``) moves the parameters and the buffer by

    d_k     = g_k + λ θ_k                        (coupled weight decay)
    v_{k+1} = B v_k + C d_k                      (momentum buffer)
    u_k     = P d_k + Q v_k                      (update direction)
    θ_{k+1} = θ_k − η u_k

with four scalars (B, C, P, Q) read off the step's settings (:func:`update_coefficients`).  The
per-group quantities of the next step are then bilinear in the six inner products of (θ_k, g_k, v_k)
over the group (:func:`step_forms`).  This is the single place where that algebra lives: the exact
integrator calls it with ⟨θ, g⟩_A = 0 (the symmetry), the paper integrator and ``angular_update``
call it with the empirical columns and no symmetry assumption.

For rescale groups every inner product is the signed form B(x, y) = ⟨x,y⟩_A1 − ⟨x,y⟩_A2 (THEORY §0);
the algebra is the same because it only uses bilinearity.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..schema import COL, KINDS, MOMENTS



class StepHyper(NamedTuple):
    """The optimizer's settings for ONE step, as read from its param group.

    ``first_step`` is True when the momentum buffer is created by this step: torch then sets
    ``buf = d`` (no β·v term, c = 1).  With ``first_step=False`` and an all-zero buffer the step is the
    authors' ``custom_sgd`` convention v_1 = (1−δ) d_0 (THEORY D5).  Ignored when ``momentum == 0``.
    Values should be Python numbers, as torch param groups normally hold; a tensor is converted with
    ``float()``, which synchronises with its device.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    first_step: bool = True


class UpdateCoefficients(NamedTuple):
    """v_{k+1} = B v_k + C d_k and u_k = P d_k + Q v_k (module docstring)."""

    B: float
    C: float
    P: float
    Q: float


class LinearForm(dict):
    """A linear combination Σ coef·name of named per-group quantities, coefficients Python floats.

    The step algebra is done on these (plain Python, no tensors); :func:`evaluate` then applies a form
    to tensors with one fused multiply-add per nonzero term, which keeps the per-step kernel count low
    and never touches the device for the coefficients (no host sync, no H2D copy).
    """

    def __add__(self, other: "LinearForm") -> "LinearForm":
        out = LinearForm(self)
        for k, v in other.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def __rmul__(self, c: float) -> "LinearForm":
        return LinearForm({k: c * v for k, v in self.items()})

    def __sub__(self, other: "LinearForm") -> "LinearForm":
        return self + (-1.0) * other


def evaluate(form: LinearForm, values: dict, like: torch.Tensor) -> torch.Tensor:
    """Σ coef·values[name]; a value given as the float 0.0 is known to vanish and is skipped.

    ``like`` fixes shape, dtype and device when every term vanishes.  The result is always a new tensor,
    never an input or a view of one: an integrator's state must not alias the caller's moment buffer,
    which a tracker may reuse for the next step.
    """
    out = None
    for name, coef in form.items():
        x = values[name]
        if coef == 0.0 or (isinstance(x, float) and x == 0.0):
            continue
        if out is None:
            out = coef * x
        else:
            out = torch.add(out, x, alpha=coef)
    return torch.zeros_like(like) if out is None else out


class StepForms(NamedTuple):
    """Inner products over a group after one step, as linear forms in the six inner products before it
    (names tt = |θ|², tg = ⟨θ,g⟩, tv = ⟨θ,v⟩, gg = |g|², gv = ⟨g,v⟩, vv = |v|² at step k)."""

    n_next: LinearForm  # |θ_{k+1}|²_A
    q_next: LinearForm  # ⟨θ_{k+1}, v_{k+1}⟩_A
    m_next: LinearForm  # |v_{k+1}|²_A
    theta_u: LinearForm  # ⟨θ_k, u_k⟩_A
    u_sq: LinearForm  # |u_k|²_A


def hyper_floats(hp: StepHyper) -> tuple:
    """(lr, momentum, dampening, weight_decay) as Python floats."""
    return float(hp.lr), float(hp.momentum), float(hp.dampening), float(hp.weight_decay)


def update_coefficients(hp: StepHyper) -> UpdateCoefficients:
    """The (B, C, P, Q) of torch.optim.SGD for this step (THEORY §4.2, §4.3; torch's ``sgd`` source).

    * momentum 0: torch neither reads nor writes the buffer (a stale one stays as it is): B=1, C=0, u=d.
    * buffer created by this step: v_{k+1} = d_k (B=0, C=1).
    * otherwise: v_{k+1} = β v_k + (1−δ) d_k.
    * heavy ball: u = v_{k+1};  Nesterov: u = d + β v_{k+1}.
    """
    beta, damp = float(hp.momentum), float(hp.dampening)
    if beta == 0.0:
        return UpdateCoefficients(1.0, 0.0, 1.0, 0.0)
    if hp.first_step:
        B, C = 0.0, 1.0
    else:
        B, C = beta, 1.0 - damp
    if hp.nesterov:
        return UpdateCoefficients(B, C, 1.0 + beta * C, beta * B)
    return UpdateCoefficients(B, C, C, B)


def step_forms(hp: StepHyper) -> StepForms:
    """Inner products after one SGD step, as linear forms in those before it (no tensors involved).

    Exact for any vectors: no symmetry is assumed here; a caller that knows ⟨θ, g⟩_A = 0 passes the
    value 0.0 for "tg" to :func:`evaluate`.  Cached per distinct setting (the forms must not be mutated).
    """
    return _step_forms(StepHyper(*hyper_floats(hp), bool(hp.nesterov), bool(hp.first_step)))


@functools.lru_cache(maxsize=256)
def _step_forms(hp: StepHyper) -> StepForms:
    eta, _, _, lam = hyper_floats(hp)
    B, C, P, Q = update_coefficients(hp)
    tt, tg, tv, gg, gv, vv = (LinearForm({k: 1.0}) for k in ("tt", "tg", "tv", "gg", "gv", "vv"))
    td = tg + lam * tt  # ⟨θ, d⟩
    dd = gg + (2.0 * lam) * tg + (lam * lam) * tt  # |d|²
    dv = gv + lam * tv  # ⟨d, v⟩
    theta_u = P * td + Q * tv
    u_sq = (P * P) * dd + (2.0 * P * Q) * dv + (Q * Q) * vv
    theta_vn = B * tv + C * td  # ⟨θ_k, v_{k+1}⟩
    u_vn = (P * C) * dd + (P * B + Q * C) * dv + (Q * B) * vv  # ⟨u_k, v_{k+1}⟩
    m_next = (B * B) * vv + (2.0 * B * C) * dv + (C * C) * dd
    n_next = tt - (2.0 * eta) * theta_u + (eta * eta) * u_sq
    q_next = theta_vn - eta * u_vn
    return StepForms(n_next, q_next, m_next, theta_u, u_sq)


def empirical_forms(M: torch.Tensor) -> dict:
    """The six inner products of step k as logged in M's columns (for :func:`evaluate`)."""
    return {name: M[:, COL[col]] for name, col in
            (("tt", "xx"), ("tg", "xy"), ("tv", "xz"), ("gg", "yy"), ("gv", "yz"), ("vv", "zz"))}


def step_time(hp: StepHyper) -> float:
    """Continuous time elapsed in one step: η for plain SGD, η' = η(1−δ) with momentum (THEORY D1, §3(c))."""
    lr, beta, damp, _ = hyper_floats(hp)
    return lr if beta == 0.0 else lr * (1.0 - damp)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_moments(M: torch.Tensor, what: str = "M", groups: int | None = None) -> torch.Tensor:
    """Shape check (metadata only, no device sync) and cast to float64."""
    if not isinstance(M, torch.Tensor) or M.dim() != 2 or M.shape[1] != len(MOMENTS):
        shape = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
        raise ValueError(f"{what} must be a tensor [G, {len(MOMENTS)}] with columns {MOMENTS}, got {shape}")
    if groups is not None and M.shape[0] != groups:
        raise ValueError(f"{what} has {M.shape[0]} groups, the integrator was built with {groups}")
    return M.to(torch.float64)
