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
"""
from __future__ import annotations

import atexit
import functools
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..plan import MomentPlan
from ..schema import COL, PREDICTIONS
from ..symmetry.family import SymmetryFamily
from ..symmetry.residual import constraint_residual
from ..theory import ExactIntegrator, PaperIntegrator, StepHyper, angular_update, equilibrium_norm

# Columns of a block's group moments: the nine signed moments, then unsigned |θ_A|² and |g_A|² (the
# magnitudes of rescale groups and the norms of the residual, which the signed sums cannot give).
UNSIGNED_XX, UNSIGNED_YY = 9, 10


@dataclass
class _Batch:
    """Families integrated together: same kind class and same optimizer param groups."""
    kind: str                   # "translation" or "scale" (rescale shares the scale algebra)
    families: List[int]
    groups: torch.Tensor        # indices into the concatenated groups of the plan
    param_groups: Tuple[int, ...]
    params: List[int]           # plan tensor indices of the batch's parameters
    integrators: Dict[str, Any] = field(default_factory=dict)
    invalid: Optional[str] = None       # why predictions stopped, once they did
    invalid_step: Optional[int] = None


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
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"SymmetryTracker: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if log_every < 1 or flush_every < 1:
            raise ValueError("SymmetryTracker: log_every and flush_every must be positive")
        if hook not in ("optimizer", "backward"):
            raise ValueError(f"SymmetryTracker: hook must be 'optimizer' or 'backward', got {hook!r}")
        if ranks not in ("all", "rank0"):
            raise ValueError(f"SymmetryTracker: ranks must be 'all' or 'rank0', got {ranks!r}")
        if any(type(p).__name__ == "FlatParameter" for p in model.parameters()):
            raise ValueError("SymmetryTracker: FSDP1 (FullyShardedDataParallel) flattens parameters, which hides "
                             "their layout; use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP")
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        if families is None:
            if example_inputs is None:
                raise ValueError("SymmetryTracker: pass example_inputs (a batch the model accepts) so that "
                                 "the symmetries can be found, or pass families=[...]")
            from .symmetry import find_symmetries
            families = find_symmetries(model, example_inputs, loss=loss)
        families = list(families)
        if not families:
            raise ValueError("SymmetryTracker: the model has no symmetry to track (find_symmetries found none); "
                             "declare families by hand with nmx.SymmetryFamily if discovery cannot see them")
        self.model, self.optimizer = model, optimizer
        self.log_every, self.flush_every = int(log_every), int(flush_every)
        self.sinks = list(sinks) if rank == 0 else []
        if out_dir is not None and rank == 0:
            from .sinks import run_sinks
            self.sinks += run_sinks(out_dir)

        named = dict(model.named_parameters(remove_duplicate=False))
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.excluded: List[Tuple[SymmetryFamily, str]] = []
        kept = []
        for f in families:
            reason = self._exclusion_reason(f, named, group_of)
            if reason:
                self.excluded.append((f, reason))
            else:
                kept.append(f)
        for f, reason in self.excluded:
            warnings.warn(f"SymmetryTracker: not tracking {f.name}: {reason}", stacklevel=2)
        if not kept:
            raise ValueError("SymmetryTracker: no family can be tracked: "
                             + "; ".join(f"{f.name}: {r}" for f, r in self.excluded))
        self.families = kept
        self.plan = MomentPlan(kept, named)
        devices = {p.device for p in self.plan.params}
        if len(devices) != 1:
            raise ValueError(f"SymmetryTracker: tracked parameters are on several devices {sorted(map(str, devices))}")
        self.device = devices.pop()
        from .distributed import ShardedMoments, is_dtensor
        self._sharded = ShardedMoments(self.plan) if any(is_dtensor(p) for p in self.plan.params) else None
        if self._sharded is not None and (hook == "backward" or ranks == "rank0"):
            raise ValueError("SymmetryTracker: sharded (FSDP2) parameters need hook='optimizer' and ranks='all'")
        self._offsets = self.plan.offsets
        self._module_slots = [self._owner(model, n) for n in self.plan.names]
        self._param_group = [group_of[id(p)] for p in self.plan.params]
        self._group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        self.theory_supported, self.theory_reason = self._optimizer_support(optimizer)
        self._batches = self._make_batches()
        if not self.theory_supported:
            for b in self._batches:
                b.invalid = self.theory_reason

        self._ring = [torch.empty((self.flush_every, self.plan.num_slices, 9), dtype=torch.float64,
                                  device=self.device) for _ in range(2 if self.device.type == "cuda" else 1)]
        self._ring_index, self._fill = 0, 0
        self._block_hypers: List[dict] = []
        self._pending: Optional[Tuple[torch.Tensor, List[dict], Any]] = None
        self.step = 0               # optimizer steps seen
        self._processed = 0         # steps integrated on the host
        self._history = {f.name: _FamilyHistory(f) for f in kept}
        self._time = [0.0] * len(optimizer.param_groups)
        self._closed = False
        self.timing = {"hook_seconds": 0.0, "process_seconds": 0.0, "write_seconds": 0.0}
        self._family_of_group = torch.repeat_interleave(
            torch.arange(len(kept)), torch.tensor([f.num_groups for f in kept]))
        self.hook = hook
        self._handles = []
        if ranks == "rank0" and rank != 0:
            return  # this rank only trains; rank 0 tracks
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        if hook == "backward":
            self._setup_backward_mode(bucket_elems)
        atexit.register(_close_at_exit, weakref.ref(self))  # flush what is buffered if the script ends

    # ---- setup ------------------------------------------------------------------------------------
    @staticmethod
    def _exclusion_reason(f: SymmetryFamily, named: Dict[str, torch.nn.Parameter], group_of: Dict[int, int]):
        for name in f.param_names:
            p = named.get(name)
            if p is None:
                return f"the model has no parameter {name!r}"
            if not p.requires_grad:
                return f"parameter {name} is frozen (requires_grad=False)"
            if id(p) not in group_of:
                return f"parameter {name} is not in the optimizer"
        return None

    @staticmethod
    def _owner(model: torch.nn.Module, name: str):
        module_name, _, attr = name.rpartition(".")
        return model.get_submodule(module_name), attr

    @staticmethod
    def _optimizer_support(optimizer) -> Tuple[bool, Optional[str]]:
        if type(optimizer) is not torch.optim.SGD:
            return False, (f"{type(optimizer).__name__} is outside the theory (THEORY.md §4.5: adaptive "
                           "preconditioners break the closed forms); empirical values and residuals only")
        if any(g.get("maximize", False) for g in optimizer.param_groups):
            return False, "SGD with maximize=True is not covered; empirical values and residuals only"
        return True, None

    def _make_batches(self) -> List[_Batch]:
        by_key: Dict[tuple, _Batch] = {}
        tensor_index = {id(p): i for i, p in enumerate(self.plan.params)}
        named = dict(self.model.named_parameters(remove_duplicate=False))
        for fi, f in enumerate(self.families):
            kind = "translation" if f.kind == "translation" else "scale"
            params = sorted({tensor_index[id(named[n])] for n in f.param_names})
            pgroups = tuple(sorted({self._param_group[t] for t in params}))
            batch = by_key.setdefault((kind, pgroups), _Batch(kind, [], torch.empty(0, dtype=torch.long), pgroups, []))
            batch.families.append(fi)
            batch.params = sorted(set(batch.params) | set(params))
        for b in by_key.values():
            b.groups = torch.cat([torch.arange(self._offsets[fi], self._offsets[fi] + self.families[fi].num_groups)
                                  for fi in b.families])
        return list(by_key.values())

    # ---- the step path ------------------------------------------------------------------------------
    def _buffers(self, tensors: range) -> List[Optional[torch.Tensor]]:
        state = self.optimizer.state
        return [state[p].get("momentum_buffer") if p in state else None for p in self.plan.params[tensors.start:tensors.stop]]

    def _pre_step(self, optimizer, args, kwargs):
        start = time.perf_counter()
        self._check_unchanged()
        params = self.plan.params
        grads = [p.grad for p in params]
        buffers = self._buffers(range(len(params)))
        if self._sharded is not None:
            S = self._sharded(grads, buffers)
        elif self.hook == "backward":
            S = self._gather_buckets(grads)
        else:
            S = self.plan.slice_moments(grads, buffers)
        self._ring[self._ring_index][self._fill].copy_(S)  # the per-group sums wait for the flush
        self._block_hypers.append({
            "groups": [_read_hyper(g) for g in optimizer.param_groups],
            "no_grad": {i for i, g in enumerate(grads) if g is None},
            "no_buffer": {i for i, b in enumerate(buffers) if b is None},
        })
        self._fill += 1
        self.step += 1
        self.timing["hook_seconds"] += time.perf_counter() - start
        if self._fill == self.flush_every:
            self._flush()

    # ---- backward mode -------------------------------------------------------------------------------
    def _setup_backward_mode(self, bucket_elems: int):
        self._buckets: List[range] = []
        start, size = 0, 0
        for t, p in enumerate(self.plan.params):
            size += p.numel()
            if size >= bucket_elems or t == len(self.plan.params) - 1:
                self._buckets.append(range(start, t + 1))
                start, size = t + 1, 0
        self._bucket_of = {t: b for b, r in enumerate(self._buckets) for t in r}
        self._ready: set = set()
        self._launched: Dict[int, Tuple[torch.Tensor, list]] = {}
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._warned_accumulation = False
        for t, p in enumerate(self.plan.params):
            self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, t)))

    @staticmethod
    def _grad_stamp(grads):
        return [None if g is None else (id(g), g._version) for g in grads]

    def _on_grad(self, t: int, param: torch.Tensor):
        start = time.perf_counter()
        if t in self._ready and not self._warned_accumulation:  # a second backward before the step
            self._warned_accumulation = True
            warnings.warn("SymmetryTracker(hook='backward'): gradients are accumulated over several backward "
                          "passes; the moments are taken at the optimizer step instead", stacklevel=2)
        self._ready.add(t)
        b = self._bucket_of[t]
        r = self._buckets[b]
        if all(i in self._ready for i in r):
            grads = [p.grad for p in self.plan.params[r.start:r.stop]]
            if self._side is not None:
                self._side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._side):
                    out = self.plan.slice_moments(grads, self._buffers(r), tensors=r)
                for g in grads:
                    if g is not None:
                        g.record_stream(self._side)
            else:
                out = self.plan.slice_moments(grads, self._buffers(r), tensors=r)
            self._launched[b] = (out, self._grad_stamp(grads))
        self.timing["hook_seconds"] += time.perf_counter() - start

    def _gather_buckets(self, grads) -> torch.Tensor:
        """The moments of every bucket: launched during backward when still valid, else computed now."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        pieces = []
        for b, r in enumerate(self._buckets):
            launched = self._launched.get(b)
            now = grads[r.start:r.stop]
            if launched is None or self._warned_accumulation or launched[1] != self._grad_stamp(now):
                pieces.append(self.plan.slice_moments(now, self._buffers(r), tensors=r))
            else:
                pieces.append(launched[0])
        self._ready.clear()
        self._launched.clear()
        return torch.cat(pieces)

    def _check_unchanged(self):
        for (module, attr), p in zip(self._module_slots, self.plan.params):
            if module._parameters.get(attr) is not p:
                raise RuntimeError(f"SymmetryTracker: parameter {module.__class__.__name__}.{attr} was replaced "
                                   "after the tracker was built; build a new tracker for the changed model")
        groups = self.optimizer.param_groups
        if len(groups) != len(self._group_sizes) or any(len(g["params"]) != n for g, n in zip(groups, self._group_sizes)):
            raise RuntimeError("SymmetryTracker: the optimizer's param groups changed after the tracker was built; "
                               "build a new tracker for the changed optimizer")

    def _flush(self):
        """Hand the filled block to the host (asynchronously on CUDA) and process the previous one."""
        if self._fill == 0:
            return
        ring = self._ring[self._ring_index][: self._fill]
        if self.device.type == "cuda":
            host = torch.empty(ring.shape, dtype=ring.dtype, pin_memory=True)
            host.copy_(ring, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            block = (host, self._block_hypers, event)
            self._ring_index = 1 - self._ring_index  # the next steps fill the other buffer meanwhile
        else:
            block = (ring.clone(), self._block_hypers, None)
        self._fill, self._block_hypers = 0, []
        self._process_pending()
        self._pending = block

    def _process_pending(self):
        if self._pending is None:
            return
        host, hypers, event = self._pending
        if event is not None:
            event.synchronize()  # long done: it was enqueued a whole block ago
        # An interruption (Ctrl-C) while integrating must not lose the block: put the integrators and
        # clocks back as they were and keep the block pending, so that close() processes it.
        snapshot = self._snapshot()
        try:
            rows = self._integrate_block(host, hypers)
        except BaseException:
            self._restore(snapshot)
            raise
        self._pending = None
        self._commit(rows)

    def _snapshot(self):
        return ([({n: i.state_dict() for n, i in b.integrators.items()}, b.invalid, b.invalid_step)
                 for b in self._batches], list(self._time), self._processed)

    def _restore(self, snapshot):
        batches, self._time, self._processed = snapshot
        for b, (integrators, b.invalid, b.invalid_step) in zip(self._batches, batches):
            for name, sd in integrators.items():
                b.integrators[name].load_state_dict(sd)
            for name in list(b.integrators):
                if name not in integrators:  # created by the interrupted block
                    del b.integrators[name]

    def sync(self):
        """Bring everything recorded so far to the host (history, sinks); called by history() and close()."""
        self._flush()
        self._process_pending()

    # ---- host processing ----------------------------------------------------------------------------
    def _integrate_block(self, block: torch.Tensor, hypers: List[dict]) -> Dict[str, Any]:
        """Integrate the predictions over one block of steps; returns the block's columns for _commit."""
        start = time.perf_counter()
        T, G = len(hypers), self.plan.num_groups
        signed, unsigned = self.plan.group_moments(block[:T].reshape(-1, 9))
        M = torch.cat([signed.view(T, G, 9), unsigned.view(T, G, 9)[:, :, 3:5]], dim=2)
        preds = {name: torch.full((T, G), float("nan"), dtype=torch.float64) for name in PREDICTIONS}
        angular = torch.full((T, G), float("nan"), dtype=torch.float64)
        equilibrium = torch.full((T, G), float("nan"), dtype=torch.float64)
        lr = torch.zeros((T, G), dtype=torch.float64)
        elapsed = torch.zeros((T, G), dtype=torch.float64)
        for b in self._batches:
            # Everything that does not recurse is done for the whole block at once; only the
            # integrators step through it.
            Mb = M[:, b.groups, :9]
            finite = torch.isfinite(Mb).flatten(1).all(1).tolist()
            hps, times, clock = [], [], self._time[b.param_groups[0]]
            out = {name: [] for name in PREDICTIONS}
            for t, rec in enumerate(hypers):
                hp, problem = self._step_hyper(b, rec)
                if problem is None and not finite[t]:
                    problem = "non-finite parameters, gradients or momentum buffers"
                hps.append(hp)
                times.append(clock)
                clock += float(hp.lr)
                if not b.integrators:
                    b.integrators = {"exact": ExactIntegrator(b.kind, Mb[t]),
                                     "paper": PaperIntegrator(b.kind, Mb[t], "paper"),
                                     "modified": PaperIntegrator(b.kind, Mb[t], "modified")}
                # The prediction of step k rests on steps before k; a failed assumption at step k
                # ends the predictions from step k + 1 on.
                if b.invalid is None:
                    for name, integ in b.integrators.items():
                        if name == "exact" or not integ.unsupported:
                            out[name].append((t, integ.prediction()))
                    if problem:
                        b.invalid, b.invalid_step = problem, self._processed + t
                    else:
                        for integ in b.integrators.values():
                            integ.advance(hp, Mb[t])
            for name, rows in out.items():
                if rows:
                    steps_with = torch.tensor([t for t, _ in rows])
                    preds[name][steps_with[:, None], b.groups] = torch.stack([v for _, v in rows])
            if b.kind == "scale":
                angular[:, b.groups] = self._per_setting(angular_update, Mb, hps)
                equilibrium[:, b.groups] = self._per_setting(self._equilibrium, Mb, hps)
            lr[:, b.groups] = torch.tensor([float(hp.lr) for hp in hps], dtype=torch.float64)[:, None]
            elapsed[:, b.groups] = torch.tensor(times, dtype=torch.float64)[:, None]
        for rec in hypers:
            for i, h in enumerate(rec["groups"]):
                self._time[i] += float(h["lr"])
        steps = torch.arange(self._processed, self._processed + T)
        self._processed += T

        translation = self._translation_mask
        n = M[:, :, COL["xx"]]
        empirical = torch.where(translation, M[:, :, COL["x"]], n)
        magnitude = torch.where(translation, torch.maximum(M[:, :, COL["x"]].abs(), M[:, :, UNSIGNED_XX].sqrt()),
                                M[:, :, UNSIGNED_XX])
        # Gradient-constraint residuals (THEORY §1.1), the same number the proof of a family reports; the
        # typical gradient element ḡ of each step is taken over the tracked groups.
        counts = self.plan.counts.cpu()
        g_rms_sq = (M[:, :, UNSIGNED_YY].sum(1) / counts.sum())[:, None]
        residual = constraint_residual(translation, M[:, :, COL["y"]], M[:, :, COL["xy"]], M[:, :, UNSIGNED_XX],
                                       M[:, :, UNSIGNED_YY], counts, g_rms_sq)
        columns = {"empirical": empirical, "magnitude": magnitude, "residual": residual,
                   "grad_sq": M[:, :, COL["yy"]], "effective_lr": lr / n, "angular_update": angular,
                   "equilibrium": equilibrium,
                   "lr": lr, "t": elapsed, **preds}
        # Maxima over the block per family, for every family at once (scatter over the group -> family map).
        stats = {"magnitude": self._family_max(magnitude), "residual": self._family_max(residual)}
        for p in PREDICTIONS:
            stats[f"error_{p}"] = self._family_max((preds[p] - empirical).abs())
            stats[f"predicted_{p}"] = self._family_max(torch.isfinite(preds[p]).to(torch.float64))
        self.timing["process_seconds"] += time.perf_counter() - start
        return {"steps": steps, "columns": columns, "stats": stats}

    @staticmethod
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

    @staticmethod
    def _equilibrium(M: torch.Tensor, hp: StepHyper) -> torch.Tensor:
        """The equilibrium n* of THEORY §3(b)/§4.1 that the step's settings and its gradient drive toward,
        from the orbit invariant Ĝ = |g_A|²·|θ_A|² (NaN without weight decay or with Nesterov)."""
        if hp.weight_decay == 0 or hp.nesterov:
            return torch.full(M.shape[:1], float("nan"), dtype=torch.float64)
        return equilibrium_norm(hp.lr, hp.weight_decay, M[:, COL["yy"]] * M[:, COL["xx"]], hp.momentum,
                                hp.dampening)

    def _family_max(self, v: torch.Tensor) -> List[float]:
        """Max over steps and groups of each family, ignoring non-finite values (-inf when none)."""
        per_group = torch.where(torch.isfinite(v), v, float("-inf")).amax(0)
        out = torch.full((len(self.families),), float("-inf"), dtype=torch.float64)
        return out.scatter_reduce(0, self._family_of_group, per_group, "amax").tolist()

    def _commit(self, block: Dict[str, Any]):
        """Add an integrated block to the history and hand its logged rows to the sinks."""
        start = time.perf_counter()
        steps, columns, stats = block["steps"], block["columns"], block["stats"]
        logged = (steps % self.log_every) == 0
        # The logged rows of every group, converted once; families take views of their groups.
        cols = {name: v[logged].numpy() for name, v in columns.items()}
        starts = np.asarray(self._offsets)
        sums = {p: np.add.reduceat(cols[p], starts, axis=1) if len(cols[p]) else np.zeros((0, len(starts)))
                for p in ("empirical",) + PREDICTIONS}
        worst = np.maximum.reduceat(cols["residual"], starts, axis=1) if len(cols["residual"]) else sums["empirical"]
        new_rows = {}
        for fi, f in enumerate(self.families):
            sl = slice(self._offsets[fi], self._offsets[fi] + f.num_groups)
            rows = {"step": steps[logged].numpy(), "t": cols["t"][:, sl.start], "lr": cols["lr"][:, sl.start]}
            for name, v in cols.items():
                if name not in ("t", "lr") and (f.kind == "scale" or name not in _FamilyHistory.SCALE_ONLY):
                    rows[name] = v[:, sl]
            rows["residual"] = worst[:, fi]
            for p, v in sums.items():
                rows[f"{p}_sum"] = v[:, fi]
            new_rows[f.name] = rows
            self._history[f.name].add(len(steps), rows, {k: v[fi] for k, v in stats.items()})
        self.timing["process_seconds"] += time.perf_counter() - start
        start = time.perf_counter()
        for sink in self.sinks:
            sink.write(new_rows)
        self.timing["write_seconds"] += time.perf_counter() - start

    @property
    def _translation_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.plan.num_groups, dtype=torch.bool)
        for fi, f in enumerate(self.families):
            if f.kind == "translation":
                mask[self._offsets[fi]: self._offsets[fi] + f.num_groups] = True
        return mask

    def _step_hyper(self, b: _Batch, rec: dict) -> Tuple[StepHyper, Optional[str]]:
        """The batch's settings for one step, or the reason the theory does not apply to it."""
        hs = [rec["groups"][g] for g in b.param_groups]
        h = hs[0]
        missing_buffer = [t for t in b.params if t in rec["no_buffer"]]
        first = h["momentum"] != 0 and len(missing_buffer) == len(b.params)
        hp = StepHyper(h["lr"], h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], first)
        if any(x != h for x in hs[1:]):
            diff = sorted(k for k in h if any(x[k] != h[k] for x in hs[1:]))
            return hp, (f"parameters of one group have different optimizer settings ({', '.join(diff)}); "
                        "the closed forms need the same lr, momentum and weight decay on every member")
        no_grad = [self.plan.names[t] for t in b.params if t in rec["no_grad"]]
        if no_grad:
            return hp, f"{', '.join(no_grad)} had no gradient (the optimizer skipped it)"
        if h["momentum"] != 0 and 0 < len(missing_buffer) < len(b.params):
            return hp, "momentum buffers of one group were created at different steps"
        return hp, None

    # ---- results ------------------------------------------------------------------------------------
    def history(self) -> Dict[str, Dict[str, np.ndarray]]:
        """Per family: step, t (Σ lr), empirical [T, G], exact, paper, modified [T, G] (NaN where not
        applicable), magnitude [T, G], residual [T] (max over groups of the gradient-constraint residual),
        per-layer sums (``*_sum`` [T]) and, for scale families, grad_sq (|g_A|²), effective_lr (η/|θ_A|²),
        angular_update (radians per step) and equilibrium (the n* = |θ_A|² the current gradient and
        settings drive toward, THEORY §3(b)/§4.1) [T, G]."""
        self.sync()
        return {name: h.arrays() for name, h in self._history.items()}

    def summary(self) -> List[Dict[str, Any]]:
        """One row per family: kind, groups, max relative error of each prediction (DESIGN.md §3's
        metric: max |pred − emp| over steps and groups / max magnitude), the largest gradient-constraint
        residual, and the theory assumptions that failed (with the step from which)."""
        self.sync()
        rows = []
        batch_of = {fi: b for b in self._batches for fi in b.families}
        for fi, f in enumerate(self.families):
            h = self._history[f.name]
            b = batch_of[fi]
            failed = []
            if b.invalid and b.invalid_step is None:
                failed.append(b.invalid)
            elif b.invalid:
                failed.append(f"from step {b.invalid_step}: {b.invalid} (no predictions after it)")
            for name in ("paper", "modified"):
                reason = getattr(b.integrators.get(name), "unsupported", None)
                if reason:
                    failed.append(f"{name}: {reason}")
            if f.note:
                failed.append(f.note)
            rows.append({"family": f.name, "kind": f.kind, "groups": f.num_groups, "steps": h.steps,
                         **{f"error_{p}": h.max_error(p) for p in PREDICTIONS},
                         "residual": h.max_residual, "assumptions": failed})
        for f, reason in self.excluded:
            rows.append({"family": f.name, "kind": f.kind, "groups": f.num_groups, "steps": 0,
                         **{f"error_{p}": float("nan") for p in PREDICTIONS}, "residual": float("nan"),
                         "assumptions": [f"not tracked: {reason}"]})
        return rows

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
        return {
            "version": 1, "families": [f.name for f in self.families], "step": self.step,
            "processed": self._processed, "time": list(self._time),
            "batches": [{"integrators": {n: i.state_dict() for n, i in b.integrators.items()},
                         "invalid": b.invalid, "invalid_step": b.invalid_step} for b in self._batches],
            "history": {name: h.state_dict() for name, h in self._history.items()},
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a tracker that watched the same families."""
        if sd.get("families") != [f.name for f in self.families]:
            raise ValueError("SymmetryTracker.load_state_dict: the saved tracker watched other families: "
                             f"{sd.get('families')} vs {[f.name for f in self.families]}")
        if self.step != self._processed or self._fill or self._pending:
            raise RuntimeError("SymmetryTracker.load_state_dict: call it before the first optimizer step")
        self.step, self._processed, self._time = int(sd["step"]), int(sd["processed"]), list(sd["time"])
        for b, bsd in zip(self._batches, sd["batches"]):
            b.invalid, b.invalid_step = bsd["invalid"], bsd["invalid_step"]
            b.integrators = {}
            dummy = torch.zeros((len(b.groups), 9), dtype=torch.float64)
            for name, isd in bsd["integrators"].items():
                integ = ExactIntegrator(b.kind, dummy) if name == "exact" else PaperIntegrator(b.kind, dummy, name)
                integ.load_state_dict(isd)
                b.integrators[name] = integ
        for name, h in self._history.items():
            h.load_state_dict(sd["history"][name])

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


def _read_hyper(group: dict) -> dict:
    """The settings torch.optim.SGD uses, as Python numbers (tensor-valued lr is read at flush time)."""
    return {"lr": group.get("lr", 0.0), "momentum": group.get("momentum", 0.0),
            "dampening": group.get("dampening", 0.0), "weight_decay": group.get("weight_decay", 0.0),
            "nesterov": bool(group.get("nesterov", False))}


class _FamilyHistory:
    """The logged rows of one family, plus running maxima over every step (logged or not)."""

    SCALE_ONLY = ("effective_lr", "angular_update", "grad_sq", "equilibrium")

    def __init__(self, family: SymmetryFamily):
        self.family = family
        self.blocks: List[Dict[str, np.ndarray]] = []
        self.steps = 0
        self.max_abs_error = {p: 0.0 for p in PREDICTIONS}
        self.predicted = {p: False for p in PREDICTIONS}
        self.max_magnitude = 0.0
        self.max_residual = 0.0

    def add(self, steps: int, rows: Dict[str, np.ndarray], stats: Dict[str, float]) -> None:
        """Keep a block's logged rows; ``stats`` are the block's maxima over all its ``steps`` steps."""
        self.steps += steps
        self.max_magnitude = max(self.max_magnitude, stats["magnitude"])
        self.max_residual = max(self.max_residual, stats["residual"])
        for p in PREDICTIONS:
            if stats[f"predicted_{p}"] > 0:
                self.predicted[p] = True
                self.max_abs_error[p] = max(self.max_abs_error[p], stats[f"error_{p}"])
        self.blocks.append(rows)

    def state_dict(self) -> Dict[str, Any]:
        return {"arrays": self.arrays(), "steps": self.steps, "max_abs_error": dict(self.max_abs_error),
                "predicted": dict(self.predicted), "max_magnitude": self.max_magnitude,
                "max_residual": self.max_residual}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.blocks = [dict(sd["arrays"])] if sd["arrays"] else []
        self.steps = sd["steps"]
        self.max_abs_error, self.predicted = dict(sd["max_abs_error"]), dict(sd["predicted"])
        self.max_magnitude, self.max_residual = sd["max_magnitude"], sd["max_residual"]

    def arrays(self) -> Dict[str, np.ndarray]:
        if not self.blocks:
            return {}
        return {k: np.concatenate([b[k] for b in self.blocks]) for k in self.blocks[0]}

    def max_error(self, prediction: str) -> float:
        """DESIGN.md §3: max |pred − emp| over steps and groups over the max magnitude; NaN if never predicted."""
        if not self.predicted[prediction] or self.max_magnitude == 0:
            return float("nan")
        return self.max_abs_error[prediction] / self.max_magnitude
