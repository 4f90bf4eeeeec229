"""``SymmetryCallback`` for the Hugging Face ``transformers.Trainer``.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[SymmetryCallback()])
    trainer.train()                      # scalars in trainer.state.log_history and every report_to logger
    neural-mechanics report OUTPUT_DIR/symmetry

The tracker is built at ``on_train_begin`` on the model and the torch optimizer under Accelerate's and DDP's
wrappers; its step hook fires once per optimizer step (after gradient accumulation, clipping and AMP
unscaling; never for a step a GradScaler skipped).  Without ``families=`` the families are found on the
first training batch, with the loss the model computes itself (``outputs.loss``).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..symmetry import SymmetryFamily
from .core import (DEFAULT_FIELDS, STATE_FILE, TrackedRun, discover, plain_model, refuse_unsupported, sharded,
                   torch_optimizer)


class SymmetryCallback(TrainerCallback):
    """Tracks the symmetry groups of a ``transformers.Trainer`` run.

    Args:
        out_dir: the run folder (default ``<output_dir>/symmetry``): config, families, the full per-group
            history, train_log.csv and summary.json; ``neural-mechanics report`` draws it.  A new run replaces
            the files of an earlier one there; a resumed run keeps them up to its checkpoint.
        families: the families to track (default: found on the first training batch).  Needed under FSDP2
            (find them with ``nmx.find_symmetries`` on the model before it is sharded).
        discovery_samples: how many samples of the first batch discovery proves the families on.
        log_fields: the per-family scalars added to the Trainer's logs at ``logging_steps`` (see
            ``integrations.core.FIELDS``); () for none.
        resume_from: when the Trainer resumes, the checkpoint folder whose tracker state to continue
            (default ``<output_dir>/checkpoint-<global_step>``); False starts a new history instead.
        **tracker_options: passed to ``SymmetryTracker`` (log_every, flush_every, hook, ranks).

    ``callback.tracker`` is the ``SymmetryTracker`` once training has begun (None before, and when the model
    has no family).
    """

    def __init__(self, out_dir: Optional[str] = None, *, families: Optional[Sequence[SymmetryFamily]] = None,
                 log_fields: Sequence[str] = DEFAULT_FIELDS, discovery_samples: int = 8,
                 resume_from: Union[str, bool, None] = None,
                 **tracker_options: Any):
        self.out_dir, self.families, self.log_fields = out_dir, families, tuple(log_fields)
        self.discovery_samples = discovery_samples
        self.resume_from, self.tracker_options = resume_from, tracker_options
        TrackedRun(out_dir or ".", self.log_fields, False, tracker_options)   # bad options fail here, not later
        self.run: Optional[TrackedRun] = None
        self._discovery = None

    @property
    def tracker(self):
        return None if self.run is None else self.run.tracker

    # ---- events -------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        self._run_before_reporters()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._run_before_reporters()
        scaler = getattr(optimizer, "scaler", None)   # Accelerate's GradScaler (fp16)
        model, optimizer = plain_model(model), torch_optimizer(optimizer)
        refuse_unsupported(optimizer, scaler is not None)
        self.run = TrackedRun(self.out_dir or os.path.join(args.output_dir, "symmetry"), self.log_fields,
                              state.is_world_process_zero, self.tracker_options)
        saved = self._saved_state(args, state)
        families = TrackedRun.families_of(saved) if saved else self.families
        config = _config(args, state, model, optimizer)
        if families is not None:
            self.run.start(model, optimizer, families, config, saved)
            return
        if sharded(model):
            raise ValueError("SymmetryCallback: the parameters are sharded (FSDP2): pass families= found with "
                             "nmx.find_symmetries on the model before it was sharded")

        def first_batch(module, args_, kwargs_):
            if not module.training:   # an evaluation before training (eval_on_start)
                return
            self._discovery.remove()
            with torch.autocast(next(module.parameters()).device.type, enabled=False):
                found = discover(module, kwargs_ if kwargs_ else args_, self.discovery_samples)
            self.run.start(module, optimizer, found, config)

        # The families are proved on the first training batch, as the Trainer feeds it to the model.
        self._discovery = model.register_forward_pre_hook(first_batch, with_kwargs=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or logs is None:
            return
        scalars = self.run.scalars()
        logs.update(scalars)
        if scalars and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)   # the Trainer stored a copy of logs before this event
        if "loss" in logs:
            self.run.log_train(state.global_step, state.epoch, logs["loss"], logs.get("learning_rate"))

    def on_save(self, args, state, control, **kwargs):
        if self.run is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.run.state_dict(state.global_step), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self._discovery is not None:
            self._discovery.remove()
        if self.run is None:
            return
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        self.run.finish("finished", {"total_steps": state.max_steps, "epochs": state.epoch,
                                     "initial_loss": losses[0] if losses else None,
                                     "final_loss": losses[-1] if losses else None,
                                     "final_train_accuracy": None, "test_accuracy": None})

    # ---- helpers ------------------------------------------------------------------------------------
    def _saved_state(self, args, state):
        """The tracker state of the checkpoint the Trainer resumed from (None for a new run)."""
        if state.global_step == 0 or self.resume_from is False:
            return None
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"SymmetryCallback: the Trainer resumed at step {state.global_step}, but {path} does not exist "
                f"(on_save writes it beside each checkpoint); pass SymmetryCallback(resume_from=CHECKPOINT_DIR) "
                "if the checkpoint is elsewhere, or resume_from=False to start a new history")
        saved = torch.load(path, weights_only=True)
        if saved["step"] != state.global_step:
            raise ValueError(f"SymmetryCallback: {path} holds the tracker of step {saved['step']}, the Trainer "
                             f"resumed at step {state.global_step}")
        return saved

    def _run_before_reporters(self):
        """The Trainer hands every callback the same ``logs`` dict in list order, and the callbacks of
        ``report_to`` (TensorBoard, W&B, MLflow...) come before the user's: so that they receive the scalars,
        this callback moves itself to the front of the list of the CallbackHandler that calls it (its
        ``call_event`` is the caller of this event; moving an element to the front while it iterates
        leaves every other callback called exactly once)."""
        caller = sys._getframe(2).f_locals.get("self")
        if not isinstance(caller, CallbackHandler):
            warnings.warn("SymmetryCallback: not called by a transformers CallbackHandler; the scalars reach only "
                          "the callbacks after this one", stacklevel=3)
            return
        if caller.callbacks and caller.callbacks[0] is not self:
            caller.callbacks.remove(self)
            caller.callbacks.insert(0, self)


def _config(args, state, model, optimizer) -> dict:
    """config.json of the run folder: what the report shows about the run."""
    g = optimizer.param_groups[0]
    decays = sorted({grp.get("weight_decay", 0.0) for grp in optimizer.param_groups})
    text = f"{type(optimizer).__name__} lr {args.learning_rate:g}"
    if "betas" in g:
        text += f", betas {tuple(g['betas'])}"
    text += f", weight decay {' / '.join(f'{d:g}' for d in decays)}"
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if schedule and schedule != "constant":
        text += f", {schedule} schedule"
        warmup = args.warmup_steps or getattr(args, "warmup_ratio", 0)
        if warmup:
            text += f" with warmup {warmup:g}"
    world = max(1, args.world_size)
    return {"command": "huggingface", "framework": "transformers.Trainer", "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "data": "the Trainer's train_dataset",
            "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "optimizer": text,
            "lr": args.learning_rate, "weight_decay": args.weight_decay, "steps": state.max_steps,
            "amp": "bf16" if args.bf16 else "fp16" if args.fp16 else False, "output_dir": args.output_dir}
