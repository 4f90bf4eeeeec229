"""``SymmetryCallback`` for the Lightning ``Trainer`` (``lightning.pytorch``).

    trainer = lightning.Trainer(..., callbacks=[SymmetryCallback()])
    trainer.fit(module, data)            # scalars to every configured logger, every log_every_n_steps
    neural-mechanics report <default_root_dir>/symmetry

The tracker is built when training starts (after a checkpoint restored the optimizer) from the torch optimizer
under ``trainer.optimizers``; without ``families=`` the families are found on the first training batch, with
the loss the module's own ``training_step`` returns.  Its state travels in Lightning's checkpoints
(``state_dict`` / ``load_state_dict``); the run folder is written by global rank 0 only.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback

from ..symmetry import SymmetryFamily
from .core import (DEEPSPEED, DEFAULT_FIELDS, FSDP1, TrackedRun, discover, model_loss, plain_model,
                   refuse_unsupported, torch_optimizer)


class SymmetryCallback(Callback):
    """Tracks the symmetry groups of a Lightning run.

    Args:
        out_dir: the run folder (default ``<trainer.default_root_dir>/symmetry``).  A new run replaces the
            files of an earlier one there; a resumed run keeps them up to its checkpoint.
        families: the families to track (default: found on the first training batch).  Needed under FSDP2
            (ModelParallelStrategy): find them with ``nmx.find_symmetries`` before the model is sharded.
        discovery_samples: how many samples of the first batch discovery proves the families on.
        log_fields: the per-family scalars sent to the loggers (``integrations.core.FIELDS``); () for none.
        **tracker_options: passed to ``SymmetryTracker`` (log_every, flush_every, hook, ranks).

    ``callback.tracker`` is the ``SymmetryTracker`` once training has started.
    """

    def __init__(self, out_dir: Optional[str] = None, *, families: Optional[Sequence[SymmetryFamily]] = None,
                 log_fields: Sequence[str] = DEFAULT_FIELDS, discovery_samples: int = 8, **tracker_options: Any):
        self.out_dir, self.families, self.log_fields = out_dir, families, tuple(log_fields)
        self.discovery_samples = discovery_samples
        self.tracker_options = tracker_options
        TrackedRun(out_dir or ".", self.log_fields, False, tracker_options)   # bad options fail here
        self.run: Optional[TrackedRun] = None
        self._saved = None
        self._optimizer = self._trainer = None
        self._config = None
        self._step_logged = -1

    @property
    def tracker(self):
        return None if self.run is None else self.run.tracker

    # ---- events -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        name = type(trainer.strategy).__name__
        if "DeepSpeed" in name:
            raise ValueError(f"SymmetryCallback: {DEEPSPEED}")
        if name == "FSDPStrategy":
            raise ValueError(f"SymmetryCallback: {FSDP1}")

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SymmetryCallback: the module configures {len(trainer.optimizers)} optimizers; the "
                             "callback tracks runs with one (use nmx.SymmetryTracker per optimizer by hand)")
        model, optimizer = plain_model(pl_module), torch_optimizer(trainer.optimizers[0])
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        refuse_unsupported(optimizer, scaler is not None)
        self._optimizer, self._trainer = optimizer, trainer
        _run_closure_before_hooks(optimizer)
        self.run = TrackedRun(self.out_dir or os.path.join(trainer.default_root_dir, "symmetry"), self.log_fields,
                              trainer.is_global_zero, self.tracker_options)
        self._config = _config(trainer, model, optimizer)
        saved, self._saved = self._saved, None
        families = TrackedRun.families_of(saved) if saved else self.families
        if families is not None:
            self.run.start(model, optimizer, families, self._config, saved)
        self._step_logged = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.tracker is not None or self._config is None:
            return
        config, self._config = self._config, None   # discovery runs once, found families or not
        with warnings.catch_warnings():   # the copy's self.log() has no trainer: Lightning warns, it is harmless
            warnings.filterwarnings("ignore", message=".*self.log.*")
            found = discover(_TrainingStepLoss(pl_module), (batch,), self.discovery_samples, prefix="module.")
        self.run.start(plain_model(pl_module), self._optimizer, found, config)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.run is None or step == self._step_logged or step % trainer.log_every_n_steps:
            return
        self._step_logged = step
        scalars = self.run.scalars()
        if scalars and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            lr = self._optimizer.param_groups[0]["lr"]
            self.run.log_train(step, trainer.current_epoch, float(loss), float(lr))

    def on_train_end(self, trainer, pl_module):
        self._finish(trainer, "finished")

    def on_exception(self, trainer, pl_module, exception):
        self._finish(trainer, "interrupted")

    def state_dict(self):
        return {} if self.run is None else self.run.state_dict(self._trainer.global_step)

    def load_state_dict(self, state_dict):
        # Lightning restores callbacks before the optimizer; the tracker is built with both in on_train_start.
        self._saved = state_dict or None

    # ---- helpers ------------------------------------------------------------------------------------
    def _finish(self, trainer, status):
        if self._optimizer is not None:
            _restore_step(self._optimizer)
        if self.run is not None:
            self.run.finish(status, {"total_steps": trainer.max_steps if trainer.max_steps > 0 else None,
                                     "epochs": trainer.current_epoch, "final_train_accuracy": None,
                                     "test_accuracy": None})


class _TrainingStepLoss(torch.nn.Module):
    """The module's own loss as a forward pass (what discovery runs): ``training_step(batch, 0)``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch):
        return model_loss(self.module.training_step(batch, 0))


def _run_closure_before_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Lightning runs the last micro-batch's forward and backward inside ``optimizer.step(closure)``, which a
    torch optimizer calls after its step pre-hooks: the tracker's hook would see the gradients before that
    backward.  So the step runs the closure first, then the optimizer (with its hooks) without it: the same
    computation for every optimizer that calls its closure once (all but LBFGS, which is refused)."""
    if "_nmx_step" in optimizer.__dict__:
        return
    original = optimizer.step

    @functools.wraps(original)   # keeps the marks others put on it (an LR scheduler's step counter)
    def step(closure=None, **kwargs):
        if closure is None:
            return original(**kwargs)
        with torch.enable_grad():
            loss = closure()
        original(**kwargs)
        return loss

    optimizer._nmx_step = optimizer.__dict__.get("step")   # an instance-level step someone else set, or None
    optimizer.step = step


def _restore_step(optimizer: torch.optim.Optimizer) -> None:
    if "_nmx_step" not in optimizer.__dict__:
        return
    previous = optimizer.__dict__.pop("_nmx_step")
    if previous is None:
        del optimizer.step   # back to the class's own step
    else:
        optimizer.step = previous


def _config(trainer, model, optimizer) -> dict:
    """config.json of the run folder: what the report shows about the run."""
    g = optimizer.param_groups[0]
    decays = sorted({grp.get("weight_decay", 0.0) for grp in optimizer.param_groups})
    text = f"{type(optimizer).__name__} lr {g['lr']:g}"
    if g.get("momentum"):
        text += f", momentum {g['momentum']:g}"
    text += f", weight decay {' / '.join(f'{d:g}' for d in decays)}"
    schedulers = [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs]
    if schedulers:
        text += f", {' + '.join(schedulers)}"
    batch = getattr(trainer.train_dataloader, "batch_size", None)
    return {"command": "lightning", "framework": "lightning.pytorch.Trainer", "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "data": "the Trainer's train_dataloader",
            "batch_size": (batch or 0) * trainer.accumulate_grad_batches * trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches, "optimizer": text, "lr": g["lr"],
            "weight_decay": g.get("weight_decay", 0.0), "steps": trainer.max_steps if trainer.max_steps > 0 else None,
            "amp": str(trainer.precision) if "mixed" in str(trainer.precision) else False,
            "lr_schedule": schedulers}
