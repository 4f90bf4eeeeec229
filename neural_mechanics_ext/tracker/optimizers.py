"""The seam between the tracker and an optimizer: one *theory* object per run, chosen from the optimizer's type.

The tracker itself knows nothing of any optimizer's update rule.  The theory object decides

* on the step path (no host sync): which tensors one moment pass reads (:meth:`~OptimizerTheory.stream`,
  the y and z of ``slice_moments``) and what of the step's settings is kept (:meth:`~OptimizerTheory.record`);
* on the host, per block and per batch of families (``integrate.Batch``): the step's settings and whether
  the theory's assumptions hold (:meth:`~OptimizerTheory.settings`), the integrators of its predictions
  (named as ``schema.PREDICTIONS``; ``integrate`` steps them through the block and stops them at the first
  failed assumption) and the columns derived from the moments alone (:meth:`~OptimizerTheory.derived`).

``torch.optim.SGD`` is the one implementation (:mod:`.sgd`).  Another optimizer gets a module beside it
and a line in :func:`theory_for`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .hooks import Stream
from .sgd import SGDTheory


class OptimizerTheory(Protocol):
    """What the tracker asks of an optimizer's theory (:mod:`.sgd` is the reference implementation)."""

    reason: Optional[str]        # why the predictions are off for the whole run; None when they apply
    inputs: str                  # the streamed tensors, in words ("parameters, gradients or ...")
    scale_columns: Tuple[str, ...]   # names of the derived columns, present for scale families only

    def stream(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Stream:
        """The tensors to read with ``params`` at this step (called in hooks: no host sync)."""

    def record(self, optimizer: torch.optim.Optimizer, stream: Stream) -> Dict[str, Any]:
        """The step's host-side record: at least ``{"groups": [{"lr": ...}, ...]}``, one dict per param
        group (the tracker's clock t = Σ lr reads it); Python numbers, read without a sync."""

    def settings(self, batch, record: Dict[str, Any], names: Sequence[str]) -> Tuple[Any, Optional[str]]:
        """The batch's settings at one step (passed to ``advance`` and ``derived``) and the assumption
        of the theory that failed at that step, or None; ``names`` are the plan's parameter names."""

    def integrators(self, kind: str, M0: torch.Tensor) -> Dict[str, Any]:
        """Fresh integrators of a batch of that kind, from its first step's moments [G, 9]: objects with
        ``prediction()``, ``state_dict()``, ``load_state_dict()`` and optionally ``unsupported``."""

    def advance(self, integrators: Dict[str, Any], settings: Any, M: torch.Tensor) -> None:
        """Move the integrators past one step with its settings and moments [G, 9]."""

    def derived(self, kind: str, Mb: torch.Tensor, settings: List[Any]) -> Dict[str, torch.Tensor]:
        """Columns [T, G] computed from a block's moments [T, G, 9] without state."""


def theory_for(optimizer: torch.optim.Optimizer) -> OptimizerTheory:
    """The theory of this optimizer.  One that no theory covers is tracked with SGD's stream and derived
    columns and no predictions; ``reason`` says why."""
    if type(optimizer) is torch.optim.SGD:
        return SGDTheory(SGDTheory.unsupported(optimizer))
    return SGDTheory(f"{type(optimizer).__name__} is outside the theory (THEORY.md §4.5: adaptive "
                     "preconditioners break the closed forms); empirical values and residuals only")
