"""What the framework callbacks share, with no framework imported: the torch optimizer and model under the
frameworks' wrappers, the setups the tracker cannot read, discovery with the model's own loss, and
``TrackedRun`` (the tracker, its run folder, the scalars for the framework's loggers, the state saved with
a checkpoint)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .. import SymmetryFamily, SymmetryTracker, find_symmetries
from ..runfolder import RunLog, read_train_log, write_config, write_families, write_json
from ..sinks import run_sinks
from ..summary import add_magnitudes

STATE_FILE = "symmetry_tracker.pt"   # beside a Trainer checkpoint
# Per-family scalars handed to the framework's loggers (each only where finite: AdamW has no predictions).
DEFAULT_FIELDS = ("empirical", "exact", "paper", "error_exact", "error_paper", "residual", "effective_lr",
                  "angular_update")
FIELDS = DEFAULT_FIELDS + ("modified", "error_modified", "magnitude")
# The files of a run folder that a new run replaces (the history would otherwise mix two runs).
RUN_FILES = ("config.json", "environment.json", "families.txt", "families.json", "metrics.csv",
             "metrics.jsonl", "train_log.csv", "summary.json", "report.html")

DEEPSPEED = ("DeepSpeed flattens and partitions the parameters (ZeRO) and steps its own optimizer, so the "
             "per-parameter layout the symmetry groups are defined on is not visible; train with DDP, or shard "
             "with FSDP2 (Accelerate: fsdp_version=2; Lightning: ModelParallelStrategy) and pass families= found "
             "with nmx.find_symmetries on the unsharded model")
FSDP1 = ("FSDP1 (FullyShardedDataParallel) flattens the parameters, which hides their layout; use FSDP2 "
         "(Accelerate: fsdp_version=2; Lightning: ModelParallelStrategy / fully_shard) with families= found "
         "on the unsharded model, or DDP")


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch.optim optimizer under the frameworks' wrappers (Accelerate's AcceleratedOptimizer keeps it in
    ``.optimizer``, Lightning's LightningOptimizer in ``._optimizer``): its step hook fires once per real
    optimizer step and never for a step that a GradScaler skipped."""
    opt = optimizer
    while True:
        if _from_package(opt, "deepspeed"):
            raise ValueError(f"SymmetryCallback: {DEEPSPEED}")
        inner = getattr(opt, "_optimizer", None) or getattr(opt, "optimizer", None)
        if not _from_package(opt, "accelerate", "lightning", "pytorch_lightning") or inner is None:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"SymmetryCallback: the trainer's optimizer is a {type(opt).__name__}, not a "
                        "torch.optim.Optimizer; the tracker reads the step of a torch optimizer")
    return opt


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``): the parameter names
    that families use are its own."""
    while True:
        if _from_package(model, "deepspeed"):
            raise ValueError(f"SymmetryCallback: {DEEPSPEED}")
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            break
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(f"SymmetryCallback: {FSDP1}")
    return model


def refuse_unsupported(optimizer: torch.optim.Optimizer, scaler_active: bool) -> None:
    """Setups the tracker would silently get wrong, refused with what to do instead."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("SymmetryCallback: LBFGS evaluates its closure several times per step; use a "
                         "first-order optimizer")
    if scaler_active and getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError("SymmetryCallback: fp16 with a fused optimizer: GradScaler calls the fused step even on an "
                         "overflow (the kernel skips it), so skipped steps cannot be told apart; use bf16, or an "
                         "unfused optimizer (transformers: optim='adamw_torch'; torch: AdamW(fused=False))")


def sharded(model: torch.nn.Module) -> bool:
    """FSDP2 (DTensor) parameters: discovery needs the unsharded model, so families= must be given."""
    return any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"
               for p in model.parameters())


def model_loss(outputs) -> torch.Tensor:
    """The loss a model returns itself: ``outputs.loss`` / ``outputs["loss"]`` (transformers computes it from
    ``labels``), or a scalar tensor (a LightningModule's ``training_step``)."""
    loss = None
    if isinstance(outputs, torch.Tensor):
        loss = outputs
    elif isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif hasattr(outputs, "loss"):
        loss = outputs.loss
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("SymmetryCallback: the model returned no loss on the first training batch (a "
                         "transformers model computes outputs.loss only when the batch has labels), so the "
                         "families cannot be found with its own loss; find them with nmx.find_symmetries and "
                         "pass families=")
    return loss.reshape(())


def discover(model: torch.nn.Module, example_inputs, samples: int = 8, prefix: str = "") -> List[SymmetryFamily]:
    """The families of ``model`` proved on the first ``samples`` samples of a training batch (a few suffice,
    and the proof runs in float64) with the loss the model computes itself.

    ``prefix`` is removed from the parameter names (an adapter module that holds the real one)."""
    if sharded(model):
        raise ValueError("SymmetryCallback: the parameters are sharded (FSDP2), and discovery needs the whole "
                         "model: call nmx.find_symmetries on the model before sharding and pass families=")
    families = find_symmetries(model, first_samples(example_inputs, samples),
                               loss=lambda outputs, _: model_loss(outputs), targets=())
    if not prefix:
        return families

    def strip(text):
        return None if text is None else re.sub(rf"(?<![\w.]){re.escape(prefix)}", "", text)

    return [dataclasses.replace(f, name=strip(f.name), layer=strip(f.layer), note=strip(f.note),
                                members=[(n[len(prefix):] if n.startswith(prefix) else n, v, s)
                                         for n, v, s in f.members]) for f in families]


def first_samples(batch, n: int):
    """``batch`` (tensors in dicts, lists and tuples) cut to its first ``n`` samples along the leading
    dimension shared by its tensors; other values (a 0-d token count, strings) are kept as they are."""
    sizes = []

    def visit(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            sizes.append(x.shape[0])
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(batch)
    if not sizes or n >= sizes[0]:
        return batch
    size = sizes[0]

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[:n] if x.dim() > 0 and x.shape[0] == size else x
        if isinstance(x, Mapping):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(cut(v) for v in x)
        return x

    return cut(batch)


def scalar_key(family: str) -> str:
    """A logger-safe name for a family (MLflow accepts only letters, digits, _ - . / and spaces)."""
    return re.sub(r"_+", "_", re.sub(r"[^\w.\-/]", "_", family.replace("→", "to"))).strip("_")


class LatestRows:
    """A tracker sink that keeps only the newest logged row of each family (what the loggers get)."""

    def __init__(self):
        self.rows: Dict[str, Dict[str, np.ndarray]] = {}

    def write(self, rows):
        for family, r in rows.items():
            if len(r.get("step", ())):
                self.rows[family] = {k: v[-1] for k, v in r.items()}

    def close(self):
        pass


def family_scalars(row: Dict[str, np.ndarray], fields: Sequence[str]) -> Dict[str, float]:
    """One logged row of a family as scalars: per-layer sums, relative errors of this step (max over groups
    of |prediction − empirical| / max magnitude), the residual and group means of the scale rates."""
    out = {}
    magnitude = float(np.nanmax(np.abs(row["magnitude"]))) if np.isfinite(row["magnitude"]).any() else math.nan
    for f in fields:
        if f in ("empirical", "exact", "paper", "modified"):
            v = row.get(f"{f}_sum")
        elif f.startswith("error_"):
            err = np.abs(row[f[6:]] - row["empirical"])
            v = float(np.nanmax(err)) / magnitude if np.isfinite(err).any() and magnitude > 0 else math.nan
        elif f == "magnitude":
            v = magnitude
        elif f == "residual":
            v = row["residual"]
        else:   # effective_lr, angular_update: scale families only
            v = row.get(f)
            v = None if v is None or not np.isfinite(v).any() else np.nanmean(v)
        if v is not None and math.isfinite(float(v)):
            out[f] = float(v)
    return out


class TrackedRun:
    """The tracker of one framework run, its run folder (written by one process only) and its scalars.

    Args:
        out_dir: the run folder (``neural-mechanics report`` reads it).
        fields: the per-family scalars handed to the loggers (``FIELDS``); () for none.
        write: whether this process writes the run folder (global rank 0).
        tracker_options: passed to ``SymmetryTracker`` (log_every, flush_every, hook, ranks, ...).
    """

    def __init__(self, out_dir: str, fields: Sequence[str], write: bool, tracker_options: Dict[str, Any]):
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise ValueError(f"SymmetryCallback: unknown log_fields {unknown}; choose from {FIELDS}")
        for reserved in ("sinks", "out_dir", "families", "example_inputs"):
            if reserved in tracker_options:
                raise TypeError(f"SymmetryCallback: {reserved}= is the callback's to set, not the tracker's")
        self.out_dir, self.fields, self.write = out_dir, tuple(fields), write
        self.options = tracker_options
        self.tracker: Optional[SymmetryTracker] = None
        self.latest = LatestRows()
        self.runlog: Optional[RunLog] = None
        self.logged_step = -1
        self.finished = False
        self.seconds_before = 0.0
        self.t0 = time.perf_counter()

    def start(self, model, optimizer, families: Sequence[SymmetryFamily], config: Dict[str, Any],
              state: Optional[Dict[str, Any]] = None) -> Optional[SymmetryTracker]:
        """Build the tracker (and continue ``state`` of a checkpoint); None, with a warning, without families."""
        families = list(families)
        if not families:
            warnings.warn(f"SymmetryCallback: {type(model).__name__} has no symmetry family that discovery can find "
                          "and prove (no normalisation, no homogeneous activation between two linear maps, no "
                          "softmax cross-entropy seen in the model's own loss), so there is nothing to track and "
                          "the callback does nothing; declare families by hand (nmx.SymmetryFamily) and pass "
                          "families= if you know some", stacklevel=3)
            return None
        files = self._prepare_folder(config, families, resumed_at=None if state is None else state["step"])
        self.tracker = SymmetryTracker(model, optimizer, families=families, sinks=[self.latest] + files,
                                       **self.options)
        if state is not None:
            self.tracker.load_state_dict(decode(state["tracker"]))
            self.seconds_before = state["seconds"]
            restored = self.tracker.history()
            for sink in files:
                sink.write(restored)
            self.logged_step = self.tracker.step - 1
        self.t0 = time.perf_counter()
        return self.tracker

    def _prepare_folder(self, config, families, resumed_at: Optional[int]) -> list:
        """Write config and families; a new run replaces an old one's files, a resumed run keeps the part
        of them up to its checkpoint (the history is rewritten from the tracker's state)."""
        if not self.write:
            return []
        os.makedirs(self.out_dir, exist_ok=True)
        kept_log = read_train_log(self.out_dir) if resumed_at is not None else {}
        for name in RUN_FILES:
            if os.path.exists(os.path.join(self.out_dir, name)):
                os.remove(os.path.join(self.out_dir, name))
        for name in ("groups", "figures"):
            shutil.rmtree(os.path.join(self.out_dir, name), ignore_errors=True)
        write_config(self.out_dir, config)
        write_families(self.out_dir, families)
        self.runlog = RunLog(self.out_dir, None)
        for i in range(len(kept_log.get("step", ()))):
            if kept_log["step"][i] <= resumed_at:
                self.runlog.add([int(kept_log["step"][i])] + [float(kept_log[k][i]) for k in RunLog.FIELDS[1:]], None)
        self.runlog.flush()
        return run_sinks(self.out_dir, tensorboard=False)   # the framework's own loggers cover TensorBoard

    def scalars(self, prefix: str = "symmetry/") -> Dict[str, float]:
        """The per-family scalars of the newest tracked step, once per step ({} when nothing is new)."""
        if self.tracker is None or not self.fields:
            return {}
        self.tracker.sync()
        rows = self.latest.rows
        step = max((int(r["step"]) for r in rows.values()), default=-1)
        if step <= self.logged_step:
            return {}
        self.logged_step = step
        return {f"{prefix}{scalar_key(family)}/{name}": v for family, row in rows.items()
                for name, v in family_scalars(row, self.fields).items()}

    def log_train(self, step: int, epoch: Optional[float], loss: Optional[float], lr: Optional[float]) -> None:
        """A row of train_log.csv (the report's training figure); written at the loggers' steps."""
        if self.runlog is not None and loss is not None:
            nan = math.nan
            self.runlog.add([int(step), nan if epoch is None else float(epoch), float(loss), nan,
                             nan if lr is None else float(lr), nan, nan], None)
            self.runlog.flush()

    def state_dict(self, step: int) -> Dict[str, Any]:
        """What a checkpoint keeps at optimizer step ``step``: the families and the tracker's state (tensors and
        plain Python only, so that ``torch.load(weights_only=True)`` reads it); no families, no tracker."""
        if self.tracker is None:
            return {"version": 1, "step": step, "families": [], "tracker": None, "seconds": 0.0}
        return {"version": 1, "step": step,
                "families": [dataclasses.asdict(f) for f in self.tracker.families],
                "tracker": encode(self.tracker.state_dict()),
                "seconds": self.seconds_before + time.perf_counter() - self.t0}

    @staticmethod
    def families_of(state: Dict[str, Any]) -> List[SymmetryFamily]:
        return [SymmetryFamily(**{**f, "members": [tuple(m) for m in f["members"]]}) for f in state["families"]]

    def finish(self, status: str, summary: Dict[str, Any]) -> None:
        """Close the tracker and write summary.json (what ``report`` shows as the run's outcome); once."""
        if self.tracker is None or self.finished:
            return
        self.finished = True
        self.tracker.close()
        if not self.write:
            return
        t = self.tracker.timing
        wall = self.seconds_before + time.perf_counter() - self.t0
        tracked = t["hook_seconds"] + t["process_seconds"]
        write_json(os.path.join(self.out_dir, "summary.json"), {
            "status": status, "steps": self.tracker.step, **summary,
            "seconds": {"training_wall": wall},
            "overhead": {"timers": {"hook_seconds": t["hook_seconds"], "process_seconds": t["process_seconds"],
                                    "train_step_seconds": wall, "percent": 100 * tracked / max(wall - tracked, 1e-12)},
                         "direct": None},
            "families": add_magnitudes(self.tracker.summary(), self.tracker.history())})


def encode(x):
    """numpy arrays and scalars → tensors and Python numbers (restorable with ``decode``)."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {k: encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(encode(v) for v in x)
    return x


def decode(x):
    if isinstance(x, Mapping):
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        return {k: decode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(decode(v) for v in x)
    return x


def _from_package(obj, *packages: str) -> bool:
    return type(obj).__module__.split(".")[0] in packages
