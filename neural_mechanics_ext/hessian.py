"""Hessian constraints of the symmetries (THEORY.md §1.1) and the projections of §3(b), per group.

Every symmetry fixes how the Hessian H of the minibatch loss acts on its generator u_A:

=============  ===================  ==========================================
kind           generator u_A        H u_A  (= t_A, supported on A)
=============  ===================  ==========================================
translation    1_A                  0
scale          θ_A                  −g_A
rescale        D_A θ = θ_A1 − θ_A2  −D_A g = −(g_A1 − g_A2)
=============  ===================  ==========================================

(D_A = diag of +1 on A1 and on a scale or translation group, −1 on A2, 0 elsewhere.)

**One Hessian-vector product per kind.**  With a random coefficient w_B per group, v = Σ_B w_B u_B and
the target T = Σ_B w_B t_B.  H is linear, so r = H v − T = Σ_B w_B (H u_B − t_B) is zero exactly when
every group of the kind satisfies its constraint, whether or not groups overlap (a Linear weight is the
outgoing side of one rescale family and the incoming side of the next).  For scale and rescale
v = c ⊙ θ and T = −c ⊙ g with c = Σ_B w_B D_B per element (translation: v = c, T = 0), so
v, T and r are built elementwise.  Per group A the check reports |r_A|, r restricted to A.

The coefficients are w_B = ±(1 + U[0, 1)): random signs, so that one group's violation
e_B = H u_B − t_B is not cancelled by another's (over the signs E|r_A|² = Σ_B w_B²|(e_B)_A|²), and random
magnitudes, because signs alone miss structured false families: the rows of a classifier declared as
translation groups have generators that sum to the whole weight, a true translation, so with ±1 they
pass whenever every sign agrees (probability 2^(1−K)); with continuous magnitudes a cancellation has
probability zero.

**Isolation.**  H spreads a false family's violation over every group it couples to, so true families of
the same kind can fail beside it.  When a kind has several families and some fail, each failing family
is measured again alone (one product each, ``isolate=True``); its verdict comes from that product and
``isolated`` is set.  This costs nothing when every family passes.

**Scale of the residual.**  A first-order estimate of how large H u_A would be if A were not a symmetry
(H ~ g/θ): ``den_A = |w_A| · G_A · |u_A| / Θ_A`` with ``G_A = max(|g_A|, ḡ·sqrt|A|)`` and
``Θ_A = max(|θ_A|, θ̄·sqrt|A|)``, ḡ and θ̄ the RMS gradient and parameter element over all trainable
parameters.  For scale and rescale |u_A| = |θ_A|, so den_A = |w_A|·G_A (the size of the target w_A t_A)
unless θ_A is negligible; for translation |u_A| = sqrt|A|.  The floors keep groups whose gradient is
zero in exact arithmetic (a bias in front of BatchNorm) or whose parameters are zero (a classifier bias
at init) from dividing a rounding residue by itself, as the gradient proof does.  The residual is
``|r_A| / den_A``: ~1e-16..1e-13 for exact symmetries in float64, 0.02..30 for false ones.

**Tolerances** (``TOLERANCE``; ``tolerance=`` overrides): 1e-8 in float64, 1e-3 in float32.  Measured at
init on torchvision vgg16_bn and resnet18 (batch 4–8, 32×32, BatchNorm scale families with eps → 0)
and MLPs: true families reach at most 2e-13 in float64 and 5e-5 in float32 (1e-12 and 3e-4 when a
BatchNorm normalises only 4 values: resnet18's 1×1 layer4 at batch 4); the false families of the tests (a ReLU6 unit,
BatchNorm in eval mode, classifier rows declared as translation groups, input columns declared as a
rescale's incoming side, a scale family without a normaliser) reach 0.5–26, and the weakest false
families seen 2e-2–6e-2 (a conv bias in front of BatchNorm in eval mode as a translation group; the
input columns of a hidden layer of a wide MLP as translation groups).  The float32 tolerance sits 20×
above the worst true residual at 8+ values per normalised set and 20× below the weakest false one.
Half precision is refused (check a float32 copy).

**Normalisers' eps** (BatchNorm, LayerNorm, GroupNorm, ...) makes scale symmetries approximate: the
Hessian residual at eps = 1e-5 is 1e-3..1e-2 on vgg16_bn and resnet18 at init, 10–100× the gradient
proof's Σ eps/(var+eps) and growing with the number of values per normalised set, so no eps-aware
tolerance separates it reliably from a false family.  When the model calls a normaliser and the check has scale
families, the scale kind therefore gets a second forward pass with every normaliser's eps replaced by
``EPS_LIMIT`` (the function mode of :mod:`~neural_mechanics_ext.symmetry.eps_limit`) and one product on it:
there the symmetry is exact, and that residual is the verdict (``residuals``, ``max_residual``), which
proves the structure; the model's own eps is measured on the model's pass and reported beside it
(``max_residual_model_eps``, and a note).  Translation and rescale symmetries are exact at any eps.
BatchNorm in eval mode fails in both passes.

**Curvature along the generator** (``curvature``): analytic ⟨u_A, t_A⟩ = 0 (translation), −⟨θ_A, g_A⟩
(scale, where the gradient constraint makes it 0; rescale, where it is the unsigned inner product over
A1 ∪ A2).  Measured: ``analytic + ⟨u_A, r_A⟩ / w_A``, whose mean over the signs is ⟨u_A, H u_A⟩ exactly
(overlaps included); it equals ⟨u_A, H u_A⟩ whenever the other groups of the product satisfy their
constraints and do not overlap A.

**Projections of §3(b)** (``projections=True``, one more product, with the full gradient: H g):
measured ⟨u_A, (Hg)_A⟩ against the analytic ⟨t_A, g⟩ = 0 (translation), −|g_A|² (scale),
−(|g_A1|² − |g_A2|²) (rescale), values the tracker has every step from first-order moments; their
relative difference ``|meas − analytic| / (|u_A| · max(|(Hg)_A|, h̄·sqrt|A|) + G_A² |u_A| / Θ_A)`` (h̄
the RMS of H g over the families' tensors); and the measured ⟨g_A, (Hg)_A⟩, the group's share of gᵀHg
(no analytic value).  Taken on the model's pass, so at the model's eps.  Reported, not part of the
verdict.

**One fused reduction.**  All per-group numbers come from one ``slice_moments`` call (a second one
only for isolated families): per kind x = θ, y = r, z = g over the kind's
:class:`~neural_mechanics_ext.plan.MomentPlan` (|r_A|² = yy, |g_A|² = zz, |θ_A|² = xx,
⟨u_A, r_A⟩ = signed xy (translation: y), ⟨θ_A, g_A⟩ = xz), for the projections x = H g, y = θ,
z = g, and whole-tensor rows for the floors (x = θ, y = g; x = H g).

**HVP method.**  Double backward: one forward pass and one ``autograd.grad(create_graph=True)``,
then one ``autograd.grad(g, θ, grad_outputs=v, retain_graph=True)`` per product, all on the same graph:
BatchNorm's batch statistics and dropout masks are the same for every product, and BatchNorm in train
mode works as it is.  Forward-over-reverse (``torch.func.jvp`` of ``grad``) needs a forward and a
backward per product, and refuses BatchNorm's running-statistics update (it needs a model copy with
``replace_all_batch_norm_modules_``, and could not check BatchNorm in eval mode as it is).  Measured
per product on CPU (minimum of 3–5 runs): MLP 0.012 s (+ 0.014 s for the shared graph) against
0.03–0.6 s; resnet18 0.59 s (+ 0.22 s) against 1.36 s; vgg16_bn with its 120 M-parameter classifier
8.5 s (+ 4.0 s) against 7.3 s, the one case where forward-over-reverse was cheaper.  Batching the
products (``is_grads_batched``) was slower on CPU.

**The model is never modified.**  The check runs on the model as it is (dtype, device, train/eval
modes) through ``torch.func.functional_call`` with cloned buffers, so BatchNorm running statistics and
counters stay untouched; gradients come from ``torch.autograd.grad`` (``.grad`` is never written); the
global RNG is forked and seeded (``seed``), so dropout is reproducible and the caller's random stream
is unchanged.

**Cost.**  One forward pass with a create-graph backward (two with normalisers and scale families), one
product per kind, one for the projections (``projections=False`` saves it), one per isolated family
(only when some fail), one fused reduction.  Measured on a shared 2-core CPU in float32, in training
steps (forward + backward + SGD step on the same batch): MLP (1.7 M parameters, batch 16) 6.9, 4.5
without projections, stable over runs.  BatchNorm conv nets (demo, resnet18, the paper's vgg16_bn;
batch 8–16, 32×32): medians over paired runs 17–22 steps (9–18 without projections), single runs 6–30
as the machine's load varied.  In back-to-back profiles a product costs 1.7 (resnet18) to 3
(torchvision's vgg16_bn) steps, the double backward of convolution and BatchNorm being slow on CPU, and
the graph pass 1–1.4.  ``neural-mechanics check`` prints the ratio for a preset.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from . import ops
from .plan import MomentPlan
from .schema import KINDS
from .symmetry.family import SymmetryFamily
from .symmetry.eps_limit import NormaliserWatch
from .symmetry.prove import plan_moments, validate_families
from .symmetry.residual import family_residuals
from .views import strided

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
METHOD = "double-backward"

# Columns of slice_moments (MOMENTS).
X, Y, Z, XX, YY, ZZ, XY, XZ = range(8)


class HessianReport(list):
    """The result of :func:`hessian_check`: a list of dicts, one per family, plus how it was measured.

    Attributes:
        seconds: wall time of the check (forward passes, products, the fused reduction).
        products: number of Hessian-vector products taken.
        passes: number of forward + create-graph backward passes (2 when the eps → 0 pass ran).
        method: ``"double-backward"``.
        dtype, device: of the parameters the check ran on.
        normalisers: whether the forward pass called a normaliser (BatchNorm, LayerNorm, ...).
    """

    seconds: float = 0.0
    products: int = 0
    passes: int = 0
    method: str = METHOD
    dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None
    normalisers: bool = False

    def table(self) -> str:
        """A plain-text table, one row per family (see :func:`format_report`)."""
        return format_report(self)

    @property
    def passed(self) -> bool:
        return all(r["passed"] for r in self)


# ---------------------------------------------------------------------------------------------- the check
def hessian_check(model: nn.Module, families: Optional[Sequence[SymmetryFamily]],
                  loss_fn: Callable[[Any, Any], torch.Tensor], batch, *, tolerance: Optional[float] = None,
                  projections: bool = True, isolate: bool = True, seed: int = 0) -> "HessianReport":
    """Check the Hessian constraint of every group of every family on one batch (THEORY.md §1.1).

    Args:
        model: the model, checked as it is (dtype float32 or float64, device, train/eval modes); never
            modified: parameters, ``.grad``, buffers (BatchNorm running statistics), modes and the global
            RNG state are the same afterwards.
        families: the families to check (``tracker.families``, ``find_symmetries(...)``, or manual
            :class:`SymmetryFamily` objects); ``None`` finds them with
            ``find_symmetries(model, inputs, loss=loss_fn, targets=targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch: ``(inputs, targets)``; ``inputs`` is a tensor, a tuple of positional inputs or a dict of
            keyword inputs.
        tolerance: one tolerance for every family instead of ``TOLERANCE[dtype]``.
        projections: also take H g and report the projections of §3(b) (one more product).
        isolate: when a kind has several families and some fail, re-measure each failing family alone
            (one product each), so that a false family's violation, which H spreads over the other
            groups of its kind, does not fail the true ones.
        seed: seed of the random coefficients and of the forked RNG (dropout) of the forward passes.

    Returns:
        a :class:`HessianReport` (a list) with one dict per family, in the order given:
        ``family``, ``kind``, ``groups``, ``max_residual``, ``median_residual``, ``tolerance``,
        ``passed``, ``failing_groups`` (indices of the groups above tolerance), ``note`` (why it
        failed, or what makes it approximate), ``residuals`` (numpy [K]), ``coefficients`` (w, numpy [K]),
        ``isolated`` (measured alone, see ``isolate``), ``curvature`` ({"measured", "analytic"}: numpy
        [K]), ``gradient_residual`` (largest gradient-constraint residual on this batch, as in the
        proof); for scale families of a model with normalisers, where the residuals are those with
        eps → 0, also ``residuals_model_eps`` / ``max_residual_model_eps``; with ``projections``:
        ``projection`` ({"measured", "analytic", "error"}: numpy [K]), ``max_projection_error`` and
        ``gradient_curvature`` (⟨g_A, (Hg)_A⟩, numpy [K]).

    Raises:
        KeyError / ValueError for families that do not match the model (as ``prove_families``),
        TypeError for a model that is not float32 or float64 or a loss that is not a scalar.
    """
    start = time.perf_counter()
    args, kwargs, targets = _split_batch(batch)
    if families is None:
        from .symmetry import find_symmetries
        families = find_symmetries(model, kwargs if kwargs else args, loss=loss_fn, targets=targets)
    families = list(families)
    report = HessianReport()
    if not families:
        return report
    ck = _Check(model, families, tolerance, seed)
    graph = _Graph(model, args, kwargs, targets, loss_fn, ck.trainable, seed, eps_limit=False)
    graphs = {"model": graph}
    if "scale" in ck.kinds and graph.normalisers:
        graphs["limit"] = _Graph(model, args, kwargs, targets, loss_fn, ck.trainable, seed, eps_limit=True)
    ck.verdict_graph = {k: "limit" if (k == "scale" and "limit" in graphs) else "model" for k in ck.kinds}
    moments, floors, products, plan_p = _products(ck, graphs, projections)
    per_family: Dict[int, Dict[str, Any]] = {id(f): {"isolated": False} for f in families}
    _kind_results(ck, moments, floors, per_family)
    if projections:
        _projection_results(plan_p, moments[("projection", None)], floors, per_family)
    if isolate:
        products += _isolate(ck, graphs, floors, per_family)
    for g in graphs.values():
        g.release()

    for f in families:
        report.append(_verdict(f, per_family[id(f)], ck.tol))
    if ck.device.type == "cuda":
        torch.cuda.synchronize(ck.device)
    report.seconds = time.perf_counter() - start
    report.products, report.passes = products, len(graphs)
    report.dtype, report.device, report.normalisers = ck.dtype, ck.device, graph.normalisers
    return report


class _Check:
    """What the phases of one check share: the families by kind, their plans and random coefficients."""

    def __init__(self, model, families, tolerance, seed):
        validate_families(model, families)
        self.named = dict(model.named_parameters(remove_duplicate=False))
        self.trainable = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        used = list({id(self.named[n]): self.named[n] for f in families for n in f.param_names}.values())
        dtypes, devices = {p.dtype for p in used}, {p.device for p in used}
        if len(devices) != 1:
            raise ValueError(f"hessian_check: the families' parameters are on several devices "
                             f"{sorted(map(str, devices))}")
        if len(dtypes) != 1 or next(iter(dtypes)) not in TOLERANCE:
            raise TypeError(f"hessian_check: needs float32 or float64 parameters, got {sorted(map(str, dtypes))}; "
                            f"check a float32 copy (copy.deepcopy(model).float()) of a half-precision model")
        self.families = families
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.tol = float(tolerance) if tolerance is not None else TOLERANCE[self.dtype]
        self.by_kind = {k: [f for f in families if f.kind == k] for k in KINDS}
        self.kinds = [k for k in KINDS if self.by_kind[k]]
        self.plans = {k: MomentPlan(self.by_kind[k], self.named).to(self.device) for k in self.kinds}
        gen = torch.Generator().manual_seed(seed)
        self.coeffs = {k: _draw_coefficients(self.plans[k].num_groups, gen) for k in self.kinds}
        self.verdict_graph: Dict[str, str] = {}


@dataclass
class _Floors:
    """Mean squared θ, g (and H g) over the trainable parameters: the scale of a residual's denominator."""
    theta_bar2: float = float("nan")
    g_bar2: float = float("nan")
    hg_bar2: float = float("nan")


def _products(ck: _Check, graphs, projections: bool):
    """One Hessian-vector product per kind (the scale kind again with eps → 0), H g for the
    projections, and the floors, all reduced in one fused call."""
    graph = graphs["model"]
    entries: List[_Entry] = [_kind_entry(("model", k), graph, ck.plans[k], ck.named, k, ck.coeffs[k])
                             for k in ck.kinds]
    if "limit" in graphs:
        entries.append(_kind_entry(("limit", "scale"), graphs["limit"], ck.plans["scale"], ck.named, "scale",
                                   ck.coeffs["scale"]))
    plan_p = None
    if projections:
        plan_p = MomentPlan(ck.families, ck.named).to(ck.device)
        gs = [graph.g(p) for p in plan_p.params]
        entries.append(_Entry(("projection", None), plan_p, graph.hvp(plan_p.params, gs), list(plan_p.params), gs))
    products = len(entries)
    whole = [[(1, 1, p.numel())] for p in ck.trainable]
    tails = [_Entry(("floors", None), None, list(ck.trainable), [graph.g(p) for p in ck.trainable],
                    [None] * len(ck.trainable), views=whole)]
    if projections:
        tails.append(_Entry(("hg floor", None), None, entries[-1].xs, entries[-1].ys, [None] * len(entries[-1].xs),
                            views=[[(1, 1, p.numel())] for p in plan_p.params]))
    moments = _reduce(entries + tails)
    floors = _Floors()
    tail = moments.pop(("floors", None))
    count = max(sum(p.numel() for p in ck.trainable), 1)
    floors.theta_bar2, floors.g_bar2 = float(tail[:, XX].sum()) / count, float(tail[:, YY].sum()) / count
    if projections:
        tail = moments.pop(("hg floor", None))
        floors.hg_bar2 = float(tail[:, XX].sum()) / max(sum(p.numel() for p in plan_p.params), 1)
    return moments, floors, products, plan_p


def _kind_results(ck: _Check, moments, floors: _Floors, per_family) -> None:
    """Per family: residuals, curvatures and the gradient residual on this batch."""
    for k in ck.kinds:
        plan = ck.plans[k]
        s, u = moments[("model", k)]
        n = plan.counts.to(s.device)
        coeff = ck.coeffs[k].to(s.device)
        res, curv_m, curv_a = _kind_numbers(k, s, u, n, floors.g_bar2, floors.theta_bar2, coeff)
        grad_res = family_residuals(plan.families, plan, s, u, n, floors.g_bar2, (Z, ZZ, XZ))
        res0 = None
        if ck.verdict_graph[k] == "limit":
            # floors from the model's pass: with eps → 0 a dead channel's gradient explodes (see prove.py)
            s0, u0 = moments[("limit", k)]
            res0 = _kind_numbers(k, s0, u0, n, floors.g_bar2, floors.theta_bar2, coeff)[0]
        for i, f in enumerate(plan.families):
            sl = slice(plan.offsets[i], plan.offsets[i] + f.num_groups)
            d = per_family[id(f)]
            d["coefficients"] = ck.coeffs[k][sl].numpy()
            d["curvature"] = {"measured": curv_m[sl].cpu().numpy(), "analytic": curv_a[sl].cpu().numpy()}
            d["gradient_residual"] = float(grad_res[i].max()) if f.num_groups else 0.0
            if res0 is None:
                d["residuals"] = res[sl].cpu().numpy()
            else:
                # the verdict is taken where the symmetry is exact; the model's eps is reported beside it
                d["residuals"] = res0[sl].cpu().numpy()
                d["residuals_model_eps"] = res[sl].cpu().numpy()
                d["max_residual_model_eps"] = float(res[sl].max()) if f.num_groups else 0.0


def _projection_results(plan_p: MomentPlan, moments, floors: _Floors, per_family) -> None:
    """Per family: the projections of H g along the generators (THEORY.md §3(b)), measured and analytic."""
    s, u = moments
    n = plan_p.counts.to(s.device)
    for i, f in enumerate(plan_p.families):
        sl = slice(plan_p.offsets[i], plan_p.offsets[i] + f.num_groups)
        meas, ana, err, gcurv = _projection_numbers(f.kind, s[sl], u[sl], n[sl], floors.g_bar2, floors.theta_bar2,
                                                    floors.hg_bar2)
        d = per_family[id(f)]
        d["projection"] = {"measured": meas.cpu().numpy(), "analytic": ana.cpu().numpy(),
                           "error": err.cpu().numpy()}
        d["max_projection_error"] = float(err.max()) if err.numel() else 0.0
        d["gradient_curvature"] = gcurv.cpu().numpy()


def _isolate(ck: _Check, graphs, floors: _Floors, per_family) -> int:
    """A failing family of a kind with several families is measured alone: H spreads a false family's
    violation over the other groups of its kind.  Returns the number of extra products."""
    alone = []
    for k in ck.kinds:
        if len(ck.by_kind[k]) < 2:
            continue
        for i, f in enumerate(ck.plans[k].families):
            if not (per_family[id(f)]["residuals"] <= ck.tol).all():
                sub = MomentPlan([f], ck.named).to(ck.device)
                w = ck.coeffs[k][ck.plans[k].offsets[i]:ck.plans[k].offsets[i] + f.num_groups]
                alone.append((f, w, _kind_entry((id(f), k), graphs[ck.verdict_graph[k]], sub, ck.named, k, w)))
    if not alone:
        return 0
    moments = _reduce([e for _, _, e in alone])
    for f, w, e in alone:
        s, u = moments[e.key]
        n = e.plan.counts.to(s.device)
        res, curv_m, curv_a = _kind_numbers(f.kind, s, u, n, floors.g_bar2, floors.theta_bar2, w.to(s.device))
        d = per_family[id(f)]
        d["residuals"], d["isolated"] = res.cpu().numpy(), True
        if ck.verdict_graph[f.kind] == "model":
            d["curvature"] = {"measured": curv_m.cpu().numpy(), "analytic": curv_a.cpu().numpy()}
    return len(alone)


class _Entry:
    """x, y, z tensors over a plan's tensors for the fused reduction, and where the result goes."""

    def __init__(self, key, plan: Optional[MomentPlan], xs, ys, zs, views=None):
        self.key, self.plan, self.xs, self.ys, self.zs = key, plan, xs, ys, zs
        self.views = plan.views if views is None else views
        self.rows = plan.num_slices if plan is not None else sum(v[1] for vs in self.views for v in vs)


def _reduce(entries: Sequence[_Entry]) -> Dict[Any, Any]:
    """One fused ``slice_moments`` call over every entry; per entry its (signed, unsigned) group
    moments, or the raw rows for an entry without a plan."""
    xs, views, ys, zs = [], [], [], []
    for e in entries:
        xs += e.xs
        views += e.views
        ys += e.ys
        zs += e.zs
    S = plan_moments(_Fused(xs, views), ys, zs)
    out, row = {}, 0
    for e in entries:
        part = S[row:row + e.rows]
        out[e.key] = part if e.plan is None else e.plan.group_moments(part)
        row += e.rows
    return out


def _kind_entry(key, graph: "_Graph", plan: MomentPlan, named, kind: str, coeff: torch.Tensor) -> _Entry:
    """The product of one kind and its moments' inputs: x = θ, y = r = H v − T, z = g."""
    r = _kind_residual(graph, plan, named, kind, coeff)
    return _Entry(key, plan, list(plan.params), r, [graph.g(p) for p in plan.params])


class _Fused:
    """The shape of a MomentPlan that ``plan_moments`` needs, over arbitrary x tensors: one fused call."""

    def __init__(self, xs, views):
        self.params, self.views = xs, views

    def slice_moments(self, ys, zs):
        return ops.slice_moments(self.params, self.views, ys, zs)


class _Graph:
    """One forward pass (cloned buffers, forked seeded RNG) and the gradient with its graph."""

    def __init__(self, model, args, kwargs, targets, loss_fn, trainable, seed, eps_limit):
        buffers = {n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)}
        device = trainable[0].device if trainable else torch.device("cpu")
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        watch = NormaliserWatch(eps_limit)
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)
            with watch:
                out = functional_call(model, buffers, args, kwargs, strict=False)
            loss = loss_fn(out, targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("hessian_check: loss_fn(outputs, targets) must return a scalar tensor")
            grads = torch.autograd.grad(loss, trainable, create_graph=True, allow_unused=True)
        self.normalisers = watch.seen
        self._g = {id(p): (torch.zeros_like(p) if g is None else g) for p, g in zip(trainable, grads)}

    def g(self, p: torch.Tensor) -> torch.Tensor:
        """The gradient of ``p``, detached."""
        return self._g[id(p)].detach()

    def hvp(self, params: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """(H v) restricted to ``params``, for v supported on ``params``: one double-backward pass, the
        graph kept for the next product until :meth:`release`."""
        outs, grads_out = [], []
        for p, v in zip(params, vs):
            g = self._g[id(p)]
            if g.requires_grad:  # a gradient that does not depend on θ contributes nothing
                outs.append(g)
                grads_out.append(v)
        if not outs:
            return [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            hv = torch.autograd.grad(outs, list(params), grad_outputs=grads_out, retain_graph=True,
                                     allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]

    def release(self):
        """Drop the graph (the gradients stay, detached)."""
        self._g = {k: g.detach() for k, g in self._g.items()}


def _coefficients(plan: MomentPlan, named: Dict[str, torch.Tensor], coeff: torch.Tensor) -> List[torch.Tensor]:
    """c = Σ_B w_B D_B per element of each plan tensor (D_B: ±1 on group B's members, 0 elsewhere)."""
    index = {id(p): t for t, p in enumerate(plan.params)}
    cs = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in plan.params]
    for fi, f in enumerate(plan.families):
        w = coeff[plan.offsets[fi]:plan.offsets[fi] + f.num_groups]
        for p, view, s in f.resolve(named):
            c = cs[index[id(p)]]
            strided(c.view(-1), view).add_((s * w).to(device=c.device, dtype=c.dtype).view(1, view[1], 1))
    return cs


def _kind_residual(graph: "_Graph", plan: MomentPlan, named: Dict[str, torch.Tensor], kind: str,
                   coeff: torch.Tensor) -> List[torch.Tensor]:
    """r = H v − T over the plan's tensors for v = Σ w_B u_B (THEORY.md §1.1, module docstring)."""
    cs = _coefficients(plan, named, coeff)
    vs = cs if kind == "translation" else [c * p.detach() for c, p in zip(cs, plan.params)]
    hv = graph.hvp(plan.params, vs)
    del vs
    if kind == "translation":
        return hv
    return [h.addcmul_(c, graph.g(p)) for h, c, p in zip(hv, cs, plan.params)]  # H v + c ⊙ g = H v − T


def _draw_coefficients(count: int, gen: torch.Generator) -> torch.Tensor:
    """w_B = ±(1 + U[0, 1)): random signs with random magnitudes (see the module docstring)."""
    sign = torch.randint(0, 2, (count,), generator=gen) * 2 - 1
    return sign.to(torch.float64) * (1 + torch.rand(count, generator=gen, dtype=torch.float64))


def _kind_numbers(kind, s, u, n, g_bar2, theta_bar2, coeff):
    """Residual, curvature (measured, analytic) per group from x = θ, y = r, z = g moments."""
    rnorm = torch.sqrt(u[:, YY])
    gnorm = torch.sqrt(torch.maximum(u[:, ZZ], g_bar2 * n))
    tnorm = torch.sqrt(torch.maximum(u[:, XX], theta_bar2 * n))
    unorm = torch.sqrt(n) if kind == "translation" else torch.sqrt(u[:, XX])
    den = coeff.abs() * gnorm * unorm / tnorm
    res = torch.where(rnorm == 0, torch.zeros_like(rnorm), rnorm / den)
    if kind == "translation":
        analytic = torch.zeros_like(rnorm)
        projected = s[:, Y]          # ⟨1_A, r⟩
    else:
        analytic = -u[:, XZ]         # ⟨u_A, t_A⟩ = −⟨D θ, D g⟩ = −⟨θ, g⟩ over A
        projected = s[:, XY]         # ⟨D_A θ, r⟩
    measured = analytic + projected / coeff
    return res, measured, analytic


def _projection_numbers(kind, s, u, n, g_bar2, theta_bar2, hg_bar2):
    """⟨u_A, (Hg)_A⟩ measured and analytic, their relative difference, and ⟨g_A, (Hg)_A⟩, from x = Hg,
    y = θ, z = g moments."""
    gnorm2 = torch.maximum(u[:, ZZ], g_bar2 * n)
    tnorm = torch.sqrt(torch.maximum(u[:, YY], theta_bar2 * n))
    if kind == "translation":
        measured, analytic, unorm = s[:, X], torch.zeros_like(s[:, X]), torch.sqrt(n)
    else:
        measured, analytic, unorm = s[:, XY], -s[:, ZZ], torch.sqrt(u[:, YY])
    den = unorm * torch.sqrt(torch.maximum(u[:, XX], hg_bar2 * n)) + gnorm2 * unorm / tnorm
    diff = (measured - analytic).abs()
    err = torch.where(diff == 0, torch.zeros_like(diff), diff / den)
    return measured, analytic, err, u[:, XZ]


def _verdict(f: SymmetryFamily, d: Dict[str, Any], tol: float) -> Dict[str, Any]:
    """max/median residual, failing groups, verdict and note of one family."""
    res = d["residuals"]
    finite = bool(np.isfinite(res).all())
    out: Dict[str, Any] = {"family": f.name, "kind": f.kind, "groups": f.num_groups,
                           "max_residual": (float(res.max()) if res.size else 0.0) if finite else float("inf"),
                           "median_residual": float(np.median(res)) if res.size else 0.0,
                           "tolerance": tol}
    out["failing_groups"] = [int(i) for i in np.nonzero(~(res <= tol))[0]]
    out["passed"] = not out["failing_groups"]
    note = None
    if not out["passed"]:
        worst = out["failing_groups"][int(np.argmax(np.where(np.isfinite(res), res, np.inf)[out["failing_groups"]]))]
        note = (f"Hessian constraint fails: residual {out['max_residual']:.2e} > tolerance {tol:.0e} in "
                f"{len(out['failing_groups'])} of {f.num_groups} groups (worst: group {worst})")
        if "residuals_model_eps" in d:
            note += " even with normaliser eps → 0"
    elif d.get("max_residual_model_eps", 0.0) > tol:
        note = (f"exact as normaliser eps → 0; approximate at the model's eps: residual "
                f"{d['max_residual_model_eps']:.1e}")
    out["note"] = note
    out.update({k: v for k, v in d.items() if k not in out})
    return out


def _split_batch(batch) -> Tuple[tuple, dict, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise TypeError("hessian_check: batch must be (inputs, targets)")
    inputs, targets = batch
    if isinstance(inputs, dict):
        return (), dict(inputs), targets
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs), {}, targets
    return (inputs,), {}, targets


# ---------------------------------------------------------------------------------------------- report
def format_report(report: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table of a :func:`hessian_check` result: one row per family (kind, groups, max and
    median residual, tolerance, failing groups, verdict), then the notes."""
    head = ("family", "kind", "groups", "max res", "median", "tol", "failing", "model-eps", "proj err", "verdict")
    rows = []
    notes = []
    for r in report:
        failing = r["failing_groups"]
        shown = ",".join(str(i) for i in failing[:4]) + (f",+{len(failing) - 4}" if len(failing) > 4 else "")
        meps = r.get("max_residual_model_eps")
        proj = r.get("max_projection_error")
        rows.append((r["family"], r["kind"], str(r["groups"]), f"{r['max_residual']:.1e}",
                     f"{r['median_residual']:.1e}", f"{r['tolerance']:.0e}", shown or "-",
                     "-" if meps is None else f"{meps:.1e}", "-" if proj is None else f"{proj:.1e}",
                     "pass" if r["passed"] else "FAIL"))
        if r.get("note"):
            notes.append(f"  {r['family']}: {r['note']}")
    if not rows:
        return "(no symmetry families)"
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]

    def line(x):
        return "  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip()

    out = [line(head), line(tuple("-" * w for w in widths))] + [line(x) for x in rows]
    if notes:
        out += ["notes:"] + notes
    return "\n".join(out)
