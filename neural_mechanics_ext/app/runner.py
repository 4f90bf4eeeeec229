"""``neural-mechanics demo`` and ``neural-mechanics train``: train a model with a SymmetryTracker attached
and leave a run folder that ``neural-mechanics report`` turns into figures and ``report.html``.

Both commands resolve their options into a :class:`RunConfig` and call :func:`run_training`, which is
also the Python entry point (``run_training(RunConfig(model="vgg16_bn", data="~/tiny-imagenet-200"))``).

The run folder's files are listed in :mod:`neural_mechanics_ext.runfolder`; the command-line options are in :mod:`.commands`.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import SymmetryTracker, find_symmetries
from ..sinks import run_sinks
from ..summary import add_magnitudes
from ..runfolder import RunLog, default_out_dir, write_config, write_families, write_json
from .overhead import interleaved_blocks, overhead_summary
from .timing import spread

# ---- configuration ---------------------------------------------------------------------------------
# THEORY.md §8: the paper's Tiny ImageNet runs.  The paper sweeps weight decay over {0, 1e-4, 5e-4,
# 1e-3} and momentum over {0.8, 0.9, 0.99} (dampening 0 or 0.01); --weight-decay, --momentum and
# --dampening pick one point of the sweep on top of a preset.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper-vgg16": dict(model="vgg16", image_size=64, lr=0.1, momentum=0.0, batch_size=256, epochs=100,
                        weight_decay=5e-4, schedule="constant"),
    "paper-vgg16-bn": dict(model="vgg16_bn", image_size=64, lr=0.1, momentum=0.0, batch_size=256, epochs=100,
                           weight_decay=5e-4, schedule="constant"),
    "paper-vgg16-momentum": dict(model="vgg16", image_size=64, lr=0.1, momentum=0.9, batch_size=128,
                                 epochs=100, weight_decay=5e-4, schedule="constant"),
    "paper-vgg16-bn-momentum": dict(model="vgg16_bn", image_size=64, lr=0.1, momentum=0.9, batch_size=128,
                                    epochs=100, weight_decay=5e-4, schedule="constant"),
}
TINY_IMAGENET_HINT = ("Tiny ImageNet as an ImageFolder tree: DIR/train/<wnid>/images/*.JPEG "
                      "(e.g. the unpacked tiny-imagenet-200/)")
# Defaults per optimizer: SGD's are the demo's (the paper's setting); Adam's, AdamW's and Lion's are the
# optimizers' own (torch.optim, lion-pytorch) except the learning rate, sized for the demo net.
OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    "sgd": dict(lr=0.05, weight_decay=5e-4),
    "adamw": dict(lr=1e-3, weight_decay=1e-2, betas=[0.9, 0.999]),
    "adam": dict(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.999]),
    "lion": dict(lr=1e-4, weight_decay=0.0, betas=[0.9, 0.99]),
}
EXACT_BN_EPS = 1e-30  # with float64, var + 1e-30 == var for any var > 1e-14: the scale symmetry is exact


@dataclass
class RunConfig:
    """Every setting of a run (``config.json`` holds it, resolved).  Defaults are the demo's."""
    command: str = "demo"
    model: str = "demo"
    data: str = "generated"
    preset: Optional[str] = None
    num_classes: int = 10              # generated data only; folders say how many classes they have
    image_size: Optional[int] = None   # generated: 32; folders: their own size unless given
    train_samples: int = 6144          # generated data only
    test_samples: int = 1024           # generated data only
    batch_size: int = 128
    steps: Optional[int] = None        # optimizer steps; or epochs (steps wins when both are given)
    epochs: Optional[float] = None
    optimizer: str = "sgd"             # sgd | adamw | adam | lion (OPTIMIZERS)
    lr: Optional[float] = None         # default per optimizer (OPTIMIZERS)
    betas: Optional[List[float]] = None   # adam/adamw/lion: default per optimizer
    eps: float = 1e-8                  # adam/adamw
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: Optional[float] = None   # default per optimizer (OPTIMIZERS)
    schedule: str = "constant"         # constant | multistep | cosine
    milestones: List[float] = field(default_factory=list)   # multistep: in epochs (in steps with --steps)
    gamma: float = 0.1
    device: str = "auto"
    amp: bool = False
    exact: bool = False                # float64 and BN eps 1e-30: rounding-level agreement
    seed: int = 0
    out: Optional[str] = None
    workers: Optional[int] = None
    log_every: Optional[int] = None    # tracker rows kept; default: about 1000 rows per run
    flush_every: int = 25
    calibrate_steps: int = 16          # direct overhead measurement (0: skip)
    raw_weights: int = 24
    hook: str = "optimizer"
    tensorboard: bool = False          # also write TensorBoard event files (tensorboard/)
    eval_batches: Optional[int] = None
    progress: bool = True
    report: bool = True

    def resolved(self) -> "RunConfig":
        """A copy with the preset applied under the explicit settings and every default filled in."""
        c = dataclasses.replace(self)
        if c.preset:
            if c.preset not in PRESETS:
                raise ValueError(f"unknown preset {c.preset!r}; presets: {', '.join(PRESETS)}")
        if c.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {c.optimizer!r}: {', '.join(OPTIMIZERS)}")
        defaults = OPTIMIZERS[c.optimizer]
        for key in ("lr", "weight_decay", "betas"):
            if getattr(c, key) is None:
                setattr(c, key, defaults.get(key))
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.schedule not in ("constant", "multistep", "cosine"):
            raise ValueError(f"unknown schedule {c.schedule!r}: constant, multistep or cosine")
        if c.exact and c.amp:
            raise ValueError("--exact (float64) and --amp (reduced precision) exclude each other")
        if c.batch_size < 1 or (c.steps is not None and c.steps < 1) or (c.epochs is not None and c.epochs <= 0):
            raise ValueError("batch size, steps and epochs must be positive")
        from .models import MODELS
        if c.model.lower().replace("-", "_") not in MODELS:
            raise ValueError(f"unknown model {c.model!r}; known models: {', '.join(MODELS)}")
        if c.workers is None:
            c.workers = 0 if c.data == "generated" else min(4, os.cpu_count() or 1)
        return c


def make_optimizer(model: torch.nn.Module, c: RunConfig) -> torch.optim.Optimizer:
    """The run's optimizer over every parameter: SGD with coupled weight decay as the paper trains
    (THEORY §8); AdamW (decoupled decay), Adam (coupled L2) or Lion (lion-pytorch) otherwise."""
    params = model.parameters()
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, dampening=c.dampening,
                               nesterov=c.nesterov, weight_decay=c.weight_decay)
    if c.optimizer in ("adam", "adamw"):
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)
    try:
        from lion_pytorch import Lion
    except ImportError as exc:
        raise ValueError("--optimizer lion needs the lion-pytorch package (pip install lion-pytorch)") from exc
    return Lion(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)


def make_schedule(opt, c: RunConfig, total_steps: int, steps_per_epoch: int, by_epochs: bool):
    """A per-step scheduler (None for a constant lr).  Milestones are epochs when the run's length is
    given in epochs, else steps."""
    if c.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if c.schedule == "multistep":
        if not c.milestones:
            raise ValueError("--schedule multistep needs --milestones")
        unit = steps_per_epoch if by_epochs else 1
        return torch.optim.lr_scheduler.MultiStepLR(opt, [int(round(m * unit)) for m in c.milestones], c.gamma)
    return None


class Stepper:
    """One training step (forward, loss, backward, optimizer step), with AMP when asked."""

    def __init__(self, model, opt, device: torch.device, amp: bool):
        self.model, self.opt, self.device = model, opt, device
        self.amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
        self.scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None

    def __call__(self, x, y):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(x)
            # The loss in float32 at least (AMP gives half-precision logits), never below the model's
            # own precision: a float64 model's exactness (--exact) must survive the loss.
            loss = F.cross_entropy(out if out.dtype in (torch.float32, torch.float64) else out.float(), y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)  # unscales first: the tracker's hook sees the true gradient
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return loss.detach(), (out.detach().argmax(1) == y).sum()


def measure_overhead(model, c: RunConfig, families, batch_list, device) -> Dict[str, Any]:
    """Measure the tracker's cost directly, the way ``neural-mechanics bench`` does (:mod:`.overhead`):
    a copy of the model trains on ``batch_list`` (cycled) in interleaved blocks with and without a
    tracker, about ``calibrate_steps`` steps per variant in two or more blocks of up to 4 steps (each
    ends with the tracker's host processing), and the overhead is the median over rounds of the paired
    block ratios.  The real model is not touched and the global RNG is restored.  Returns per-step
    seconds (medians), the overhead in percent and the quartiles of the block ratios."""
    devices = [device] if device.type == "cuda" else []
    block = max(1, min(c.flush_every, 4, c.calibrate_steps // 2))
    rounds = max(2, c.calibrate_steps // block)
    with torch.random.fork_rng(devices=devices):
        twin = copy.deepcopy(model)
        opt = make_optimizer(twin, c)
        stepper, batches = Stepper(twin, opt, device, c.amp), itertools.cycle(batch_list)
        variants = {"none": lambda: None,
                    "tracker": lambda: SymmetryTracker(twin, opt, families=families, flush_every=c.flush_every,
                                                       hook=c.hook)}
        times = interleaved_blocks(lambda: stepper(*next(batches)), variants, rounds=rounds, block_steps=block,
                                   warmup_steps=2)
    tracked = overhead_summary(times)["tracker"]
    ov = tracked["overhead"]
    return {"steps": rounds * block, "rounds": rounds, "block_steps": block,
            "plain_step_seconds": spread(times.seconds["none"])["median"],
            "tracked_step_seconds": spread(times.seconds["tracker"])["median"],
            "process_seconds": tracked["process_ms_per_step"] * 1e-3 * rounds * block,
            "percent": 100 * ov["median"], "percent_quartiles": [100 * ov["q1"], 100 * ov["q3"]]}


def pick_raw_weights(model, families, count: int, seed: int):
    """The parameter whose raw weights the paper's Fig. 1 shows (a conv in front of BN, i.e. a scale
    family's first member, from the middle of the network; else a rescale family's), and ``count``
    random flat indices into it."""
    if count <= 0:
        return None
    for kind in ("scale", "rescale"):
        fams = [f for f in families if f.kind == kind]
        if fams:
            fam = fams[len(fams) // 2]
            name = fam.members[0][0]
            p = dict(model.named_parameters())[name]
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randperm(p.numel(), generator=gen)[:count].sort().values
            return {"family": fam.name, "param": name, "indices": idx.tolist()}
    return None


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What the phases of one run share: settings, data, model and the run folder."""
    c: RunConfig
    spec: Any
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    steps_per_epoch: int
    by_epochs: bool
    run_dir: str = ""

    def to_device(self, batch):
        x, y = batch
        return (x.to(device=self.device, dtype=self.dtype, non_blocking=True),
                y.to(self.device, non_blocking=True))


@dataclass
class _Outcome:
    """What the training loop leaves: how it ended and its per-step losses and accuracies."""
    status: str = "finished"
    steps: int = 0
    train_seconds: float = 0.0
    losses: List[float] = field(default_factory=list)
    accuracies: List[float] = field(default_factory=list)


def run_training(config: RunConfig, on_step: Optional[Callable[[int], None]] = None,
                 log: Callable[[str], None] = print) -> str:
    """Train with a SymmetryTracker attached and write the run folder; returns its path.

    ``on_step(step)`` is called after every optimizer step (tests use it to interrupt a run).  A
    KeyboardInterrupt closes the tracker, writes summary.json with ``status: interrupted`` and the
    report, then propagates.  Raises FileNotFoundError/ValueError for bad data or model names before
    anything is trained.
    """
    t0 = time.perf_counter()
    run = _prepare(config, log)
    run.run_dir = _open_run_folder(run, log)
    families, discovery_s = _discover(run, log)
    c = run.c
    opt = make_optimizer(run.model, c)
    sched = make_schedule(opt, c, c.steps, run.steps_per_epoch, run.by_epochs)
    overhead_direct = _calibrate(run, families) if c.calibrate_steps > 0 else None
    # The tracker's standard run-folder sinks (what out_dir=run_dir gives), with TensorBoard only on
    # request: one add_scalar per family, field and step costs more than the tracking on a small CPU run.
    tracker = SymmetryTracker(run.model, opt, families=families,
                              sinks=run_sinks(run.run_dir, tensorboard=c.tensorboard),
                              log_every=c.log_every, flush_every=c.flush_every, hook=c.hook)
    out = _train(run, opt, sched, tracker, families, on_step, log)
    summary = _summarise(run, tracker, out, discovery_s, overhead_direct, t0)
    write_json(os.path.join(run.run_dir, "summary.json"), summary)
    if c.report:
        from .report import write_report
        t1 = time.perf_counter()
        write_report(run.run_dir)
        summary["seconds"]["report"] = time.perf_counter() - t1
        summary["seconds"]["wall"] = time.perf_counter() - t0
        write_json(os.path.join(run.run_dir, "summary.json"), summary)
    if out.status == "interrupted":
        raise KeyboardInterrupt(run.run_dir)
    return run.run_dir


def _prepare(config: RunConfig, log: Callable[[str], None]) -> _Run:
    """Resolve the settings, load the data and build the model (nothing is written yet)."""
    from .data import load_data
    from .models import build_model

    c = config.resolved()
    if c.preset and c.data == "generated":
        log(f"preset {c.preset} on generated data: a smoke test, not the paper's experiment")
    device = torch.device(c.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    dtype = torch.float64 if c.exact else torch.float32
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)

    spec = load_data(c.data, image_size=c.image_size, seed=c.seed, train_samples=c.train_samples,
                     test_samples=c.test_samples, num_classes=c.num_classes)
    c.image_size, c.num_classes = spec.image_size, spec.num_classes
    model = build_model(c.model, spec.num_classes, spec.in_channels, spec.image_size,
                        bn_eps=EXACT_BN_EPS if c.exact else None).to(device=device, dtype=dtype)
    steps_per_epoch = max(1, len(spec.train) // c.batch_size)
    by_epochs = c.steps is None and c.epochs is not None
    if c.steps is None:
        c.steps = int(round(c.epochs * steps_per_epoch)) if c.epochs is not None else 300
    if c.log_every is None:
        c.log_every = max(1, c.steps // 1000)   # bounds history and figures for long runs
    return _Run(c, spec, model, device, dtype, steps_per_epoch, by_epochs)


def _open_run_folder(run: _Run, log: Callable[[str], None]) -> str:
    """Create the run folder (refusing one that holds a run) and write its first files."""
    c = run.c
    run_dir = os.path.abspath(c.out or default_out_dir(c.command))
    if os.path.exists(os.path.join(run_dir, "metrics.csv")):
        raise FileExistsError(f"{run_dir} already holds a run (metrics.csv); choose another --out")
    c.out = run_dir
    write_config(run_dir, dataclasses.asdict(c))
    params = sum(p.numel() for p in run.model.parameters())
    spec = run.spec
    log(f"{c.model}: {params / 1e6:.2f} M parameters; data {spec.name} ({len(spec.train)} training images, "
        f"{spec.num_classes} classes, {spec.image_size}×{spec.image_size}); {c.steps} steps on {run.device}"
        + (" in float64 (--exact)" if c.exact else ""))
    return run_dir


def _discover(run: _Run, log: Callable[[str], None]):
    """Find and prove the model's families on a few samples (in float64, on a copy) and write them."""
    from .data import batches
    td = time.perf_counter()
    example = run.to_device(next(batches(run.spec, min(8, len(run.spec.train)), run.c.seed + 1, 0)))[0]
    families = find_symmetries(run.model, example)
    discovery_s = time.perf_counter() - td
    write_families(run.run_dir, families)
    kinds = {k: sum(f.kind == k for f in families) for k in ("scale", "rescale", "translation")}
    log(f"symmetry discovery: {len(families)} families ({', '.join(f'{n} {k}' for k, n in kinds.items())}) "
        f"in {discovery_s:.1f} s")
    return families, discovery_s


def _calibrate(run: _Run, families) -> Dict[str, Any]:
    """The tracker's overhead measured directly on a few batches of the run's own data."""
    from .data import batches
    c = run.c
    calib_iter = batches(run.spec, c.batch_size, c.seed + 2, 0 if c.data == "generated" else c.workers)
    batch_list = [run.to_device(next(calib_iter)) for _ in range(c.calibrate_steps + 2)]
    try:
        return measure_overhead(run.model, c, families, batch_list, run.device)
    except RuntimeError as exc:  # e.g. out of memory for two extra copies: the run goes on
        return {"error": str(exc)}


def _train(run: _Run, opt, sched, tracker, families, on_step, log) -> _Outcome:
    """The training loop: steps until done or interrupted (Ctrl-C, SIGTERM), logging as it goes; the
    tracker is closed (its last block processed and written) however the loop ends."""
    from .data import batches
    c, model = run.c, run.model
    raw = pick_raw_weights(model, families, c.raw_weights, c.seed)
    if raw:
        write_json(os.path.join(run.run_dir, "raw_weights.json"), raw)
        raw_param = dict(model.named_parameters())[raw["param"]]
        raw_index = torch.tensor(raw["indices"], device=run.device)
    runlog = RunLog(run.run_dir, raw)
    stepper = Stepper(model, opt, run.device, c.amp)
    train_iter = batches(run.spec, c.batch_size, c.seed, c.workers, pin_memory=run.device.type == "cuda")
    out = _Outcome()
    bar = _progress(c.steps, c.progress)
    model.train()
    with GracefulInterrupt(log) as interrupt:
        try:
            while out.steps < c.steps:
                if interrupt.requested:
                    raise KeyboardInterrupt
                d0 = time.perf_counter()
                x, y = run.to_device(next(train_iter))
                s0 = time.perf_counter()
                raw_values = raw_param.detach().reshape(-1)[raw_index].clone() if raw else None
                lr = opt.param_groups[0]["lr"]
                loss, correct = stepper(x, y)
                loss, acc = float(loss), float(correct) / len(y)   # the per-step sync of any progress bar
                s1 = time.perf_counter()
                if sched is not None:
                    sched.step()
                out.train_seconds += s1 - s0
                if out.steps % c.log_every == 0:
                    runlog.add([out.steps, out.steps / run.steps_per_epoch, loss, acc, lr, s1 - s0, s0 - d0],
                               raw_values)
                out.losses.append(loss)
                out.accuracies.append(acc)
                out.steps += 1
                if out.steps % c.flush_every == 0:
                    runlog.flush()
                if bar is not None:
                    bar.update(1)
                    if out.steps % 5 == 0 or out.steps == c.steps:
                        bar.set_postfix(loss=f"{np.mean(out.losses[-10:]):.3f}",
                                        acc=f"{np.mean(out.accuracies[-10:]):.2f}")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss} at step {out.steps - 1}; lower --lr")
                if on_step is not None:
                    on_step(out.steps)
        except KeyboardInterrupt:
            out.status = "interrupted"
        except Exception:
            # Ctrl-C also reaches DataLoader workers, which then exit: the batch being fetched fails
            if not interrupt.requested:
                raise
            out.status = "interrupted"
        finally:
            if bar is not None:
                bar.close()
            runlog.flush()
            tracker.close()   # processes and writes what the tracker still holds
    return out


def _summarise(run: _Run, tracker, out: _Outcome, discovery_s: float, overhead_direct, t0: float) -> Dict[str, Any]:
    """summary.json: how the run ended, losses and accuracies, timings, overhead, the family table."""
    test_acc = None
    if out.status == "finished" and run.spec.test is not None:
        test_acc = evaluate(run.model, run.spec, run.c, run.to_device)
    tracker_s = tracker.timing["hook_seconds"] + tracker.timing["process_seconds"]
    losses, accs = out.losses, out.accuracies
    return {
        "status": out.status, "steps": tracker.step, "total_steps": run.c.steps,
        "epochs": out.steps / run.steps_per_epoch,
        "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "final_train_accuracy": float(np.mean(accs[-10:])) if accs else None,
        "initial_loss": float(np.mean(losses[:5])) if losses else None,
        "test_accuracy": test_acc,
        "seconds": {"discovery": discovery_s, "training_steps": out.train_seconds,
                    "wall": time.perf_counter() - t0},
        "overhead": {
            "timers": {"hook_seconds": tracker.timing["hook_seconds"],
                       "process_seconds": tracker.timing["process_seconds"],
                       "train_step_seconds": out.train_seconds,
                       "percent": 100 * tracker_s / max(out.train_seconds - tracker_s, 1e-12)},
            "direct": overhead_direct},
        "families": add_magnitudes(tracker.summary(), tracker.history()),
    }


def evaluate(model, spec, c: RunConfig, to_device) -> Optional[float]:
    """Accuracy on the test/validation set (train-mode BN is switched to eval for it, then back)."""
    from .data import batches
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for i, batch in enumerate(batches(spec, c.batch_size, c.seed, c.workers, train=False)):
            if c.eval_batches is not None and i >= c.eval_batches:
                break
            x, y = to_device(batch)
            with torch.autocast(x.device.type, enabled=c.amp,
                                dtype=torch.float16 if x.device.type == "cuda" else torch.bfloat16):
                correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    model.train()
    return correct / seen if seen else None


class GracefulInterrupt:
    """Ctrl-C ends the run at the next step boundary instead of wherever the signal lands (in the
    middle of the tracker's processing or of a file write); a second Ctrl-C stops at once."""

    def __init__(self, log: Callable[[str], None]):
        self.requested, self.log, self.previous, self.pid = False, log, None, os.getpid()

    def _handler(self, signum, frame):
        if self.requested or os.getpid() != self.pid:   # a second Ctrl-C, or a forked DataLoader worker
            raise KeyboardInterrupt
        self.requested = True
        self.log("\nCtrl-C: stopping after this step and writing the run folder (Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="training", unit="step", dynamic_ncols=True, leave=True)
