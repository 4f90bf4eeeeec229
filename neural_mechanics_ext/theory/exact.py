"""Exact discrete-time dynamics of the symmetry groups under torch.optim.SGD (THEORY.md §4.1–4.4).

Open loop: the state starts from the moments of the first tracked step and is then advanced with the
optimizer's settings and two gradient statistics per group only,

    scale / rescale:  state (n, q, m) = (|θ|²_A, ⟨θ,v⟩_A, |v|²_A), drivers a_k = |g_k|²_A, b_k = ⟨v_k,g_k⟩_A
    translation:      state (s, p) = (Σ_A θ, Σ_A v), no driver at all

(for rescale every ⟨·,·⟩_A is the signed form B).  The recursions are the "full form" of §4.2 (heavy
ball, dampening, torch's first-step convention c_0 = 1) and of §4.3 (Nesterov); plain SGD (§4.1) is the
β = 0 case.  They use the symmetry ⟨θ_k, g_k⟩_A = 0 (Σ_A g_k = 0 for translation) in place of the
logged columns ``xy`` and ``y``, which are never read: that is what makes the comparison with the
empirical n, r, s a test of the theory.  Every hyper-parameter may change at every step.

Known error: none beyond rounding when the symmetry is exact (THEORY verifies 1e-13 in float64); with
an approximate symmetry (BN eps > 0, unequal weight decay in a group, Adam) the error is the size of
the violation, e.g. 8e-5 for BN eps = 1e-5 (THEORY D12).
"""
from __future__ import annotations

import torch

from .step import (COL, LinearForm, StepHyper, check_kind, check_moments, evaluate, hyper_floats, step_forms,
                   update_coefficients)


class ExactIntegrator:
    """Exact per-group prediction of n (scale), r (rescale) or s (translation) for torch.optim.SGD.

    Args:
        kind: "translation", "scale" or "rescale".
        M0: float64 moments [G, 9] of the first tracked step (columns ``MOMENTS``).  The initial state is
            n0 = xx, q0 = xz, m0 = zz (scale/rescale) or s0 = x, p0 = z (translation), so starting in
            the middle of a run with a non-empty momentum buffer is exact too.

    ``prediction()`` is the value at the current step; ``advance(hp, M)`` consumes step k's settings
    and moments and moves to step k+1.  State lives on M0's device; ``advance`` never syncs the host.
    """

    def __init__(self, kind: str, M0: torch.Tensor):
        self.kind = check_kind(kind)
        M0 = check_moments(M0, "M0")
        self.num_groups = M0.shape[0]
        self.steps = 0
        if kind == "translation":
            self._state = {"s": M0[:, COL["x"]].clone(), "p": M0[:, COL["z"]].clone()}
        else:
            self._state = {"n": M0[:, COL["xx"]].clone(), "q": M0[:, COL["xz"]].clone(),
                           "m": M0[:, COL["zz"]].clone()}

    def prediction(self) -> torch.Tensor:
        """[G] predicted s (translation), n (scale) or r (rescale) at the current step.

        A new tensor is made at every step and never modified in place; do not modify it either.
        """
        return self._state["s" if self.kind == "translation" else "n"]

    @property
    def state(self) -> dict:
        """The current state tensors: {"s", "p"} or {"n", "q", "m"} (read-only view)."""
        return dict(self._state)

    def advance(self, hp: StepHyper, M: torch.Tensor) -> None:
        """Consume step k's settings and moments; only columns ``yy`` and ``yz`` are read."""
        st = self._state
        if self.kind == "translation":
            # THEORY §4.2/§4.3 translation: Σ_A d = λ s because Σ_A g = 0; no moment is needed.
            eta, _, _, lam = hyper_floats(hp)
            B, C, P, Q = update_coefficients(hp)
            s_next = LinearForm(s=1.0 - eta * lam * P, p=-eta * Q)  # s − η Σ_A u
            p_next = LinearForm(p=B, s=C * lam)  # Σ_A v_{k+1}
            st["s"], st["p"] = evaluate(s_next, st, st["s"]), evaluate(p_next, st, st["s"])
        else:
            M = check_moments(M, "M", self.num_groups)
            # ⟨θ_k, g_k⟩_A = 0 by the symmetry: the literal 0.0, not the logged column "xy".
            values = {"tt": st["n"], "tg": 0.0, "tv": st["q"], "gg": M[:, COL["yy"]], "gv": M[:, COL["yz"]],
                      "vv": st["m"]}
            f = step_forms(hp)
            st["n"], st["q"], st["m"] = [evaluate(form, values, st["n"]) for form in (f.n_next, f.q_next, f.m_next)]
        self.steps += 1

    def state_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, **{k: v.clone() for k, v in self._state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != self.kind:
            raise ValueError(f"state_dict is for kind {sd.get('kind')!r}, this integrator is {self.kind!r}")
        device = next(iter(self._state.values())).device
        for k in self._state:
            v = sd[k]
            if v.shape != (self.num_groups,):
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(v.shape)}, expected ({self.num_groups},)")
            self._state[k] = v.detach().to(device=device, dtype=torch.float64).clone()
        self.steps = int(sd["steps"])
