"""The seam between the tracker and an optimizer: one *theory* object per run, chosen from the optimizer's type.

The tracker itself knows nothing of any optimizer's update rule.  The theory object decides

* on the step path (no host sync): which tensors one moment pass reads (:meth:`~OptimizerTheory.stream`,
  the y and z of ``slice_moments``) and what of the step's settings is kept (:meth:`~OptimizerTheory.record`);
* on the host, per block and per batch of families (``integrate.Batch``): the step's settings and whether
  the theory's assumptions hold (:meth:`~OptimizerTheory.settings`), the integrators of its predictions
  (``integrate`` steps them through the block and stops them at the first failed assumption) and the
  columns derived from the moments alone (:meth:`~OptimizerTheory.derived`).

Implementations: ``torch.optim.SGD`` (:mod:`.sgd`, THEORY.md) and Adam/AdamW/Lion (:mod:`.adaptive`,
THEORY_ADAPTIVE.md).  Another optimizer gets a module beside them and a line in :func:`theory_for`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .adaptive import AdaptiveTheory, supported
from .hooks import Stream
from .sgd import SGDTheory


class OptimizerTheory(Protocol):
    """What the tracker asks of an optimizer's theory (:mod:`.sgd` is the reference implementation)."""

    reason: Optional[str]        # why the predictions are off for the whole run; None when they apply
    inputs: str                  # the streamed tensors, in words ("parameters, gradients or ...")
    columns: Dict[str, Tuple[str, ...]]  # the theory's own columns and the family kinds that keep each
    # Optional: ``reads_gradient = False`` when y is not the gradient (no constraint residual, no grad_sq);
    # ``summary(batch, arrays) -> dict``, extra entries of a family's ``summary()`` row.

    def stream(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Stream:
        """The tensors to read with ``params`` at this step (called in hooks: no host sync)."""

    def record(self, optimizer: torch.optim.Optimizer, stream: Stream) -> Dict[str, Any]:
        """The step's host-side record: at least ``{"groups": [{"lr": ...}, ...]}``, one dict per param
        group (the tracker's clock t = Σ lr reads it); Python numbers, read without a sync."""

    def settings(self, batch, record: Dict[str, Any], names: Sequence[str]) -> Tuple[Any, Optional[str]]:
        """The batch's settings at one step (passed to ``advance`` and ``derived``) and the assumption
        of the theory that failed at that step, or None; ``names`` are the plan's parameter names."""

    def integrators(self, batch, M0: torch.Tensor, rows0: Optional[torch.Tensor], settings: Any) -> Dict[str, Any]:
        """Fresh integrators of a batch (``integrate.Batch``), from its first step's moments [G, 9], its member
        slices' [R, 9] (None unless the batch has ``members``) and settings (None when resuming): objects with
        ``prediction()`` (the column named as the integrator) or ``columns()`` (several), optionally
        ``step_columns()`` (columns of the step just consumed, read after ``advance``), ``state_dict()``,
        ``load_state_dict()`` and optionally ``unsupported``."""

    def advance(self, integrators: Dict[str, Any], settings: Any, M: torch.Tensor,
                rows: Optional[torch.Tensor]) -> None:
        """Move the integrators past one step with its settings and moments [G, 9] (and [R, 9])."""

    def derived(self, batch, Mb: torch.Tensor, settings: List[Any], rows: Optional[torch.Tensor]
                ) -> Dict[str, torch.Tensor]:
        """Columns [T, G] computed from a block's moments [T, G, 9] (and [T, R, 9]) without state."""


def theory_for(optimizer: torch.optim.Optimizer) -> OptimizerTheory:
    """The theory of this optimizer.  One that no theory covers is tracked with SGD's stream and derived
    columns and no predictions; ``reason`` says why."""
    if type(optimizer) is torch.optim.SGD:
        return SGDTheory(SGDTheory.unsupported(optimizer))
    family, why_not = supported(optimizer)
    if family is not None:
        return AdaptiveTheory(optimizer)
    return SGDTheory(why_not or f"{type(optimizer).__name__} is outside the theory (covered: torch.optim.SGD, "
                     "Adam, AdamW and lion_pytorch.Lion); empirical values and residuals only")
