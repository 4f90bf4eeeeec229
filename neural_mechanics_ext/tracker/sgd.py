"""torch.optim.SGD seen by the tracker: its stream, its settings per step, its integrators and derived columns.

One implementation of :class:`~neural_mechanics_ext.tracker.optimizers.OptimizerTheory`; the algebra
itself lives in :mod:`neural_mechanics_ext.theory` (THEORY.md §3, §4).  Every SGD form torch implements
(plain, momentum, dampening, Nesterov, weight decay, any schedule) gets the exact and the paper
predictions; the scale groups also get their angular update and equilibrium norm.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..schema import COL
from ..theory import ExactIntegrator, PaperIntegrator, StepHyper, angular_update, equilibrium_norm
from .hooks import Stream


class SGDTheory:
    """torch.optim.SGD: y = gradient, z = momentum buffer; integrators exact, paper, modified.

    Args:
        reason: why the predictions are off for the whole run (None: the theory applies).  The derived
            columns are still computed with SGD's formulas then.
    """

    inputs = "parameters, gradients or momentum buffers"       # what a non-finite step had
    scale_columns = ("angular_update", "equilibrium")            # derived columns, scale batches only

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
    def integrators(kind: str, M0: torch.Tensor) -> Dict[str, Any]:
        """The predictions of THEORY §4 (exact) and §3 (paper, modified), started from step moments M0."""
        return {"exact": ExactIntegrator(kind, M0), "paper": PaperIntegrator(kind, M0, "paper"),
                "modified": PaperIntegrator(kind, M0, "modified")}

    @staticmethod
    def advance(integrators: Dict[str, Any], hp: StepHyper, M: torch.Tensor) -> None:
        for integ in integrators.values():
            integ.advance(hp, M)

    @staticmethod
    def derived(kind: str, Mb: torch.Tensor, hps: List[StepHyper]) -> Dict[str, torch.Tensor]:
        """Angular update and equilibrium norm [T, G] of a block's scale groups (``scale_columns``)."""
        if kind != "scale":
            return {}
        return {"angular_update": _per_setting(angular_update, Mb, hps),
                "equilibrium": _per_setting(_equilibrium, Mb, hps)}


def _read_hyper(group: dict) -> dict:
    """The settings torch.optim.SGD uses, as Python numbers (tensor-valued lr is read at flush time)."""
    return {"lr": group.get("lr", 0.0), "momentum": group.get("momentum", 0.0),
            "dampening": group.get("dampening", 0.0), "weight_decay": group.get("weight_decay", 0.0),
            "nesterov": bool(group.get("nesterov", False))}


def _per_setting(fn, Mb: torch.Tensor, hps: List[StepHyper]) -> torch.Tensor:
    """fn(moments [n, 9], settings) -> [n] over a block [T, G, 9], one call per run of equal settings."""
    out, t = torch.empty(Mb.shape[:2], dtype=torch.float64), 0
    while t < len(hps):
        u = t + 1
        while u < len(hps) and hps[u] == hps[t]:
            u += 1
        out[t:u] = fn(Mb[t:u].reshape(-1, 9), hps[t]).view(u - t, -1)
        t = u
    return out


def _equilibrium(M: torch.Tensor, hp: StepHyper) -> torch.Tensor:
    """The equilibrium n* of THEORY §3(b)/§4.1 that the step's settings and its gradient drive toward,
    from the orbit invariant Ĝ = |g_A|²·|θ_A|² (NaN without weight decay or with Nesterov)."""
    if hp.weight_decay == 0 or hp.nesterov:
        return torch.full(M.shape[:1], float("nan"), dtype=torch.float64)
    return equilibrium_norm(hp.lr, hp.weight_decay, M[:, COL["yy"]] * M[:, COL["xx"]], hp.momentum,
                            hp.dampening)
