"""torch.optim.SGD seen by the tracker: its stream, its settings per step, its integrators and derived columns.

One implementation of :class:`~neural_mechanics_ext.tracker.optimizers.OptimizerTheory`; the algebra
itself lives in :mod:`neural_mechanics_ext.theory` (THEORY.md §3, §4).  Every SGD form torch implements
(plain, momentum, dampening, Nesterov, weight decay, any schedule) gets the exact and the paper
predictions; the scale groups also get their angular update and equilibrium norm, and scale and
translation groups the alignment cos(θ_A, u_A) of the update direction u = P(g + λθ) + Qv and its
kinetic-symmetry-breaking part (THEORY_ADAPTIVE (2.5); 0 to rounding: SGD's preconditioner is one number).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..schema import COL
from ..theory import ExactIntegrator, PaperIntegrator, StepHyper, alignment_split, angular_update, equilibrium_norm
from ..theory.step import update_coefficients
from .hooks import Stream


class SGDTheory:
    """torch.optim.SGD: y = gradient, z = momentum buffer; integrators exact, paper, modified.

    Args:
        reason: why the predictions are off for the whole run (None: the theory applies).  The derived
            columns are still computed with SGD's formulas then.
    """

    inputs = "parameters, gradients or momentum buffers"       # what a non-finite step had
    # derived columns and the family kinds that keep them
    columns = {"angular_update": ("scale",), "equilibrium": ("scale",),
               "alignment": ("scale", "translation"), "ksb": ("scale", "translation")}

    def __init__(self, reason: Optional[str] = None):
        self.reason = reason

    @staticmethod
    def unsupported(optimizer: torch.optim.SGD) -> Optional[str]:
        """Why this SGD instance is outside the theory, or None."""
        if any(g.get("maximize", False) for g in optimizer.param_groups):
            return "SGD with maximize=True is not covered; empirical values and residuals only"
        return None

    # ---- the step path (no host sync) ---------------------------------------------------------------
    @staticmethod
    def stream(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Stream:
        """The gradient the optimizer will use and the momentum buffer before the update."""
        state = optimizer.state
        return Stream([p.grad for p in params],
                      [state[p].get("momentum_buffer") if p in state else None for p in params])

    @staticmethod
    def record(optimizer: torch.optim.Optimizer, stream: Stream) -> Dict[str, Any]:
        """The step's settings per param group and which tensors had no gradient or no buffer."""
        return {"groups": [_read_hyper(g) for g in optimizer.param_groups],
                "no_grad": {i for i, g in enumerate(stream.y) if g is None},
                "no_buffer": {i for i, b in enumerate(stream.z) if b is None}}

    # ---- block integration (host) -------------------------------------------------------------------
    @staticmethod
    def settings(batch, record: Dict[str, Any], names: Sequence[str]) -> Tuple[StepHyper, Optional[str]]:
        """The batch's settings for one step, or the reason the theory does not apply to it."""
        hs = [record["groups"][g] for g in batch.param_groups]
        h = hs[0]
        missing_buffer = [t for t in batch.params if t in record["no_buffer"]]
        first = h["momentum"] != 0 and len(missing_buffer) == len(batch.params)
        hp = StepHyper(h["lr"], h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], first)
        if any(x != h for x in hs[1:]):
            diff = sorted(k for k in h if any(x[k] != h[k] for x in hs[1:]))
            return hp, (f"parameters of one group have different optimizer settings ({', '.join(diff)}); "
                        "the closed forms need the same lr, momentum and weight decay on every member")
        no_grad = [names[t] for t in batch.params if t in record["no_grad"]]
        if no_grad:
            return hp, f"{', '.join(no_grad)} had no gradient (the optimizer skipped it)"
        if h["momentum"] != 0 and 0 < len(missing_buffer) < len(batch.params):
            return hp, "momentum buffers of one group were created at different steps"
        return hp, None

    @staticmethod
    def integrators(batch, M0: torch.Tensor, rows0=None, hp=None) -> Dict[str, Any]:
        """The predictions of THEORY §4 (exact) and §3 (paper, modified), started from step moments M0."""
        kind = batch.kind
        return {"exact": ExactIntegrator(kind, M0), "paper": PaperIntegrator(kind, M0, "paper"),
                "modified": PaperIntegrator(kind, M0, "modified")}

    @staticmethod
    def advance(integrators: Dict[str, Any], hp: StepHyper, M: torch.Tensor, rows=None) -> None:
        for integ in integrators.values():
            integ.advance(hp, M)

    def derived(self, batch, Mb: torch.Tensor, hps: List[StepHyper], rows=None) -> Dict[str, torch.Tensor]:
        """Angular update, equilibrium norm (scale groups), alignment and KSB [T, G] of a block (the
        alignment only where the theory applies: u is SGD's update direction)."""
        T, G = Mb.shape[:2]
        out = {}
        if self.reason is None:
            split = alignment_split(_per_setting(_update_moments, Mb, hps, width=9).reshape(-1, 9), batch.kind,
                                    sizes=batch.sizes.repeat(T))
            keep = ~batch.rescale  # signed rescale moments define no cosine
            out = {k: torch.where(keep, split[k].view(T, G), float("nan")) for k in ("alignment", "ksb")}
        if batch.kind == "scale":
            out["angular_update"] = _per_setting(angular_update, Mb, hps)
            out["equilibrium"] = _per_setting(_equilibrium, Mb, hps)
        return out


def _read_hyper(group: dict) -> dict:
    """The settings torch.optim.SGD uses, as Python numbers (tensor-valued lr is read at flush time)."""
    return {"lr": group.get("lr", 0.0), "momentum": group.get("momentum", 0.0),
            "dampening": group.get("dampening", 0.0), "weight_decay": group.get("weight_decay", 0.0),
            "nesterov": bool(group.get("nesterov", False))}


def _per_setting(fn, Mb: torch.Tensor, hps: List[StepHyper], width: int = 0) -> torch.Tensor:
    """fn(moments [n, 9], settings) -> [n] (or [n, width]) over a block [T, G, 9], one call per run of
    equal settings."""
    out, t = torch.empty(Mb.shape[:2] + ((width,) if width else ()), dtype=torch.float64), 0
    while t < len(hps):
        u = t + 1
        while u < len(hps) and hps[u] == hps[t]:
            u += 1
        out[t:u] = fn(Mb[t:u].reshape(-1, 9), hps[t]).view(out[t:u].shape)
        t = u
    return out


def _update_moments(M: torch.Tensor, hp: StepHyper) -> torch.Tensor:
    """The moments of (θ, u, u) from those of (θ, g, v), u = P(g + λθ) + Qv (the update direction of
    ``theory.update_direction``; p = u: SGD's preconditioner is one number, so its KSB vanishes)."""
    _, _, P, Q = update_coefficients(hp)
    lam = float(hp.weight_decay)
    c = {k: M[:, COL[k]] for k in COL}
    one_u = P * (c["y"] + lam * c["x"]) + Q * c["z"]
    theta_u = P * (c["xy"] + lam * c["xx"]) + Q * c["xz"]
    uu = (P * P * (c["yy"] + 2 * lam * c["xy"] + lam * lam * c["xx"]) + 2 * P * Q * (c["yz"] + lam * c["xz"])
          + Q * Q * c["zz"])
    return torch.stack([c["x"], one_u, one_u, c["xx"], uu, uu, theta_u, theta_u, uu], dim=1)


def _equilibrium(M: torch.Tensor, hp: StepHyper) -> torch.Tensor:
    """The equilibrium n* of THEORY §3(b)/§4.1 that the step's settings and its gradient drive toward,
    from the orbit invariant Ĝ = |g_A|²·|θ_A|² (NaN without weight decay or with Nesterov)."""
    if hp.weight_decay == 0 or hp.nesterov:
        return torch.full(M.shape[:1], float("nan"), dtype=torch.float64)
    return equilibrium_norm(hp.lr, hp.weight_decay, M[:, COL["yy"]] * M[:, COL["xx"]], hp.momentum,
                            hp.dampening)
