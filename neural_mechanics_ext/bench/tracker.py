"""The tracker part: a full training step with no tracker, a naive hand-written tracker, and
``SymmetryTracker`` in both hook modes, under each optimizer asked for (SGD, AdamW, ...), measured by
:mod:`neural_mechanics_ext.app.overhead` (the same measurement as ``train``'s direct overhead)."""
from __future__ import annotations

import dataclasses
import gc
import importlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .. import SymmetryTracker, find_symmetries
from ..app.models import demo_net, vgg16_bn
from ..app.overhead import interleaved_blocks, overhead_summary
from ..app.report import optimizer_text
from ..app.runner import OPTIMIZERS, PRESETS, RunConfig, make_optimizer
from ..theory import optimizer_family, state_step, step_hyper, update_direction
from ..views import full, strided
from .params import fmt_count
from .timing import Deadline

TRACKER_VARIANTS = ("none", "naive", "ours-optimizer", "ours-backward")
TRACKER_OPTIMIZERS = ("sgd", "adamw")   # the default of --optimizers; any name of app.runner.OPTIMIZERS works


@dataclass
class Workload:
    """A training step to time: a model factory (same initial weights every call), one fixed batch,
    the loss, the SGD settings, and how the batch was chosen."""
    name: str
    make_model: Callable[[], torch.nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable = torch.nn.functional.cross_entropy
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    note: str = ""
    families: Optional[list] = None
    flush_every: Optional[int] = None   # the tracker's flush interval in this workload's real use

    def optimizer_config(self, name: str) -> RunConfig:
        """The settings of optimizer ``name`` (a key of ``app.runner.OPTIMIZERS``): SGD with this
        workload's, any other with ``neural-mechanics train --optimizer NAME``'s defaults."""
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
        if name == "sgd":
            return RunConfig(optimizer="sgd", lr=self.lr, momentum=self.momentum,
                             weight_decay=self.weight_decay).resolved()
        return RunConfig(optimizer=name).resolved()


def _fixed_batch(batch: int, size: int, classes: int, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return x, y


def _seeded(build: Callable[[], torch.nn.Module], device) -> Callable[[], torch.nn.Module]:
    def make():
        torch.manual_seed(0)
        return build().to(device)
    return make


def vgg16_bn_workload(device, batch: int = 128, size: int = 64, classes: int = 200) -> Workload:
    """The paper's VGG-16-BN (``models.vgg16_bn``, what ``train --preset paper-vgg16-bn-momentum``
    trains) with that preset's SGD settings, on one Tiny-ImageNet-shaped batch."""
    p = PRESETS["paper-vgg16-bn-momentum"]
    x, y = _fixed_batch(batch, size, classes, device)
    return Workload(f"vgg16_bn b{batch} {size}x{size}", _seeded(lambda: vgg16_bn(classes, image_size=size), device),
                    x, y, lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"],
                    note=f"models.vgg16_bn (the paper's VGG-16-BN, {classes} classes), batch {batch} of 3x{size}x{size} "
                         "(Tiny ImageNet shape), one fixed batch")


def demo_workload(device, batch: Optional[int] = None) -> Workload:
    """The demo net as ``neural-mechanics demo`` trains it: ``models.demo_net()`` (3×32×32 inputs, 10
    classes) with the demo's batch size, SGD settings and tracker flush interval (``RunConfig``'s
    defaults), on one fixed batch."""
    c = RunConfig().resolved()
    batch = batch or c.batch_size
    make = _seeded(demo_net, device)
    x, _ = _fixed_batch(batch, 32, 10, device)
    with torch.no_grad():
        probe = make()
        classes = probe(x[:2]).shape[-1]
        params = sum(p.numel() for p in probe.parameters())
    _, y = _fixed_batch(batch, 32, classes, device)
    note = (f"models.demo_net ({fmt_count(params)} parameters), batch {batch} of 3x32x32, {classes} classes, "
            "one fixed batch")
    return Workload(f"demo_net b{batch}", make, x, y, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                    note=note, flush_every=c.flush_every)


def load_factory(spec: str) -> Callable[..., Workload]:
    """``module:callable`` → the callable (called with ``device``)."""
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--model wants MODULE:CALLABLE, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


class NaiveTracker:
    """What a user would write by hand: in an optimizer step pre-hook, for every member of every
    family, nine eager reductions over the ``(A, K, B)`` view of θ and the two tensors the tracker's
    theory reads beside it (SGD: g and the momentum buffer v; Adam, AdamW, Lion: the new first moment
    and the update direction u, formed eagerly per tensor by ``theory.update_direction``), in the
    parameters' dtype, summed into the family's groups with their signs, then brought to the host (one
    sync per family)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, families):
        self.optimizer = optimizer
        self.family = optimizer_family(optimizer)
        named = dict(model.named_parameters())
        self.families = [(f, [(named[n], v, s) for n, v, s in f.members]) for f in families]
        self._tracked = {id(p) for _, members in self.families for p, _, _ in members}
        self.history: List[List[list]] = []
        self._handle = optimizer.register_step_pre_hook(self._hook)

    def _streams(self, optimizer) -> Dict[int, tuple]:
        """Per tracked parameter (by id): the two flat tensors read beside θ at this step."""
        out = {}
        for group in optimizer.param_groups:
            for p in (p for p in group["params"] if id(p) in self._tracked):
                g = p.grad.view(-1) if p.grad is not None else torch.zeros_like(p).view(-1)
                state = optimizer.state.get(p, {})
                if self.family == "sgd":
                    buf = state.get("momentum_buffer")
                    out[id(p)] = (g, buf.view(-1) if buf is not None else torch.zeros_like(g))
                    continue
                hp = step_hyper(optimizer, group, step=state_step(state) + 1)
                out[id(p)] = tuple(t.reshape(-1) for t in update_direction(p.detach(), g.view_as(p), state, hp))
        return out

    @torch.no_grad()
    def _hook(self, optimizer, args, kwargs):
        streams = self._streams(optimizer)
        row = []
        for f, members in self.families:
            acc = None
            for p, view, sign in members:      # views of part of a tensor too
                cut = full(view, p.numel())
                y, z = (strided(t, cut) for t in streams[id(p)])
                x = strided(p.view(-1), cut)
                m = torch.stack([t.sum((0, 2)) for t in (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)], 1)
                acc = sign * m if acc is None else acc + sign * m
            row.append(acc.cpu().tolist())
        self.history.append(row)

    def close(self):
        self._handle.remove()


def tracker_overhead(workload: Workload, device: torch.device, *, rounds: int, block_steps: int,
                     warmup_steps: int, flush_every: int, variants: Sequence[str] = TRACKER_VARIANTS,
                     optimizers: Sequence[str] = TRACKER_OPTIMIZERS, deadline: Optional[Deadline] = None,
                     log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Training-step time of each variant under each optimizer, a JSON-ready record: the workload and
    its families, and per optimizer (``optimizers``, a list in that order) its settings and the
    variants' times and overheads (:func:`_optimizer_overhead`), each optimizer with its share of
    ``deadline``."""
    for name in optimizers:
        workload.optimizer_config(name)   # an unknown name fails before any time is spent
    families, setup = workload.families, {}
    if families is None:
        start = time.perf_counter()
        families = find_symmetries(workload.make_model(), workload.inputs[:4])
        setup["find_symmetries_s"] = time.perf_counter() - start
        log(f"    find_symmetries: {len(families)} families in {setup['find_symmetries_s']:.1f} s")
    named = dict(workload.make_model().named_parameters())
    rec = {"workload": workload.name, "note": workload.note, "device": str(device),
           "block_steps": block_steps, "warmup_steps": warmup_steps, "flush_every": flush_every,
           "families": len(families), "groups": sum(f.num_groups for f in families),
           "tracked_params": sum(named[n].numel() for n in {n for f in families for n in f.param_names}), **setup,
           "optimizers": []}
    for i, name in enumerate(optimizers):
        share = None if deadline is None else deadline.share(1, len(optimizers) - i)
        rec["optimizers"].append(_optimizer_overhead(workload, families, name, rounds=rounds, block_steps=block_steps,
                                                     warmup_steps=warmup_steps, flush_every=flush_every,
                                                     variants=variants, deadline=share))
    return rec


def _optimizer_overhead(workload: Workload, families, name: str, *, rounds: int, block_steps: int,
                        warmup_steps: int, flush_every: int, variants: Sequence[str],
                        deadline: Optional[Deadline]) -> Dict[str, Any]:
    """The variants on ONE model and ONE optimizer ``name``, in interleaved blocks of ``block_steps``
    steps (``app.overhead.interleaved_blocks``: one round = one block of every variant, order rotated
    per round; each block holds its tracker's processing)."""
    config = workload.optimizer_config(name)
    model = workload.make_model()
    model.train()
    opt = make_optimizer(model, config)

    def attach(v: str) -> Callable[[], Any]:
        if v == "naive":
            return lambda: NaiveTracker(model, opt, families)
        if v.startswith("ours-"):
            return lambda: SymmetryTracker(model, opt, families=families, hook=v.split("-", 1)[1],
                                           flush_every=flush_every)
        return lambda: None

    def step():
        opt.zero_grad(set_to_none=True)
        workload.loss_fn(model(workload.inputs), workload.targets).backward()
        opt.step()

    times = interleaved_blocks(step, {v: attach(v) for v in variants}, rounds=rounds, block_steps=block_steps,
                               warmup_steps=warmup_steps, stop=None if deadline is None else deadline.passed)
    rec = {"optimizer": name, "settings": optimizer_text(dataclasses.asdict(config)),
           "rounds": len(times.seconds[variants[0]]), "variants": overhead_summary(times)}
    del model, opt
    gc.collect()
    return rec
