"""SymmetryTracker: per-group dynamics of a training run, with their exact and paper predictions, online.

Step path (every optimizer step, no host synchronisation):
    optimizer step pre-hook → one fused ``slice_moments`` pass over (θ, g, v) of every tracked tensor
    → its per-slice moments [slices, 9] → a row of a device ring buffer.
Every ``flush_every`` steps the block is copied to the host asynchronously; it is processed there (the
per-group sums, the float64 integrators of ``theory``, residuals, derived quantities) when the next
block arrives or when ``history()``/``summary()``/``close()`` ask.  Memory is O(slices × flush_every)
on the device and O(groups × logged steps) on the host; nothing parameter-sized is kept.

The hook sees the gradient the optimizer uses (after clipping, AMP unscaling, DDP all-reduce, gradient
accumulation), the momentum buffer before the update, and each param group's current settings, so
schedules need nothing special.

The parts, one job each, in the order a step's data flows through them:

* :mod:`.validate`   arguments, which families can be tracked, the model and optimizer left unchanged;
* :mod:`.hooks`      what a step reads (``Stream``) and the pass over it: in the optimizer's pre-hook,
                     per bucket during backward, or sharded (FSDP2);
* :mod:`.ring`       the device ring buffer and its asynchronous hand-off of blocks to the host;
* :mod:`.integrate`  a block → per-group moments → the theory's predictions per batch of families →
                     history columns and per-family maxima;
* :mod:`.history`    the logged rows per family, ``history()`` and ``summary()``;
* :mod:`.state`      the checkpoint (``state_dict``) and the snapshot that makes integration all-or-nothing;
* :mod:`.facade`     :class:`SymmetryTracker`, which builds the parts and wires them together.

The optimizer seam (:mod:`.optimizers`).  Everything that depends on the optimizer's update rule sits
behind one object chosen from the optimizer's type (:func:`.optimizers.theory_for`): which tensors the
step's pass reads as the y and z of ``slice_moments`` (SGD: gradient and momentum buffer), the
step's settings and assumptions, the integrators that produce the prediction columns and the columns
derived from the moments alone.  :class:`.sgd.SGDTheory` is its one implementation; an optimizer
with its own theory (Adam, AdamW, Lion: THEORY_ADAPTIVE.md) adds a module with the same methods and a
line in ``theory_for``, and a fused kernel mode that reads more tensors extends ``Stream`` and
``hooks.read_moments``.
"""
from .facade import SymmetryTracker

__all__ = ["SymmetryTracker"]
