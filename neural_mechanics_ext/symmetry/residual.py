"""The gradient-constraint residual of a group (THEORY.md §1.1), from its moments; used by the proof of
a family (prove.py) and by the tracker at every step, so both report the same number.

    translation: |Σ_A g| / (‖g_A‖ · sqrt|A|)       scale / rescale: |⟨g, θ⟩_A (signed)| / (‖g_A‖ · ‖θ_A‖)

A group whose gradient is exactly zero has residual 0.  A group whose gradient is negligible
(‖g_A‖ < ḡ·sqrt|A|, ḡ the RMS gradient element) is measured against ḡ·sqrt|A| instead: the gradient of a
bias in front of BatchNorm, or of a one-element scale group, is zero in exact arithmetic but a rounding
residue in floating point, and a residue divided by itself would report a violation of 1.
"""
from __future__ import annotations

import torch


def constraint_residual(translation: torch.Tensor, g_sum: torch.Tensor, g_dot_theta: torch.Tensor,
                        theta_sq: torch.Tensor, g_sq: torch.Tensor, counts: torch.Tensor,
                        g_rms_sq) -> torch.Tensor:
    """Per-group residual; every argument broadcasts over leading dims ([..., G]).

    ``translation`` marks translation groups; ``g_sum`` = Σ_A g, ``g_dot_theta`` = ⟨g, θ⟩_A (signed for
    rescale), ``theta_sq`` and ``g_sq`` the unsigned squared norms over the group, ``counts`` = |A|,
    ``g_rms_sq`` = ḡ² (a number or a tensor broadcasting against the rest).
    """
    g_norm = torch.sqrt(torch.maximum(g_sq, g_rms_sq * counts))
    num = torch.where(translation, g_sum, g_dot_theta).abs()
    den = g_norm * torch.where(translation, torch.sqrt(counts), torch.sqrt(theta_sq))
    return torch.where(num == 0, torch.zeros_like(num), num / den)


def family_residuals(families, plan, signed: torch.Tensor, unsigned: torch.Tensor, counts: torch.Tensor,
                     g_rms_sq, cols):
    """Per-group residuals of every family of a :class:`~neural_mechanics_ext.plan.MomentPlan`, one CPU
    tensor ``[K]`` per family, from its group moments (``signed``/``unsigned``, ``[G, 9]``).

    ``cols = (sum, square, dot)`` names the moment columns that hold Σ g, Σ g² and ⟨g, θ⟩ (the ``y``
    columns for the gradient of the model's pass, the ``z`` columns for a second gradient).
    """
    c_sum, c_sq, c_dot = cols
    out = []
    for fam, s, u, n in zip(families, plan.split(signed), plan.split(unsigned), plan.split(counts)):
        translation = torch.full_like(n, fam.kind == "translation", dtype=torch.bool)
        res = constraint_residual(translation, s[:, c_sum], s[:, c_dot], u[:, 3], u[:, c_sq], n, g_rms_sq)
        out.append(res.cpu())
    return out
