"""SymmetryTracker: the public face of the package's parts (see the package docstring for the map)."""
from __future__ import annotations

import atexit
import time
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..distributed import ShardedMoments, is_dtensor
from ..plan import MomentPlan
from ..symmetry.family import SymmetryFamily
from . import state, validate
from .history import History
from .hooks import BackwardBuckets, moment_pass
from .integrate import BlockIntegrator
from .optimizers import theory_for
from .ring import DeviceRing


class SymmetryTracker:
    """Watches a training run through its symmetries; attach it and train as usual.

    Args:
        model: the model being trained.
        optimizer: its optimizer.  ``torch.optim.SGD`` (plain, momentum, dampening, Nesterov, weight
            decay, any schedule) gets exact and paper predictions; other optimizers get the empirical
            quantities and constraint residuals only, and ``summary()`` says why.
        example_inputs: a batch of inputs for ``find_symmetries`` (not needed with ``families``).
        families: the families to track (default: ``find_symmetries(model, example_inputs, loss)``).
        loss: the loss kind for discovery ("cross_entropy", "mse", "bce", None).
        log_every: keep every ``log_every``-th step in ``history()`` (the predictions still integrate
            every step; maxima in ``summary()`` cover every step).
        flush_every: steps per device-to-host block; bounds the device ring buffer.
        sinks: objects with ``write(rows)`` / ``close()`` (see ``neural_mechanics_ext.sinks``).
        out_dir: write the standard run-folder sinks there (metrics.csv, metrics.jsonl, groups/*.npz,
            TensorBoard when installed); ``sinks.read_run(out_dir)`` reads them back.
        hook: "optimizer" (default) reads everything in the optimizer's step pre-hook.  "backward" starts
            the moment work per bucket of about ``bucket_elems`` elements as soon as its gradients are
            accumulated (on a side stream on CUDA, overlapping the rest of the backward pass).  Before
            the step it checks that no gradient changed since (clipping, unscaling and accumulation
            modify them in place, which bumps their version counter) and redoes any bucket that did,
            so both modes record the same numbers.  Single-device runs only.
        ranks: under torch.distributed, "all" (default) tracks on every rank, "rank0" on rank 0 only
            (DDP: every rank holds the same parameters and all-reduced gradients, so the others can skip
            the work).  FSDP2-sharded parameters need "all": each rank reads its shard and one small
            all_reduce per step combines them.  Sinks write on rank 0 only.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, example_inputs=None, *,
                 families: Optional[Sequence[SymmetryFamily]] = None, loss: Optional[str] = "cross_entropy",
                 log_every: int = 1, flush_every: int = 50, sinks: Sequence[Any] = (),
                 out_dir: Optional[str] = None, hook: str = "optimizer", bucket_elems: int = 1 << 24,
                 ranks: str = "all"):
        validate.check_arguments(optimizer, log_every, flush_every, hook, ranks)
        validate.check_model(model)
        self.model, self.optimizer, self.hook = model, optimizer, hook
        self.log_every, self.flush_every = int(log_every), int(flush_every)
        self._select_families(families, example_inputs, loss)
        self._plan(hook, ranks)
        self._parts()
        rank = (torch.distributed.get_rank()
                if torch.distributed.is_available() and torch.distributed.is_initialized() else 0)
        self.sinks = list(sinks) if rank == 0 else []
        if out_dir is not None and rank == 0:
            from ..sinks import run_sinks
            self.sinks += run_sinks(out_dir)
        self._handles = []
        if ranks == "rank0" and rank != 0:
            return  # this rank only trains; rank 0 tracks
        self._install_hooks(bucket_elems)

    # ---- construction, in phases ------------------------------------------------------------------
    def _select_families(self, families, example_inputs, loss) -> None:
        """``families`` (or those found by discovery), less those that cannot be tracked (``excluded``)."""
        if families is None:
            if example_inputs is None:
                raise ValueError("SymmetryTracker: pass example_inputs (a batch the model accepts) so that "
                                 "the symmetries can be found, or pass families=[...]")
            from ..symmetry import find_symmetries
            families = find_symmetries(self.model, example_inputs, loss=loss)
        self._named = dict(self.model.named_parameters(remove_duplicate=False))
        self._group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        # The warnings point at the user's line: warn <- trackable <- _select_families <- __init__ <- user.
        self.families, self.excluded = validate.trackable(list(families), self._named, self._group_of,
                                                          stacklevel=4)

    def _plan(self, hook: str, ranks: str) -> None:
        """The one fused pass over the families' tensors, on their one device (sharded under FSDP2)."""
        self.plan = MomentPlan(self.families, self._named)
        self.device = validate.one_device(self.plan.params)
        self._sharded = ShardedMoments(self.plan) if any(is_dtensor(p) for p in self.plan.params) else None
        if self._sharded is not None:
            validate.check_sharded(hook, ranks)

    def _parts(self) -> None:
        """The optimizer's theory, the device ring, the host integration and the history."""
        self._theory = theory_for(self.optimizer)
        self.theory_supported, self.theory_reason = self._theory.reason is None, self._theory.reason
        self._guard = validate.Unchanged(self.model, self.plan.names, self.plan.params, self.optimizer)
        self._ring = DeviceRing(self.flush_every, self.plan.num_slices, self.device)
        self._blocks = BlockIntegrator(self.families, self.plan, self._theory,
                                       [self._group_of[id(p)] for p in self.plan.params],
                                       len(self.optimizer.param_groups), self._named)
        self._history = History(self.families, self.plan.offsets, self.log_every, self._theory.scale_columns)
        self.step = 0               # optimizer steps seen
        self._closed = False
        self.timing = {"hook_seconds": 0.0, "process_seconds": 0.0, "write_seconds": 0.0}

    def _install_hooks(self, bucket_elems: int) -> None:
        """The optimizer's step pre-hook (and, in backward mode, one gradient hook per tensor)."""
        self._backward = None
        if self.hook == "backward":
            params = self.plan.params
            self._backward = BackwardBuckets(
                self.plan, bucket_elems, lambda r: self._theory.stream(self.optimizer, params[r.start:r.stop]),
                self.timing)
        self._moments = moment_pass(self.plan, self._sharded, self._backward)
        self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
        if self._backward is not None:
            self._handles += self._backward.handles
        atexit.register(_close_at_exit, weakref.ref(self))  # flush what is buffered if the script ends

    @property
    def _buckets(self) -> List[range]:
        """The backward mode's buckets of plan tensors (tests check that a model was split)."""
        return self._backward.buckets

    # ---- the step path (no host sync) ----------------------------------------------------------------
    def _pre_step(self, optimizer, args, kwargs):
        start = time.perf_counter()
        self._guard.check()
        stream = self._theory.stream(optimizer, self.plan.params)
        full = self._ring.push(self._moments(stream), self._theory.record(optimizer, stream))
        self.step += 1
        self.timing["hook_seconds"] += time.perf_counter() - start
        if full:
            self._ring.flush(self._integrate_whole, self._commit)

    # ---- host processing -------------------------------------------------------------------------------
    def sync(self):
        """Bring everything recorded so far to the host (history, sinks); called by history() and close()."""
        self._ring.flush(self._integrate_whole, self._commit)
        self._ring.process_pending(self._integrate_whole, self._commit)

    def _integrate_whole(self, block: torch.Tensor, records: List[dict]) -> Dict[str, Any]:
        # An interruption (Ctrl-C) while integrating must not lose the block: put the integrators and
        # clocks back as they were, so that the block, still pending, is integrated again by close().
        saved = state.snapshot(self._blocks)
        try:
            return self._integrate_block(block, records)
        except BaseException:
            state.restore(self._blocks, saved)
            raise

    def _integrate_block(self, block: torch.Tensor, records: List[dict]) -> Dict[str, Any]:
        start = time.perf_counter()
        out = self._blocks.integrate(block, records)
        self.timing["process_seconds"] += time.perf_counter() - start
        return out

    def _commit(self, block: Dict[str, Any]):
        """Add an integrated block to the history and hand its logged rows to the sinks."""
        start = time.perf_counter()
        rows = self._history.add(block)
        self.timing["process_seconds"] += time.perf_counter() - start
        start = time.perf_counter()
        for sink in self.sinks:
            sink.write(rows)
        self.timing["write_seconds"] += time.perf_counter() - start

    # ---- results ------------------------------------------------------------------------------------
    def history(self) -> Dict[str, Dict[str, np.ndarray]]:
        """Per family: step, t (Σ lr), empirical [T, G], exact, paper, modified [T, G] (NaN where not
        applicable), magnitude [T, G], residual [T] (max over groups of the gradient-constraint residual),
        per-layer sums (``*_sum`` [T]) and, for scale families, grad_sq (|g_A|²), effective_lr (η/|θ_A|²),
        angular_update (radians per step) and equilibrium (the n* = |θ_A|² the current gradient and
        settings drive toward, THEORY §3(b)/§4.1) [T, G]."""
        self.sync()
        return self._history.arrays()

    def summary(self) -> List[Dict[str, Any]]:
        """One row per family: kind, groups, max relative error of each prediction (DESIGN.md §3's
        metric: max |pred − emp| over steps and groups / max magnitude), the largest gradient-constraint
        residual, and the theory assumptions that failed (with the step from which)."""
        self.sync()
        return self._history.summary(self._blocks.batches, self.excluded)

    def hessian_check(self, loss_fn, batch, **kw) -> List[Dict[str, Any]]:
        """Check the Hessian constraints (THEORY.md §1.1) of the tracked families on ``batch`` =
        ``(inputs, targets)`` with ``loss_fn(outputs, targets)``: one dict per family ("family", "kind",
        "max_residual", "median_residual", "passed", ...).  Delegates to
        :func:`neural_mechanics_ext.hessian.hessian_check` (keyword arguments pass through); the model,
        its gradients and buffers, the optimizer and the tracker's records are not touched."""
        from ..hessian import hessian_check
        return hessian_check(self.model, self.families, loss_fn, batch, **kw)

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: integrator states, clocks, history and running maxima.

        Store it in your checkpoint next to the model's and the optimizer's; a tracker built the same way
        and given ``load_state_dict`` continues with the same history as an uninterrupted run."""
        self.sync()
        return state.state_dict(self)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a tracker that watched the same families."""
        state.load_state_dict(self, sd)

    def close(self):
        """Process what is left, write it to the sinks, close them and remove the hook."""
        if self._closed:
            return
        self.sync()
        for handle in self._handles:
            handle.remove()
        for sink in self.sinks:
            sink.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close_at_exit(ref):
    tracker = ref()
    if tracker is not None and not tracker._closed:
        try:
            tracker.close()
        except Exception as exc:  # the interpreter is going down: report, do not raise
            warnings.warn(f"SymmetryTracker: could not flush at exit: {exc}")
