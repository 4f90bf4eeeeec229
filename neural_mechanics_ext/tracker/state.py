"""The tracker's state: the checkpoint (``state_dict`` / ``load_state_dict``) and the in-memory snapshot
that makes the integration of a block all-or-nothing.

What a resumed run needs: the integrators of every batch and where they stopped, the clocks, the step
counts and the history with its running maxima.  The device ring holds nothing then: a checkpoint is
taken after ``sync()`` and loaded before the first step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import torch

from .integrate import BlockIntegrator

if TYPE_CHECKING:  # the facade imports this module
    from .facade import SymmetryTracker

VERSION = 1


def state_dict(tracker: "SymmetryTracker") -> Dict[str, Any]:
    """Everything needed to resume (call after ``tracker.sync()``)."""
    blocks = tracker._blocks
    return {
        "version": VERSION, "families": [f.name for f in tracker.families], "step": tracker.step,
        "processed": blocks.processed, "time": list(blocks.clock),
        "batches": [{"integrators": {n: i.state_dict() for n, i in b.integrators.items()},
                     "invalid": b.invalid, "invalid_step": b.invalid_step} for b in blocks.batches],
        "history": tracker._history.state_dict(),
    }


def load_state_dict(tracker: "SymmetryTracker", sd: Dict[str, Any]) -> None:
    """Continue from ``state_dict()`` of a tracker that watched the same families."""
    if sd.get("families") != [f.name for f in tracker.families]:
        raise ValueError("SymmetryTracker.load_state_dict: the saved tracker watched other families: "
                         f"{sd.get('families')} vs {[f.name for f in tracker.families]}")
    blocks, ring = tracker._blocks, tracker._ring
    if tracker.step != blocks.processed or ring.fill or ring.pending:
        raise RuntimeError("SymmetryTracker.load_state_dict: call it before the first optimizer step")
    tracker.step, blocks.processed, blocks.clock = int(sd["step"]), int(sd["processed"]), list(sd["time"])
    for b, bsd in zip(blocks.batches, sd["batches"]):
        b.invalid, b.invalid_step = bsd["invalid"], bsd["invalid_step"]
        # The theory's integrators, built from placeholder moments and then given their saved state.
        fresh = blocks.theory.integrators(b.kind, torch.zeros((len(b.groups), 9), dtype=torch.float64))
        b.integrators = {name: fresh[name] for name in bsd["integrators"]}
        for name, isd in bsd["integrators"].items():
            b.integrators[name].load_state_dict(isd)
    tracker._history.load_state_dict(sd["history"])


def snapshot(blocks: BlockIntegrator):
    """The host state that integrating a block changes: integrators, validity, clocks, step count."""
    return ([({n: i.state_dict() for n, i in b.integrators.items()}, b.invalid, b.invalid_step)
             for b in blocks.batches], list(blocks.clock), blocks.processed)


def restore(blocks: BlockIntegrator, saved) -> None:
    """Put back what :func:`snapshot` saved, removing integrators created since."""
    batches, blocks.clock, blocks.processed = saved
    for b, (integrators, b.invalid, b.invalid_step) in zip(blocks.batches, batches):
        for name, sd in integrators.items():
            b.integrators[name].load_state_dict(sd)
        for name in list(b.integrators):
            if name not in integrators:  # created by the interrupted block
                del b.integrators[name]
