"""``find_symmetries``: capture → rules → proof."""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple, Union

import torch

from .describe import describe
from .family import SymmetryFamily
from .prove import EPS_FACTOR, EXACT_TOLERANCE, LossSpec, ProofSetup, Rejected, prove
from .rules import build_candidate, find_sources, joint_sources, tied_shifts
from .twin import twin_for

MIN_SET_SIZE = 8   # fewer values per normalised set than this: warn that the proof is ill-conditioned

_LONG_NAME = {"BN": "BatchNorm", "IN": "InstanceNorm", "GN": "GroupNorm", "LN": "LayerNorm",
              "RMSNorm": "RMSNorm"}


def find_symmetries(model: torch.nn.Module, example_inputs, loss: LossSpec = "cross_entropy", *,
                    targets=None, prove: bool = True, tolerance: Optional[float] = None,
                    verbose: bool = False, return_rejected: bool = False, seed: int = 0,
                    twin_layers: Union[int, str, None] = "auto"
                    ) -> Union[List[SymmetryFamily], Tuple[List[SymmetryFamily], List[Rejected]]]:
    """Find every translation, scale and rescale family of ``model`` and prove each one numerically.

    The model is run once on ``example_inputs`` (a small batch is enough: 2-4 samples at a small
    resolution) under a function mode that records every op, the rules of THEORY.md §1.2 are applied
    to the recorded graph, and every candidate is then checked on the same batch: the gradient
    constraint of each group must hold within a documented tolerance (see
    :mod:`neural_mechanics_ext.symmetry.prove`).  Nothing of ``model`` is changed: capture and proof run
    on a float64 deep copy (or, with a twin, on the float64 twin and then on ``model`` without writing to
    it), in the model's current train/eval mode.

    Args:
        model: any ``nn.Module`` whose forward runs on ``example_inputs``.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.  A model that
            returns an object with a ``.loss`` tensor (a Hugging Face ``ModelOutput``, given labels:
            ``{"input_ids": x, "labels": x}``) is trained with that loss, and it is used as is (unless
            ``loss`` is a callable).
        loss: what the model is trained with; it decides the loss-dependent translation symmetry.
            ``"cross_entropy"`` (softmax + cross-entropy, with or without label smoothing: the
            classifier's columns and bias are translation groups), ``"mse"``, ``"bce"`` (no such
            symmetry), ``None`` (loss unknown: assume none), or ``callable(outputs, targets)`` together
            with ``targets=``: the callable is captured too, so its ``F.cross_entropy`` /
            ``log_softmax`` is seen and its translation symmetry found.
        targets: targets for a callable loss (random targets of the right kind are drawn otherwise).
        prove: run the gradient check (default).  ``False`` returns the structural candidates
            unproved (``residual`` None).
        tolerance: one tolerance for every family instead of the rule (1e-8 for exact symmetries,
            eps-aware for the scale symmetries of normalisers); with a twin it applies to the float64 proof
            on the twin, the check on the model uses the rounding tolerance of its dtype.
        verbose: print the table of families and the rejected candidates with their reasons.
        return_rejected: also return the rejected candidates.
        seed: seed for the random targets and for dropout during capture and proof.
        twin_layers: discover and prove (float64) on a reduced-depth twin of a Hugging Face model with this
            many layers (>= 3), map the families to every layer and check them on ``model`` itself in its own
            dtype (:mod:`neural_mechanics_ext.symmetry.twin`; :class:`TwinError` when the model's layers
            differ).  ``None``: the whole model.  ``"auto"`` (default): a 3-layer twin above
            ``TWIN_AUTO_PARAMS`` (250M) parameters when the model has one (with a warning), else the whole model.

    Returns:
        the proved families, in the order of the layers in the forward pass; with
        ``return_rejected=True`` a pair ``(families, rejected)``, ``rejected`` being a list of
        ``(family, residual, reason)`` (``family`` is None for a candidate that no ``(A, K, B)`` view
        can express, ``residual`` is None when it was refused before the gradient check: shared or
        tied parameters, frozen parameters, unexpressible views).  A model without symmetry gives an
        empty list and a warning, not an error.
    """
    twin = twin_for(model, twin_layers)
    if twin is not None:
        passed, rejected, small_sets = _via_twin(model, twin, example_inputs, loss, targets, seed, prove, tolerance)
    else:
        setup = ProofSetup(model, example_inputs, loss, targets, seed)
        families, rejected, small_sets = _candidates(setup.capture())
        _number(families)
        passed = families
        if prove:
            passed, failed = _prove(setup, families, tolerance)
            rejected = failed + rejected
    if small_sets:
        warnings.warn("find_symmetries: on the example inputs " + ", ".join(
            f"{_long(tag)} normalises only {n} values per set" for tag, n in small_sets.items()) +
            "; with so few values its gradients are ill-conditioned and the scale checks say little. "
            f"Use more samples or a larger input (at least {MIN_SET_SIZE} values per normalised set).",
            RuntimeWarning, stacklevel=2)
    if not passed:
        msg = (f"find_symmetries: no symmetry found in {type(model).__name__} (loss={_loss_name(loss)}): no "
               f"layer is followed only by positively homogeneous operations into another layer, by a "
               f"normalisation in training mode, or by a shift-invariant loss")
        if rejected:
            msg += f"; {len(rejected)} candidate(s) rejected (use return_rejected=True or verbose=True)"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if verbose:
        print(describe(passed))
        if rejected:
            print("rejected:")
            print(describe(rejected))
    return (passed, rejected) if return_rejected else passed


def _candidates(graph) -> Tuple[List[SymmetryFamily], List[Rejected], dict]:
    """The structural candidates of a captured graph (names not yet numbered), the refused ones, and the
    normalisers with fewer than MIN_SET_SIZE values per set."""
    families: List[SymmetryFamily] = []
    refused: List[Rejected] = []
    small_sets = {}
    deaths = []
    sources = find_sources(graph)
    cands = [build_candidate(graph, src, deaths) for src in sources]
    # then the joint candidates, which start where single sources died at a join, and the whole-tensor
    # shifts of tied parameters
    reasons = []
    joint = joint_sources(graph, deaths, reasons) + tied_shifts(graph, sources)
    cands += [build_candidate(graph, src) for src in joint]
    refused.extend(Rejected(None, None, why) for why in reasons)
    for cand in cands:
        if cand is None:
            continue
        if cand.refusal:
            refused.append(Rejected(cand.family, None, f"{cand.name}: {cand.refusal}"))
            continue
        for fam in cand.families:
            _settle(fam, cand, small_sets)
            families.append(fam)
    return families, refused, small_sets


def _number(families: List[SymmetryFamily]) -> None:
    """Number repeated names in order: the second ``X`` becomes ``X #2``."""
    names = {}
    for fam in families:
        count = names.get(fam.name, 0)
        names[fam.name] = count + 1
        if count:
            fam.name = f"{fam.name} #{count + 1}"


def _via_twin(model, twin, example_inputs, loss, targets, seed, do_prove, tolerance):
    """Discover and prove (float64) on the twin, map to every layer, check on the model in its dtype."""
    twin.model.double()
    setup = ProofSetup(twin.model, example_inputs, loss, targets, seed, float64_copy=False)
    families, refused, small_sets = _candidates(setup.capture())
    small_sets = {twin.full_text(tag): n for tag, n in small_sets.items()}
    failed = {}
    if do_prove:
        _, bad = _prove(setup, families, tolerance)
        failed = {id(r.family): r for r in bad}
    del setup
    twin.model = None          # free the float64 twin before the check on the full model
    mapped, rejected = twin.map_families(families)
    _number([f for f, _, _ in mapped])
    for r in refused:
        rejected.extend(twin.map_rejected(r))
    checked = []
    for fam, origin, mapping in mapped:
        if fam.extra.get("approx"):     # its normalisers in every full layer, not the twin's
            fam.note = _approx_note(fam.extra["approx"], sum(r for _, _, r, _ in fam.extra["approx"]))
        if id(origin) in failed:
            r = failed[id(origin)]
            rejected.insert(0, Rejected(fam, r.residual, "on the twin: " + twin.rename(r.reason, mapping)))
        else:
            fam.extra["twin_residual"] = origin.residual
            checked.append(fam)
    if not do_prove:
        return checked, rejected, small_sets
    full = ProofSetup(model, example_inputs, loss, targets, seed, float64_copy=False)
    for fam in checked:
        total = sum(r for _, _, r, _ in fam.extra.get("approx", ()))
        fam.tolerance = full.exact_tolerance + EPS_FACTOR * total
    passed, bad = _prove(full, checked, None)
    return passed, bad + rejected, small_sets


def _settle(fam: SymmetryFamily, cand, small_sets: dict) -> None:
    """The tolerance (eps-aware where normalisers absorb) and the notes of one of a candidate's families."""
    if cand.approx:
        # each normaliser that absorbs the scaling adds its own O(eps/var) violation
        total = sum(r for _, _, r, _ in cand.approx)
        for tag, _, _, size in cand.approx:
            if 0 < size < MIN_SET_SIZE:
                small_sets[tag] = size
        fam.tolerance = EXACT_TOLERANCE + EPS_FACTOR * total
        fam.extra["approx"] = cand.approx
        fam.note = _approx_note(cand.approx, total)
    else:
        fam.tolerance = EXACT_TOLERANCE
    if cand.forced:
        fam.extra["forced"] = cand.forced


def _long(tag: str) -> str:
    kind, _, name = tag.partition(" ")
    return f"{_LONG_NAME.get(kind, kind)} {name}"


def _approx_note(approx, total: float) -> str:
    if len(approx) == 1:
        tag, eps, r, _ = approx[0]
        return (f"approximate: {_long(tag)} eps={eps:g} breaks the symmetry at O(eps/var) "
                f"(max eps/(var+eps) = {r:.1e})")
    tags = [_long(t) for t, _, _, _ in approx]
    shown = ", ".join(tags[:3]) + (f", +{len(tags) - 3} more" if len(tags) > 3 else "")
    epss = sorted({e for _, e, _, _ in approx})
    return (f"approximate: the eps ({', '.join(f'{e:g}' for e in epss)}) of {len(tags)} normalisers ({shown}) "
            f"breaks the symmetry at O(eps/var) (sum of max eps/(var+eps) = {total:.1e})")


def _prove(setup, families, tolerance):
    return prove(setup, families, tolerance)


def _loss_name(loss) -> str:
    return getattr(loss, "__name__", repr(loss)) if callable(loss) else repr(loss)
