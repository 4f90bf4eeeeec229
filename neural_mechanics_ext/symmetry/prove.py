"""Prove symmetry families numerically: the gradient constraint of THEORY.md §1.1, group by group.

The proof never touches the user's model: it runs on ``copy.deepcopy(model).double()``, in the mode
(train/eval) the model is in, on the example batch with random targets drawn from a fixed seed, under a
forked RNG.  Gradients come from ``torch.autograd.grad`` on the copy; the per-group inner products come
from one fused :class:`~neural_mechanics_ext.plan.MomentPlan` pass with ``x = θ`` and ``y = g``.

Residual of group ``A`` (``A = A1 ∪ A2`` for rescale), all sums over ``A``:

* translation: ``|Σ g| / (‖g‖ · sqrt|A|)``
* scale:       ``|⟨g, θ⟩| / (‖g‖ · ‖θ‖)``
* rescale:     ``|⟨g, θ⟩_A1 − ⟨g, θ⟩_A2| / (‖g‖ · ‖θ‖)``

A group whose gradient is exactly zero has residual 0.  A group whose gradient is *negligible*
(``‖g_A‖ < ḡ·sqrt|A|``, with ``ḡ`` the RMS gradient element over all trainable parameters) is measured
against ``ḡ·sqrt|A|`` instead of ``‖g_A‖``: the gradient of a bias in front of BatchNorm is zero in exact
arithmetic but a rounding residue in floating point, and dividing that residue by itself would report
a violation of 1.

Tolerances (the rule; ``find_symmetries(tolerance=...)`` / ``prove_families(tolerance=...)`` override):

* **Exact symmetries** (ReLU rescale, cross-entropy translation, the bias before a normaliser, a
  normaliser's affine against its consumers): ``EXACT_TOLERANCE = 1e-8``.  In float64 they measure
  ~1e-15; a wrong candidate measures 1e-3 .. 1.
* **Symmetries made approximate by a normaliser's eps** (the scale groups of BatchNorm, GroupNorm,
  InstanceNorm, LayerNorm, RMSNorm).  Scaling a normalised set by ``α`` changes the output by
  ``y · ε/(σ²+ε)`` per unit ``log α``, so each normaliser the family feeds contributes a residual of
  order ``max ε/(σ²+ε)`` over its normalised sets (σ² measured on the example batch); ``r`` is the sum
  of these over the normalisers (DenseNet features reach up to 16 BatchNorms).  Such a family is proved
  twice:
    1. with every normaliser's eps replaced by ``EPS_LIMIT = 1e-30`` (a function mode rewrites the
       ``eps`` argument of each ``F.batch_norm`` / ``layer_norm`` / ``group_norm`` / ``instance_norm`` /
       ``rms_norm`` call, so functional code is covered too): the symmetry is exact there and the
       residual must be ``≤ EXACT_TOLERANCE`` — this proves the structure;
    2. with the model's real eps: the residual must be ``≤ EXACT_TOLERANCE + EPS_FACTOR · r``
       (``EPS_FACTOR = 10``); this is ``family.tolerance``, ``family.residual`` is this residual and
       ``family.note`` says which normaliser and eps make it approximate.  Measured ``residual / r``:
       0.01–0.3 for ResNets and VGG-BN, up to 1.6 for MobileNetV2's depthwise layers at init, where
       σ² ~ 1e-3 makes ``r`` reach 1e-2: the symmetry there is genuinely only good to a few percent.
  With very few values per normalised set (BatchNorm over 2 values is ±1 whatever its input) the
  gradients are ill-conditioned and ``r`` approaches 1; discovery warns below 8 values per set.
* Manual families carry no knowledge of normalisers: they get ``EXACT_TOLERANCE`` unless
  ``family.tolerance`` is set, and when one fails while the model has normalisers, the eps → 0 residual
  is measured too and the reason says whether eps alone breaks it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .. import _backend
from ..plan import MomentPlan
from ..views import strided
from .capture import capture
from .eps_limit import NormaliserWatch
from .float64 import KeepFloat64
from .family import SymmetryFamily
from .residual import family_residuals

EXACT_TOLERANCE = 1e-8
EPS_FACTOR = 10.0
ROUNDING_FACTOR = 4.0   # see rounding_tolerance
LOSSES = ("cross_entropy", "mse", "bce", None)

LossSpec = Union[str, None, Callable[[Any, Any], torch.Tensor]]


class Rejected(NamedTuple):
    """A candidate that is not tracked: the family (None when it has no expressible form), the largest
    residual measured (None when it was refused before the gradient check), and why."""

    family: Optional[SymmetryFamily]
    residual: Optional[float]
    reason: str


class ProofSetup:
    """The model the proof runs on, the example inputs, and a loss with fixed random targets.

    By default a float64 deep copy of ``model`` (``exact_tolerance`` = EXACT_TOLERANCE).  With
    ``float64_copy=False`` the model itself, in its own dtype, untouched (gradients come from
    ``torch.autograd.grad``, nothing is written to ``.grad``): the check of families mapped from a
    reduced twin onto a model too large to copy (:mod:`.twin`); its ``exact_tolerance`` is the rounding
    tolerance of that dtype (:func:`rounding_tolerance`).
    """

    def __init__(self, model: torch.nn.Module, example_inputs, loss: LossSpec = "cross_entropy",
                 targets=None, seed: int = 0, float64_copy: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if not (callable(loss) or loss in LOSSES):
            raise ValueError(f"loss must be one of {LOSSES} or a callable(outputs, targets), got {loss!r}")
        if callable(loss) and targets is None:
            raise TypeError("a callable loss needs targets=...: the proof cannot guess what your loss expects")
        if float64_copy:
            try:
                self.model = copy.deepcopy(model)
            except Exception as exc:
                raise TypeError(f"symmetry discovery proves each symmetry on a float64 copy of the model, so "
                                f"your model is never modified, but copy.deepcopy(model) failed: {exc}") from exc
            self.model.double()
            for p in self.model.parameters():
                p.grad = None
            self.dtype = torch.float64
        else:
            self.model = model
            self.dtype = _lowest_precision(model)
        self.exact_tolerance = rounding_tolerance(self.dtype)
        cast = functools.partial(_to_dtype, dtype=self.dtype)
        self.args, self.kwargs = _as_call(example_inputs, cast)
        self.loss = loss
        self.targets = None if targets is None else tree_map(cast, targets)
        self.seed = seed
        self.device = next((p.device for p in self.model.parameters()), torch.device("cpu"))

    # -- running
    @contextlib.contextmanager
    def rng(self):
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield

    def loss_of(self, outputs) -> torch.Tensor:
        if callable(self.loss):
            return self.loss(outputs, self.targets)
        own = getattr(outputs, "loss", None)
        if not isinstance(outputs, torch.Tensor) and own is not None:
            if not isinstance(own, torch.Tensor) or own.numel() != 1:
                raise TypeError(f"the model returned {type(outputs).__name__} whose .loss is not a scalar tensor")
            return own       # the model's own loss (a Hugging Face ModelOutput, given labels)
        if not isinstance(outputs, torch.Tensor) and hasattr(outputs, "loss"):
            raise TypeError(f"the model returned {type(outputs).__name__} without a loss: pass the labels in "
                            f"example_inputs (e.g. {{'input_ids': x, 'labels': x}}) to use the model's own loss, "
                            f"or loss=callable(outputs, targets) and targets=")
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"loss={self.loss!r} needs the model to return one tensor, it returned "
                            f"{type(outputs).__name__}; pass loss=callable(outputs, targets) and targets=")
        if self.targets is None:
            with torch._C.DisableTorchFunction():
                self.targets = _random_targets(self.loss, outputs, self.seed)
        if self.loss == "cross_entropy":
            return F.cross_entropy(outputs, self.targets)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(outputs, self.targets)
        return F.mse_loss(outputs, self.targets)

    def capture(self):
        with self.rng(), KeepFloat64():
            return capture(self.model, self.args, self.kwargs, self.loss_of)

    def gradients(self, eps_limit: bool = False) -> Dict[int, torch.Tensor]:
        """Gradient of the loss on the example batch, per parameter (by id); ``eps_limit``: with every
        normaliser's eps replaced by EPS_LIMIT.  Sets ``has_normalisers``."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        watch = NormaliserWatch(eps_limit)
        with self.rng(), KeepFloat64(), watch:
            loss = self.loss_of(self.model(*self.args, **self.kwargs))
        self.has_normalisers = watch.seen
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return {id(p): (torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)}


def _to_dtype(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _as_call(example_inputs, cast) -> Tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), tree_map(cast, example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(tree_map(cast, list(example_inputs))), {}
    return (cast(example_inputs),), {}


def _lowest_precision(model: torch.nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float64


def rounding_tolerance(dtype: torch.dtype) -> float:
    """The residual an exact symmetry may show when the gradient is computed in ``dtype``.

    float64: EXACT_TOLERANCE (exact symmetries measure ~1e-15).  Lower precisions: the residual of a
    group is a cancellation ``|<g, θ>_A| / (‖g_A‖ ‖θ_A‖)``; a gradient computed with relative error ``δ``
    per element moves it by at most ``δ`` (Cauchy-Schwarz), and ``δ`` is a multiple of the dtype's unit
    roundoff ``u`` (``finfo.eps / 2``) that grows with the depth of the forward and backward passes.
    ``ROUNDING_FACTOR · u`` (u = 6e-8 float32, 4.9e-4 float16, 3.9e-3 bfloat16) bounds what exact
    families measured on Llama and GPT-2 (bench/RESULTS.md, "Discovery at scale").
    """
    if dtype == torch.float64:
        return EXACT_TOLERANCE
    return ROUNDING_FACTOR * torch.finfo(dtype).eps / 2


def _random_targets(kind: str, out: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=out.device).manual_seed(seed + 1)
    if kind == "cross_entropy":
        if out.dim() == 0:
            raise TypeError("loss='cross_entropy' needs logits of shape [N, C, ...] or [C]")
        c = out.shape[1] if out.dim() >= 2 else out.shape[0]
        shape = (out.shape[0],) + tuple(out.shape[2:]) if out.dim() >= 2 else ()
        return torch.randint(c, shape, generator=gen, device=out.device)
    if kind == "bce":
        return torch.rand(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)


# ---------------------------------------------------------------------- validation
def validate_families(model: torch.nn.Module, families: Sequence[SymmetryFamily]) -> None:
    """Raise a clear exception for unknown parameters, wrong view sizes and frozen parameters."""
    named = dict(model.named_parameters(remove_duplicate=False))
    for fam in families:
        if not isinstance(fam, SymmetryFamily):
            raise TypeError(f"expected SymmetryFamily objects, got {type(fam).__name__}")
        for (pname, _, _), (p, _, _) in zip(fam.members, fam.resolve(named)):
            if not p.requires_grad:
                raise ValueError(f"family {fam.name!r}: parameter {pname} is frozen (requires_grad=False); "
                                 f"it never receives a gradient, so the symmetry cannot be proved or tracked")


# ---------------------------------------------------------------------- residuals
def plan_moments(plan: "MomentPlan", ys: Sequence[Optional[torch.Tensor]],
                 zs: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``plan.slice_moments(ys, zs)``, with a lean path when the compiled op is not built.

    The plain-torch reference materialises all nine products of every view in float64 (nine times the
    tensor: 7 GB for VGG-16's first classifier layer); the proof only needs x, y, z, xx, yy, zz, xy and
    xz, so without the compiled op it computes those one product at a time (``yz`` is left zero).
    """
    if _backend.compiled:
        return plan.slice_moments(list(ys), list(zs))
    rows = []
    for x, y, z, views in zip(plan.params, ys, zs, plan.views):
        xf = x.detach().reshape(-1).to(torch.float64)
        yf = y.detach().reshape(-1).to(torch.float64)
        zf = None if z is None else z.detach().reshape(-1).to(torch.float64)
        for view in views:
            k = view[1]
            X, Y = strided(xf, view), strided(yf, view)
            cols = torch.zeros(k, 9, dtype=torch.float64, device=xf.device)
            cols[:, 0] = X.sum((0, 2))
            cols[:, 1] = Y.sum((0, 2))
            cols[:, 3] = (X * X).sum((0, 2))
            cols[:, 4] = (Y * Y).sum((0, 2))
            cols[:, 6] = (X * Y).sum((0, 2))
            if zf is not None:
                Z = strided(zf, view)
                cols[:, 2] = Z.sum((0, 2))
                cols[:, 5] = (Z * Z).sum((0, 2))
                cols[:, 7] = (X * Z).sum((0, 2))
            rows.append(cols)
    return torch.cat(rows) if rows else torch.zeros((0, 9), dtype=torch.float64)


def _rms2(grads: Dict[int, torch.Tensor]) -> float:
    total = sum(float((g.double() ** 2).sum()) for g in grads.values())
    return total / max(sum(g.numel() for g in grads.values()), 1)


def group_residuals(families: Sequence[SymmetryFamily], named: Dict[str, torch.Tensor],
                    grads: Dict[int, torch.Tensor], grads_limit: Optional[Dict[int, torch.Tensor]] = None,
                    limit_for: Sequence[bool] = ()) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Per-group gradient-constraint residuals, one float64 tensor ``[K]`` per family.

    One fused moment pass: ``x = θ``, ``y = g`` and, for the tensors of families flagged in
    ``limit_for``, ``z = g`` with normaliser eps → 0.  Returns the residuals for ``y`` and (None where
    not flagged) for ``z``.
    """
    plan = MomentPlan(families, named)
    need_z = set()
    for fam, flag in zip(families, limit_for):
        if flag:
            need_z.update(id(named[n]) for n, _, _ in fam.members)
    ys = [grads[id(p)] for p in plan.params]
    zs = [grads_limit[id(p)] if (grads_limit is not None and id(p) in need_z) else None for p in plan.params]
    signed, unsigned = plan.group_moments(plan_moments(plan, ys, zs))
    n = plan.counts.to(signed.device)
    out_y = family_residuals(families, plan, signed, unsigned, n, _rms2(grads), (1, 4, 6))
    out_z = [None] * len(families)
    if grads_limit is not None and any(limit_for):
        # The floor for negligible gradients comes from the real pass: with eps → 0 a channel whose
        # input is constant (a dead unit) gets a gradient of order 1/sqrt(1e-30), which would make a
        # floor taken from this pass swamp every other group and the check vacuous.
        rz = family_residuals(families, plan, signed, unsigned, n, _rms2(grads), (2, 5, 7))
        out_z = [r if flag else None for r, flag in zip(rz, list(limit_for) + [False] * len(families))]
    return out_y, out_z


def prove(setup: ProofSetup, families: Sequence[SymmetryFamily], tolerance: Optional[float] = None,
          check_limit: Sequence[bool] = ()) -> Tuple[List[SymmetryFamily], List[Rejected]]:
    """Gradient check of every family on ``setup``; fills ``residual``/``tolerance``; splits pass/fail.

    Families with ``extra["approx"]`` (set by discovery) are also checked with normaliser eps → 0;
    ``check_limit[i]`` asks for that second number on family ``i`` as well (used to explain failures).
    """
    families = list(families)
    if not families:
        return [], []
    named = dict(setup.model.named_parameters(remove_duplicate=False))
    exact = setup.exact_tolerance
    flags = [bool(f.extra.get("approx")) or (i < len(check_limit) and bool(check_limit[i]))
             for i, f in enumerate(families)]
    grads = setup.gradients()
    grads0 = setup.gradients(eps_limit=True) if any(flags) and setup.has_normalisers else None
    res, res0 = group_residuals(families, named, grads, grads0, flags)
    passed, rejected = [], []
    for fam, r, r0 in zip(families, res, res0):
        worst = int(r.argmax()) if r.numel() else 0
        fam.residual = float(r.max()) if r.numel() else 0.0
        if not math.isfinite(fam.residual):
            fam.residual = float("inf")
        tol = tolerance if tolerance is not None else (fam.tolerance if fam.tolerance is not None
                                                       else exact)
        fam.tolerance = tol
        if r0 is not None:
            fam.extra["residual_eps_limit"] = float(r0.max()) if r0.numel() else 0.0
        forced = fam.extra.get("forced")
        if forced:
            rejected.append(Rejected(fam, fam.residual, f"{forced} (measured residual {fam.residual:.2e})"))
            continue
        approx = bool(fam.extra.get("approx")) and r0 is not None
        if approx and not fam.extra["residual_eps_limit"] <= exact:
            rejected.append(Rejected(fam, fam.residual, f"gradient check failed even with normaliser eps → 0: "
                                     f"residual {fam.extra['residual_eps_limit']:.2e} > {exact:.0e} "
                                     f"(group {int(r0.argmax())})"))
            continue
        if fam.residual <= tol:
            passed.append(fam)
            continue
        if approx:
            why = (f"exact as eps → 0 (residual {fam.extra['residual_eps_limit']:.1e}), but the normalisers' "
                   f"eps breaks it: residual {fam.residual:.2e} > tolerance {tol:.1e}")
        else:
            why = f"gradient check failed: residual {fam.residual:.2e} > tolerance {tol:.1e} (group {worst})"
            if r0 is not None and fam.extra["residual_eps_limit"] <= exact:
                why += (f"; it holds exactly as normaliser eps → 0 (residual "
                        f"{fam.extra['residual_eps_limit']:.1e}): set family.tolerance to accept the "
                        f"eps-approximate symmetry")
        rejected.append(Rejected(fam, fam.residual, why))
    return passed, rejected


def prove_families(model: torch.nn.Module, families: Sequence[SymmetryFamily], example_inputs,
                   loss: LossSpec = "cross_entropy", *, targets=None, tolerance: Optional[float] = None,
                   seed: int = 0) -> Tuple[List[SymmetryFamily], List[Rejected]]:
    """Prove hand-declared (or discovered) families on one example batch.

    Args:
        model: the model; never modified (the proof runs on a float64 deep copy, same train/eval mode).
        families: :class:`SymmetryFamily` objects naming parameters as in ``model.named_parameters()``.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        loss: ``"cross_entropy"`` (random class targets), ``"mse"`` (random normal targets), ``"bce"``
            (logits against random targets in [0, 1]), ``None`` (loss unknown: an MSE against random
            targets is used, which has no symmetry of its own), or ``callable(outputs, targets)`` with
            ``targets=``.
        tolerance: overrides every family's tolerance.  Otherwise a family's own ``tolerance`` is used,
            or ``EXACT_TOLERANCE`` (1e-8) when it has none: set ``family.tolerance`` for a family you
            know to be approximate (e.g. one that relies on BatchNorm with eps > 0).
        seed: seed of the random targets and of dropout during the check.

    Returns:
        ``(passed, rejected)``: the families whose every group satisfies the gradient constraint within
        the tolerance (``residual`` and ``tolerance`` filled in), and a list of :class:`Rejected`
        ``(family, residual, reason)`` for the others.

    Raises:
        KeyError for an unknown parameter name, ValueError for a view that does not match the
        parameter's size or a frozen parameter, TypeError for bad arguments.
    """
    families = list(families)
    validate_families(model, families)
    setup = ProofSetup(model, example_inputs, loss, targets, seed)
    # Manual families know nothing about normalisers: measure them with eps → 0 as well, so that a
    # rejection can say whether a normaliser's eps is the only thing breaking the symmetry.
    return prove(setup, families, tolerance, check_limit=[True] * len(families))
