"""Per-group integrators: from per-step group moments to predicted dynamics (THEORY.md §3, §4).

Inputs are the per-group moments ``M`` [G, 9] (columns ``MOMENTS``) of every step plus the optimizer's
settings for that step (:class:`StepHyper`).

* :class:`ExactIntegrator`: the exact discrete recursions of §4.1–4.3 (torch.optim.SGD in all its
  forms, any schedule); error = rounding when the symmetry is exact.
* :class:`PaperIntegrator`: the paper's continuous-time formulas of §3 (MF1 / oscillator, variant
  "paper") or their corrected forms (MF2 / D4, variant "modified"); errors 1e-7 to a few 1e-2.
* :func:`oscillator_propagator`: the overflow-free transfer matrix of §3(c)'s damped oscillator.
* :func:`effective_lr`, :func:`angular_update`, :func:`equilibrium_norm`, :func:`time_elapsed`,
  :func:`step_time`: derived practitioner quantities.

Adam, AdamW, Lion (and SGD(M) through the same streams) — THEORY_ADAPTIVE.md:

* :func:`update_direction` (with :func:`optimizer_family`, :func:`step_hyper`, :func:`state_step`,
  :class:`AdaptiveHyper`): the per-element (p, u) of θ_{k+1} = ρθ_k − ηu_k, the streams of the kernel's
  ``adam`` / ``lion`` modes.
* :class:`AdaptiveExactIntegrator`, :func:`adaptive_angle`, :func:`alignment_split`, :func:`group_setting`,
  :class:`TranslationSetPoint`: the exact identities of §2 and the translation set point of §5.1.
* :func:`equilibrium_closed_form`, :func:`time_constants`, :class:`EquilibriumRecursion`: the rotational
  equilibrium predictions of §3.

Everything is float64, vectorised over groups and free of host synchronisation inside ``advance``.
"""
from .adaptive import AdaptiveExactIntegrator, TranslationSetPoint, adaptive_angle, alignment_split, group_setting
from .adaptive_forms import FAMILIES, AdaptiveHyper, optimizer_family, state_step, step_hyper, update_direction
from .derived import angular_update, effective_lr, equilibrium_norm, time_elapsed
from .equilibrium import EquilibriumRecursion, equilibrium_closed_form, lion_correlation, time_constants
from .exact import ExactIntegrator
from .oscillator import oscillator_propagator
from .paper import VARIANTS, PaperIntegrator
from .step import KINDS, StepHyper, step_time

__all__ = ["KINDS", "VARIANTS", "StepHyper", "ExactIntegrator", "PaperIntegrator", "oscillator_propagator",
           "effective_lr", "angular_update", "equilibrium_norm", "time_elapsed", "step_time",
           "FAMILIES", "AdaptiveHyper", "optimizer_family", "state_step", "step_hyper", "update_direction",
           "AdaptiveExactIntegrator", "adaptive_angle", "alignment_split", "group_setting", "TranslationSetPoint",
           "EquilibriumRecursion", "equilibrium_closed_form", "lion_correlation", "time_constants"]
