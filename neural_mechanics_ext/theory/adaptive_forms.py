"""The per-element update direction of Adam, AdamW, Lion and torch SGD at the step pre-hook
(THEORY_ADAPTIVE.md §0, §1).

Every optimizer covered here moves a parameter as

    θ_{k+1} = ρ_k θ_k − η_k u_k,     ρ_k = 1 − η_k λ_k  (decoupled decay: AdamW, Lion)
                                     ρ_k = 1            (coupled decay or none: Adam, SGD)

and u_k is a per-element function of (θ_k, g_k, the optimizer state before the step, the step's scalars).
:func:`update_direction` forms it, together with the pre-preconditioner direction p_k (the vector the
per-element map is applied to), exactly as the optimizer will:

    Adam / AdamW   g̃ = ±g (+ λθ if coupled);  m' = lerp(m, g̃, 1−β₁);  v' = β₂v + (1−β₂)g̃²
                   D = sqrt(v̂/bc₂) + ε, v̂ = v' (or max(v_max, v') with amsgrad);  u = (m'/D)/bc₁;  p = m'
    Lion           c = β₁m + (1−β₁)g;  u = sign(c);  p = c                 (lion-pytorch's update_fn)
    SGD / SGDM     u = P d + Q v with d = g + λθ (THEORY.md §4.2, ``step.update_coefficients``);  p = u

with bc₁ = 1 − β₁ᵗ, bc₂ = 1 − β₂ᵗ and t the step about to be taken (torch's ``state['step']`` + 1).
The moments of (θ, p, u) over the symmetry groups (``nmx.slice_moments(θs, views, ps, us)``, float64
sums) drive every identity of §2; this module is the plain-torch twin of the kernel's ``adam`` and
``lion`` stream modes.  For SGD p = u: the preconditioner is the identity, so the kinetic symmetry
breaking of §2.2 vanishes by construction.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import torch

from .step import StepHyper, update_coefficients

FAMILIES = ("adamw", "adam", "lion", "sgd")


class AdaptiveHyper(NamedTuple):
    """The scalars of ONE step of Adam, AdamW or Lion, for one parameter (read by :func:`step_hyper`).

    ``weight_decay`` is the effective λ: ρ = 1 − lr·λ for the decoupled families, the L2 coefficient for
    "adam".  ``step`` is t, the step about to be taken (1 on a fresh optimizer); a tracker keeps it on
    the host (THEORY_ADAPTIVE §1: reading a capturable/fused step tensor would synchronise).  Lion does
    not count steps: there only ``step == 1`` (empty momentum) matters, to the equilibrium recursions.
    """

    family: str
    lr: float
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step: int = 1
    amsgrad: bool = False
    maximize: bool = False

    @property
    def decoupled(self) -> bool:
        return self.family in ("adamw", "lion")

    @property
    def rho(self) -> float:
        """ρ = 1 − ηλ for decoupled decay, 1 otherwise."""
        return 1.0 - self.lr * self.weight_decay if self.decoupled else 1.0

    @property
    def bias_corrections(self) -> Tuple[float, float]:
        """(bc₁, bc₂) = (1 − β₁ᵗ, 1 − β₂ᵗ); (1, 1) for Lion, which has none."""
        if self.family == "lion":
            return 1.0, 1.0
        b1, b2 = self.betas
        return 1.0 - b1 ** self.step, 1.0 - b2 ** self.step


Hyper = Union[AdaptiveHyper, StepHyper]


def optimizer_family(optimizer: torch.optim.Optimizer, group: dict | None = None) -> str:
    """"adamw", "adam" (coupled L2), "lion" (lion-pytorch) or "sgd" for an optimizer (and one of its groups).

    torch's AdamW is an Adam whose groups have ``decoupled_weight_decay=True``; the flag is per group, so
    pass ``group`` when the groups may differ.  Raises ValueError for any other optimizer: its update has
    no per-element form here (use the realised update θ_{k+1} − ρθ_k instead).
    """
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam):
        group = optimizer.param_groups[0] if group is None else group
        return "adamw" if group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)) else "adam"
    cls = type(optimizer)
    if cls.__name__ == "Lion" and cls.__module__.startswith("lion_pytorch"):
        return "lion"
    raise ValueError(f"{cls.__module__}.{cls.__name__}: no per-element update direction is known for this optimizer "
                     f"(covered: torch.optim.Adam, AdamW, SGD and lion_pytorch.Lion)")


def state_step(state: dict) -> int:
    """Steps an Adam/AdamW parameter has taken (torch's ``state['step']``, a float or a tensor; 0 when empty).

    A tensor step (foreach, fused, capturable) on an accelerator is copied to the host: call this once,
    when tracking starts, and count on the host afterwards.
    """
    step = state.get("step", 0)
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def _scalar(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


def step_hyper(optimizer: torch.optim.Optimizer, group: dict, step: int | None = None,
               first_step: bool | None = None) -> Hyper:
    """The settings of the coming step of one param group: :class:`AdaptiveHyper` or, for SGD, a StepHyper.

    Args:
        optimizer: the optimizer that owns ``group``.
        group: one of ``optimizer.param_groups`` (lr, betas, eps, weight_decay, amsgrad, maximize).
        step: t of the coming step (Adam/AdamW; required there, see :class:`AdaptiveHyper`); for Lion the
            default is 1 (fresh momentum).
        first_step: SGD only: whether this step creates the momentum buffer (see StepHyper).

    A tensor lr or beta is read with ``.item()`` (a device sync for a capturable optimizer).  lion-pytorch's
    ``decoupled_weight_decay=True`` divides λ by the initial lr; that is folded into ``weight_decay``.
    """
    family = optimizer_family(optimizer, group)
    lr = _scalar(group["lr"], "lr")
    wd = _scalar(group.get("weight_decay", 0.0), "weight_decay")
    if family == "sgd":
        if group.get("maximize", False):
            raise ValueError("SGD with maximize=True is not covered by the SGD step forms")
        return StepHyper(lr, _scalar(group["momentum"], "momentum"), _scalar(group["dampening"], "dampening"), wd,
                         bool(group["nesterov"]), True if first_step is None else bool(first_step))
    betas = tuple(_scalar(b, "betas") for b in group["betas"])
    if family == "lion":
        if getattr(optimizer, "decoupled_wd", False):
            wd = wd / float(optimizer._init_lr)
        return AdaptiveHyper("lion", lr, wd, betas, 0.0, 1 if step is None else int(step))
    if step is None or int(step) < 1:
        raise ValueError(f"step_hyper: Adam needs the step about to be taken, t >= 1 (state_step(state) + 1), "
                         f"got {step!r}")
    if group.get("differentiable", False):
        raise ValueError("Adam(differentiable=True) is not covered")
    return AdaptiveHyper(family, lr, wd, betas, _scalar(group["eps"], "eps"), int(step), bool(group["amsgrad"]),
                         bool(group["maximize"]))


def update_direction(theta: torch.Tensor, grad: torch.Tensor, state: dict, hp: Hyper
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(p, u) per element for the coming step, so that θ_{k+1} = ρθ_k − lr·u (module docstring).

    Args:
        theta, grad: the parameter and its gradient before the step (real floating tensors, same shape).
        state: ``optimizer.state[param]`` before the step (read, never modified).  Empty: a fresh optimizer.
        hp: from :func:`step_hyper`.

    The arithmetic follows torch's single-tensor Adam and lion-pytorch operation by operation, so u matches
    the optimizer's own update to rounding (~1e-16 relative; foreach/fused/capturable differ in the last bit).
    """
    if not isinstance(theta, torch.Tensor) or not isinstance(grad, torch.Tensor) or theta.shape != grad.shape:
        raise ValueError("update_direction: theta and grad must be tensors of one shape")
    if theta.is_complex() or not theta.is_floating_point():
        raise ValueError(f"update_direction: real floating parameters only, got {theta.dtype}")
    if isinstance(hp, StepHyper):
        return _sgd_direction(theta, grad, state, hp)
    if not isinstance(hp, AdaptiveHyper) or hp.family not in FAMILIES:
        raise ValueError(f"update_direction: hp must be an AdaptiveHyper or StepHyper, got {hp!r}")
    b1, b2 = hp.betas
    if hp.family == "lion":
        m = state.get("exp_avg")
        c = (1.0 - b1) * grad if m is None else m.mul(b1).add(grad, alpha=1.0 - b1)
        return c, torch.sign(c)
    g = -grad if hp.maximize else grad
    if hp.family == "adam" and hp.weight_decay != 0.0:
        g = g.add(theta, alpha=hp.weight_decay)  # coupled L2, added after the sign flip as torch does
    m = state.get("exp_avg", torch.zeros_like(theta))
    v = state.get("exp_avg_sq", torch.zeros_like(theta))
    m1 = torch.lerp(m, g, 1.0 - b1)
    v1 = v.mul(b2).addcmul(g, g, value=1.0 - b2)
    if hp.amsgrad:
        v1 = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(theta)), v1)
    bc1, bc2 = hp.bias_corrections
    denom = (v1.sqrt() / bc2 ** 0.5).add_(hp.eps)
    return m1, m1.div(denom).div_(bc1)


def _sgd_direction(theta, grad, state, hp: StepHyper):
    buf = state.get("momentum_buffer")
    # torch creates the buffer (v' = d) exactly when there is none: the state decides, not hp.first_step.
    B, C, P, Q = update_coefficients(hp._replace(first_step=buf is None))
    d = grad.add(theta, alpha=float(hp.weight_decay))
    u = d.mul(P) if buf is None or Q == 0.0 else d.mul(P).add_(buf, alpha=Q)
    return u, u


__all__ = ["FAMILIES", "AdaptiveHyper", "optimizer_family", "state_step", "step_hyper", "update_direction"]
