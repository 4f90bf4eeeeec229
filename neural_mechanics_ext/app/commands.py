"""``neural-mechanics demo`` and ``neural-mechanics train``: their options, the :class:`RunConfig` they
resolve to, and the summary printed at the end (the run itself is :func:`.runner.run_training`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

from .runner import OPTIMIZERS, PRESETS, TINY_IMAGENET_HINT, RunConfig, run_training


# ---- printing --------------------------------------------------------------------------------------
def format_summary(run_dir: str) -> str:
    """The end-of-run text: families per kind, max error of exact and paper, overhead, report path."""
    from .plot import family_layer
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    rows = s["families"]
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    lines = [f"Families found: {len(rows)} ({', '.join(f'{n} {k}' for k, n in kinds.items())})"]

    def num(x):
        return "  n/a   " if x is None else f"{x:8.1e}"

    near_zero = [r for r in rows if r.get("near_zero")]

    if len(rows) <= 24:
        width = max(len(r["family"]) for r in rows)
        lines.append(f"  {'family':<{width}}  {'kind':<11}  {'groups':>6}  exact err  paper err")
        for r in rows:
            errors = (f"{num(r['error_exact'])}   {num(r['error_paper'])}" if not r.get("near_zero")
                      else "  values stay ≈ 0 *")
            lines.append(f"  {r['family']:<{width}}  {r['kind']:<11}  {r['groups']:>6}  {errors}")
    else:   # per kind, the worst family
        lines.append("  (per kind, the worst family; every family is in report.html and summary.json)")
        for kind in kinds:
            all_ = [r for r in rows if r["kind"] == kind]
            sub = [r for r in all_ if not r.get("near_zero")] or all_
            we = max(sub, key=lambda r: -1 if r["error_exact"] is None else r["error_exact"])
            wp = max(sub, key=lambda r: -1 if r["error_paper"] is None else r["error_paper"])
            zero = f", {len(all_) - len(sub)} stay ≈ 0 *" if len(sub) < len(all_) else ""
            lines.append(f"  {kind:<11} {len(all_):>3} families{zero}: exact err ≤ {num(we['error_exact']).strip()} "
                         f"({family_layer(we)}), paper err ≤ {num(wp['error_paper']).strip()} ({family_layer(wp)})")
    lines.append("  (max relative error over steps and groups; exact = THEORY §4 recursions, "
                 "paper = Eqs. 18-20 / §3(c))")
    if near_zero:
        lines.append(f"  * {len(near_zero)} families hold only rounding noise (e.g. conv biases in front of BatchNorm, "
                     "initialised at 0, have zero gradient): a relative error is meaningless there")
    o = s["overhead"]
    text = (f"Tracking overhead: {o['timers']['percent']:.1f} % of training-step time (tracker's own timers, "
            "including writing the run folder)")
    d = o.get("direct")
    if d and "percent" in d:
        q1, q3 = d.get("percent_quartiles") or (math.nan, math.nan)
        blocks = (f"{d['rounds']} interleaved blocks of {d['block_steps']} steps" if "rounds" in d
                  else f"{d['steps']} paired steps")   # run folders written before app/overhead.py
        text += (f"; {d['percent']:+.1f} % measured directly (median over {blocks} with vs without, "
                 f"quartiles {q1:+.0f} .. {q3:+.0f} %)")
    lines.append(text)
    loss = s.get("final_loss")
    if loss is not None:
        acc = s.get("test_accuracy")
        lines.append(f"Loss {s.get('initial_loss', float('nan')):.3f} → {loss:.3f} over {s['steps']} steps; "
                     f"train accuracy {s['final_train_accuracy']:.1%}"
                     + (f", test accuracy {acc:.1%}" if acc is not None else ""))
    lines.append(f"Wall time {s['seconds']['wall']:.0f} s (discovery {s['seconds']['discovery']:.1f} s, "
                 f"training steps {s['seconds']['training_steps']:.0f} s)")
    report = os.path.join(run_dir, "report.html")
    if os.path.exists(report):
        lines.append(f"Report: {report}")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, steps_default: Optional[int]):
    p.add_argument("--steps", type=int, default=steps_default, help="optimizer steps"
                   + (f" (default {steps_default})" if steps_default else " (default: the preset's epochs, else 300)"))
    p.add_argument("--out", metavar="DIR", help="run folder (default ./runs/<command>-<timestamp>)")
    p.add_argument("--exact", action="store_true",
                   help="float64 and BatchNorm eps=1e-30: the symmetries hold exactly and the exact prediction "
                        "agrees to rounding (default float32, where BN eps makes scale symmetries approximate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and shuffling (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip figures and report.html")
    p.add_argument("--calibrate-steps", type=int, default=16,
                   help="steps timed with and without the tracker on copies of the model to measure the "
                        "overhead directly (default 16; 0 skips)")
    p.add_argument("--flush-every", type=int, default=25, help="steps per block written to the run folder")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128, or the preset's)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to RUN_DIR/tensorboard (off by default: on a small "
                        "CPU run they cost more than the tracking itself)")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``neural-mechanics demo``."""
    p.description = ("Train a small VGG-style network (conv-BN-ReLU blocks: scale symmetry; ReLU MLP head: "
                     "rescale; softmax classifier: translation) on built-in generated images with SGD, momentum "
                     "and weight decay, track its symmetries, and write a run folder with figures and report.html. "
                     "No download, no GPU needed: 300 steps take under a minute on an idle 2-core CPU.")
    _add_common(p, 300)


def demo_main(args) -> int:
    """``neural-mechanics demo``."""
    c = RunConfig(command="demo", steps=args.steps, out=args.out, exact=args.exact, seed=args.seed,
                  device=args.device, progress=args.progress, report=args.report,
                  calibrate_steps=args.calibrate_steps, flush_every=args.flush_every,
                  batch_size=args.batch_size or 128, tensorboard=args.tensorboard)
    return _run(c)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``neural-mechanics train``."""
    from .models import MODELS
    p.description = ("Train a model with SGD and track its symmetries; the paper's runs (THEORY.md §8) are "
                     "presets. Options given explicitly override the preset's.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the paper's Tiny ImageNet runs: "
                        + "; ".join(f"{k}: {v['model']}, lr {v['lr']}, momentum {v['momentum']}, batch "
                                    f"{v['batch_size']}, {v['epochs']} epochs, wd {v['weight_decay']}"
                                    for k, v in PRESETS.items()) + ". Needs --data (Tiny ImageNet)")
    p.add_argument("--model", help=f"{', '.join(MODELS)} (default demo)")
    p.add_argument("--data", help="'generated' (default without a preset), a CIFAR-10/100 folder in "
                                  "torchvision's layout, or an ImageFolder tree (e.g. tiny-imagenet-200)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of generated data (default 10)")
    p.add_argument("--image-size", type=int, help="input size (generated: 32; folders: their own)")
    p.add_argument("--train-samples", type=int, default=6144, help="generated data: training images")
    p.add_argument("--epochs", type=float, help="epochs (ignored when --steps is given)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS),
                   help="sgd (torch.optim.SGD, default), adamw, adam (torch.optim) or lion (lion-pytorch)")
    p.add_argument("--lr", type=float, help="learning rate (default: sgd 0.05, adam/adamw 1e-3, lion 1e-4)")
    p.add_argument("--betas", type=float, nargs=2, help="adam/adamw/lion: β1 β2 (default: the optimizer's own)")
    p.add_argument("--eps", type=float, help="adam/adamw: ε of the denominator (default 1e-8)")
    p.add_argument("--momentum", type=float, help="sgd: heavy-ball momentum (default 0.9)")
    p.add_argument("--dampening", type=float, help="momentum dampening (default 0)")
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float,
                   help="weight decay on every parameter: coupled L2 for sgd and adam (default 5e-4 / 0), "
                        "decoupled for adamw and lion (default 1e-2 / 0)")
    p.add_argument("--schedule", choices=["constant", "multistep", "cosine"], help="lr schedule (default constant)")
    p.add_argument("--milestones", type=float, nargs="+", help="multistep: epochs (steps with --steps)")
    p.add_argument("--gamma", type=float, help="multistep: lr factor at each milestone (default 0.1)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 + GradScaler on CUDA, bfloat16 on CPU)")
    p.add_argument("--workers", type=int, help="data-loading processes for folders (default min(4, CPUs))")
    p.add_argument("--log-every", type=int, help="keep every N-th step in the history (default: ~1000 rows)")
    p.add_argument("--hook", choices=["optimizer", "backward"], default="optimizer",
                   help="where the tracker reads the tensors (see SymmetryTracker)")
    p.add_argument("--eval-batches", type=int, help="evaluate on at most this many test batches")
    _add_common(p, None)


def train_config(args) -> RunConfig:
    """The RunConfig of ``neural-mechanics train``: the preset, then every option given explicitly."""
    c = RunConfig(command="train")
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            setattr(c, k, v)
        c.preset = args.preset
        if args.data is None:
            raise ValueError(f"--preset {args.preset} needs --data DIR: {TINY_IMAGENET_HINT} "
                             "(or --data generated for a smoke test)")
    explicit = {"model": args.model, "data": args.data, "image_size": args.image_size, "epochs": args.epochs,
                "optimizer": args.optimizer, "lr": args.lr, "betas": args.betas, "eps": args.eps,
                "momentum": args.momentum, "dampening": args.dampening, "nesterov": args.nesterov,
                "weight_decay": args.weight_decay, "schedule": args.schedule, "milestones": args.milestones,
                "gamma": args.gamma, "workers": args.workers, "log_every": args.log_every,
                "eval_batches": args.eval_batches, "batch_size": args.batch_size}
    for k, v in explicit.items():
        if v is not None:
            setattr(c, k, v)
    c.steps = args.steps
    c.num_classes, c.train_samples = args.num_classes, args.train_samples
    c.amp, c.exact, c.seed, c.device, c.out = args.amp, args.exact, args.seed, args.device, args.out
    c.progress, c.report, c.hook, c.tensorboard = args.progress, args.report, args.hook, args.tensorboard
    c.calibrate_steps, c.flush_every = args.calibrate_steps, args.flush_every
    return c


def train_main(args) -> int:
    """``neural-mechanics train``."""
    try:
        c = train_config(args)
    except ValueError as exc:
        print(f"neural-mechanics train: error: {exc}", file=sys.stderr)
        return 2
    return _run(c)


def _run(c: RunConfig) -> int:
    prog = f"neural-mechanics {c.command}"
    try:
        run_dir = run_training(c)
    except KeyboardInterrupt as exc:
        run_dir = exc.args[0] if exc.args else None
        print(f"\n{prog}: interrupted.", file=sys.stderr)
        if run_dir and os.path.exists(os.path.join(run_dir, "summary.json")):
            print(format_summary(run_dir))
            print(f"The run folder {run_dir} holds everything up to the interruption; "
                  f"`neural-mechanics report {run_dir}` redraws it.", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"{prog}: error: {exc}. The run folder holds the metrics up to that step; "
              f"`neural-mechanics report DIR` draws them.", file=sys.stderr)
        return 1
    print(format_summary(run_dir))
    return 0
