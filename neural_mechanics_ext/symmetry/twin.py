"""Discovery on a reduced-depth twin of a large model, mapped back to every layer (issue 13 item 7).

Families are a property of the architecture, but the proof of :func:`find_symmetries` runs on a float64
copy of the model, which does not fit for billions of parameters.  A Hugging Face model is built from its
``config``, so the same architecture with fewer layers is ``type(model)(config)`` with
``num_hidden_layers = n``.  The twin keeps every width (group counts and views depend on them) and cuts
depth only: it *is* the full model with the middle layers removed — twin layers ``0 .. n-2`` are full
layers ``0 .. n-2`` and twin layer ``n-1`` is the last full layer, weights, buffers, ``requires_grad`` and
train/eval flags copied from them.  Discovery and the float64 proof run on the twin; each family is then
mapped to the full depth by the layer index in its parameter names:

* a family without a layer parameter (embeddings, final norm, lm_head) is the same family;
* a family inside one twin layer holds in every full layer of the same *role*: the first ``n-2`` layers
  are themselves, the middle full layers ``n-2 .. N-2`` take the pattern of twin layer ``n-2`` (a block
  with a block before and after it), the last layer that of twin layer ``n-1`` (followed by the head);
* a family joining every twin layer (the residual stream of a pre-norm transformer) joins every full
  layer, each full layer contributing the members of its role;
* a family joining some twin layers but not all (a coupling between neighbouring layers) has no sound
  mapping and is refused with the reason.  ``n >= 3`` so that a block with neighbours on both sides
  exists and a coupling of two neighbours is not mistaken for one across all layers.

The mapping is only as good as the claim "the layers are the same"; it is checked, not assumed
(:class:`TwinError` with the reason otherwise): one stack of ``num_hidden_layers`` blocks; every middle
layer has the parameter and buffer names, shapes, dtypes, ``requires_grad``, module types and train
flags of its role's layer; the twin built from the config matches the full model in every kept
parameter; per-layer lists of the config (``layer_types``) agree within a role; tied parameters tie the
same way.  What no structural check sees (a forward method patched on one layer) is caught by the last
step: every mapped family is proved again on the full model, in its own dtype, without a copy
(:class:`~.prove.ProofSetup` with ``float64_copy=False``).

That check uses the rounding tolerance of the model's dtype (:func:`~.prove.rounding_tolerance`) for exact
families; a family made approximate by a normaliser's eps gets, in addition, ``EPS_FACTOR`` times the
``eps/(var + eps)`` the twin measured for each of its normalisers (the middle layers take the value of
their role's layer), and is also checked with every eps → 0, where it must hold to the rounding tolerance.

Why not capture on the meta device: the rules read values measured during the capture (the variance that
sets the eps tolerance, integer index tensors, masks, which branch the forward takes) and the proof needs
real gradients; a twin is real, small (3 of N layers), and the same code path as the whole-model discovery.
"""
from __future__ import annotations

import contextlib
import copy
import re
import sys
import warnings
from typing import Dict, List, Optional, Set

import torch

from .family import SymmetryFamily
from .prove import Rejected

MIN_TWIN_LAYERS = 3
TWIN_AUTO_PARAMS = 250_000_000   # "auto": above this many parameters (~6 GB for the float64 proof), use a twin


class TwinError(ValueError):
    """The model cannot be reduced to a twin of the same architecture; the message says why."""


class Twin:
    """A reduced-depth copy of ``model`` and the map between its layers and the model's."""

    def __init__(self, model: torch.nn.Module, layers: int):
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < MIN_TWIN_LAYERS:
            raise ValueError(f"twin_layers must be an int >= {MIN_TWIN_LAYERS} (first, middle and last block), "
                             f"got {layers!r}")
        config = getattr(model, "config", None)
        depth = getattr(config, "num_hidden_layers", None)
        if not isinstance(depth, int):
            raise TwinError(f"{type(model).__name__} has no config.num_hidden_layers: a twin is built as "
                            f"type(model)(config) with fewer layers (Hugging Face models)")
        if depth <= layers:
            raise TwinError(f"the model has {depth} layers, not more than twin_layers={layers}")
        self.full_layers, self.layers = depth, layers
        self.keep = list(range(layers - 1)) + [depth - 1]     # the full layer each twin layer is
        self.prefix = _layer_stack(model, depth)
        self._pattern = re.compile(r"(?<![\w.])" + re.escape(self.prefix) + r"\.(\d+)(?!\d)")
        self._check_middle_layers(model)          # before building anything
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = layers
        for key, val in vars(config).items():    # per-layer lists (layer_types, ...): keep the kept layers
            if isinstance(val, (list, tuple)) and len(val) == depth and key != "num_hidden_layers":
                for i in range(depth):
                    if val[i] != val[self.keep[self.role(i)]]:
                        raise TwinError(f"layers differ: config.{key}[{i}] = {val[i]!r} but config.{key}"
                                        f"[{self.keep[self.role(i)]}] = {val[self.keep[self.role(i)]]!r}")
                setattr(cfg, key, type(val)(val[i] for i in self.keep))
        try:
            with _no_init():      # every twin tensor is overwritten by the model's below
                twin = type(model)(cfg)
            if callable(getattr(twin, "tie_weights", None)):
                twin.tie_weights()     # part of the skipped init_weights
        except Exception as exc:
            raise TwinError(f"type(model)(config) with num_hidden_layers={layers} failed: {exc}") from exc
        self.model = twin.to(next((p.device for p in model.parameters()), torch.device("cpu")))
        self._copy_state(model)

    # -- layer maps
    def role(self, i: int) -> int:
        """The twin layer whose families full layer ``i`` has."""
        if i < self.layers - 1:
            return i
        return self.layers - 1 if i == self.full_layers - 1 else self.layers - 2

    def full_of_role(self, j: int) -> List[int]:
        return [i for i in range(self.full_layers) if self.role(i) == j]

    def rename(self, text: Optional[str], mapping: Dict[int, int]) -> Optional[str]:
        """``text`` with ``<prefix>.<j>`` replaced by ``<prefix>.<mapping[j]>``."""
        if text is None:
            return None
        return self._pattern.sub(lambda m: f"{self.prefix}.{mapping.get(int(m.group(1)), int(m.group(1)))}", text)

    def layers_in(self, text: str) -> Set[int]:
        return {int(m.group(1)) for m in self._pattern.finditer(text)}

    def _canonical(self) -> Dict[int, int]:
        return dict(enumerate(self.keep))

    def full_text(self, text: Optional[str]) -> Optional[str]:
        """``text`` naming twin layers, naming the full layers they are."""
        return self.rename(text, self._canonical())

    # -- structural checks
    def _check_middle_layers(self, model: torch.nn.Module) -> None:
        """Every full layer matches the layer of its role, in what the structure can show."""
        stack = model.get_submodule(self.prefix)
        sigs = [_signature(block) for block in stack]
        for i in range(self.full_layers):
            ref = self.keep[self.role(i)]
            diff = _first_difference(sigs[ref], sigs[i])
            if diff:
                raise TwinError(f"layers differ: {self.prefix}.{i} is not like {self.prefix}.{ref}: {diff}")

    def _copy_state(self, model: torch.nn.Module) -> None:
        """Copy parameters, buffers, requires_grad and train flags of the kept layers into the twin;
        every twin tensor must exist in the model with the same shape, and tie the same way."""
        canon = self._canonical()
        full = dict(model.named_parameters(remove_duplicate=False))
        full.update(dict(model.named_buffers(remove_duplicate=False)))
        twin_params = dict(self.model.named_parameters(remove_duplicate=False))
        kept_full = {n for n in full if not self.layers_in(n) or self.layers_in(n) <= set(self.keep)}
        mapped = {}
        with torch.no_grad():
            for tname, t in list(twin_params.items()) + list(self.model.named_buffers(remove_duplicate=False)):
                fname = self.rename(tname, canon)
                src = full.get(fname)
                if src is None or tuple(src.shape) != tuple(t.shape):
                    what = "does not exist" if src is None else f"has shape {tuple(src.shape)}"
                    raise TwinError(f"the twin built from the config has {tname} of shape {tuple(t.shape)} but "
                                    f"the model's {fname} {what}: the model is not what its config builds")
                t.copy_(src)
                if tname in twin_params:
                    t.requires_grad_(src.requires_grad)
                mapped[fname] = tname
        missing = sorted(n for n in kept_full if n not in mapped)
        if missing:
            raise TwinError(f"the model has {missing[0]} (and {len(missing) - 1} more) that the twin built from "
                            f"the config lacks: the model is not what its config builds")
        if _ties(model, lambda n: n in mapped, lambda n: mapped[n]) != _ties(self.model, None, lambda n: n):
            raise TwinError("the model ties parameters differently from the twin built from its config")
        modules = dict(model.named_modules())
        for tname, mod in self.model.named_modules():
            src = modules.get(self.rename(tname, canon))
            if src is not None:
                mod.training = src.training

    # -- mapping the results
    def map_families(self, families: List[SymmetryFamily]):
        """Map the twin's families (in forward order) to the full model, in forward order: a run of
        families of one twin layer is repeated for each full layer of its role, layer by layer.
        Returns ``[(full family, twin family, {twin layer: full layer})]`` and the refused mappings."""
        out, refused, run, run_layer = [], [], [], None

        def flush():
            for i in self.full_of_role(run_layer) if run else ():
                out.extend((_clone(self, fam, {run_layer: i}, None), fam, {run_layer: i}) for fam in run)
            run.clear()

        for fam in families:
            mapped = self.map_family(fam)
            if isinstance(mapped, Rejected):
                refused.append(mapped)
                continue
            layers = set().union(*(self.layers_in(n) for n, _, _ in fam.members))
            if len(layers) == 1:
                (j,) = layers
                if j != run_layer:
                    flush()
                    run_layer = j
                run.append(fam)
                continue
            flush()
            out.extend((f, fam, self._canonical()) for f in mapped)
        flush()
        return out, refused

    def map_family(self, fam: SymmetryFamily):
        """The families of the full model that twin family ``fam`` stands for, or a :class:`Rejected`."""
        per_member = [self.layers_in(name) for name, _, _ in fam.members]
        layers = set().union(*per_member)
        if len(layers) == 1:
            (j,) = layers
            full = self.full_of_role(j)
            if len(full) > 1 and not all(per_member):
                return Rejected(None, None, f"{fam.name}: joins a middle layer of the twin to parameters outside "
                                            f"the layers; whether each middle layer or all of them together join "
                                            f"them cannot be told from one representative (use twin_layers=None)")
            return [_clone(self, fam, {j: i}, None) for i in full]
        if not layers:
            return [fam]
        if layers != set(range(self.layers)):
            return Rejected(None, None, f"{fam.name}: joins layers {sorted(layers)} of the {self.layers}-layer "
                                        f"twin but not all of them; such a coupling of neighbouring layers "
                                        f"cannot be mapped to the full depth (use twin_layers=None)")
        return [_clone(self, fam, self._canonical(), self._expand)]

    def _expand(self, name: str) -> List[str]:
        """A member of a family joining every layer: the same member in every full layer of its role."""
        (j,) = self.layers_in(name) or {None}
        if j is None:
            return [name]
        return [self.rename(name, {j: i}) for i in self.full_of_role(j)]

    def map_rejected(self, rej: Rejected) -> List[Rejected]:
        if rej.family is not None:
            mapped = self.map_family(rej.family)
            if isinstance(mapped, Rejected):
                return [mapped]
            if len(mapped) > 1:
                (j,) = set().union(*(self.layers_in(n) for n, _, _ in rej.family.members))
                return [Rejected(f, rej.residual, self.rename(rej.reason, {j: i}))
                        for f, i in zip(mapped, self.full_of_role(j))]
            return [Rejected(mapped[0], rej.residual, self.rename(rej.reason, self._canonical()))]
        layers = self.layers_in(rej.reason)
        if len(layers) == 1:
            (j,) = layers
            return [Rejected(None, None, self.rename(rej.reason, {j: i})) for i in self.full_of_role(j)]
        return [Rejected(None, None, self.full_text(rej.reason))]


def twin_for(model: torch.nn.Module, twin_layers) -> Optional[Twin]:
    """The twin ``find_symmetries(twin_layers=...)`` asks for: None for the full path."""
    if twin_layers is None:
        return None
    if twin_layers == "auto":
        count = sum(p.numel() for p in model.parameters())
        if count <= TWIN_AUTO_PARAMS:
            return None
        try:
            twin = Twin(model, MIN_TWIN_LAYERS)
        except TwinError as exc:
            warnings.warn(f"find_symmetries: {type(model).__name__} has {count / 1e6:.0f}M parameters; the "
                          f"float64 proof on a copy of the whole model needs ~{24 * count / 1e9:.0f} GB. A reduced "
                          f"twin would not, but: {exc}. Using the whole model.", RuntimeWarning, stacklevel=3)
            return None
        warnings.warn(f"find_symmetries: {type(model).__name__} has {count / 1e6:.0f}M parameters: discovering on a "
                      f"{MIN_TWIN_LAYERS}-layer twin of the same architecture and mapping the families to all "
                      f"{twin.full_layers} layers (twin_layers=None forces the whole model)", RuntimeWarning,
                      stacklevel=3)
        return twin
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(depth, int) and isinstance(twin_layers, int) and MIN_TWIN_LAYERS <= depth <= twin_layers:
        return None        # the model is no deeper than its twin would be: the whole-model path is the same
    return Twin(model, twin_layers)


# ---------------------------------------------------------------------- helpers
def _no_init():
    """Hugging Face's switch that skips the random init of a model whose weights are loaded next (already
    imported when the model is a Hugging Face one); no-op otherwise."""
    init = sys.modules.get("transformers.initialization")
    return init.no_init_weights() if hasattr(init, "no_init_weights") else contextlib.nullcontext()


def _layer_stack(model: torch.nn.Module, depth: int) -> str:
    stacks = [name for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.ModuleList) and len(mod) == depth]
    if len(stacks) != 1:
        found = "none" if not stacks else ", ".join(stacks)
        raise TwinError(f"expected one nn.ModuleList of config.num_hidden_layers = {depth} blocks, found {found}")
    return stacks[0]


def _signature(block: torch.nn.Module) -> Dict[str, tuple]:
    sig = {f"module {n or '.'}": (type(m).__qualname__, m.training) for n, m in block.named_modules()}
    sig.update({f"parameter {n}": (tuple(p.shape), p.dtype, p.requires_grad)
                for n, p in block.named_parameters(remove_duplicate=False)})
    sig.update({f"buffer {n}": (tuple(b.shape), b.dtype) for n, b in block.named_buffers(remove_duplicate=False)})
    return sig


def _first_difference(ref: dict, other: dict) -> Optional[str]:
    for key in list(ref) + [k for k in other if k not in ref]:
        if ref.get(key) != other.get(key):
            return f"{key}: {other.get(key, 'absent')} vs {ref.get(key, 'absent')}"
    return None


def _ties(model: torch.nn.Module, keep, rename) -> Set[frozenset]:
    groups: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out = set()
    for names in groups.values():
        if len(names) > 1:
            if keep is not None and not all(keep(n) for n in names):
                if any(keep(n) for n in names):
                    out.add(frozenset(rename(n) if keep(n) else "<a middle layer>" for n in names))
                continue
            out.add(frozenset(rename(n) for n in names))
    return out


def _clone(twin: Twin, fam: SymmetryFamily, mapping: Dict[int, int], expand) -> SymmetryFamily:
    """``fam`` with layer indices renamed by ``mapping`` (and, for a family joining every layer, each
    layer member expanded to every full layer of its role)."""
    members = []
    block = -1      # forward order of a family joining every layer: full layer by layer, each as in the twin
    for t, (name, view, sign) in enumerate(fam.members):
        for new in (expand(name) if expand else [twin.rename(name, mapping)]):
            block = next(iter(twin.layers_in(new)), block)
            members.append(((block, t), (new, view, sign)))
    members = [m for _, m in sorted(members, key=lambda km: km[0])] if expand else [m for _, m in members]
    extra = dict(fam.extra)
    if "approx" in extra:
        approx = []
        for tag, eps, r, size in extra["approx"]:
            tags = expand(tag) if expand and len(twin.layers_in(tag)) == 1 else [twin.rename(tag, mapping)]
            approx.extend((t, eps, r, size) for t in tags)
        extra["approx"] = approx
    return SymmetryFamily(fam.kind, twin.rename(fam.name, mapping), members, layer=twin.rename(fam.layer, mapping),
                          note=twin.rename(fam.note, mapping), residual=fam.residual, tolerance=fam.tolerance,
                          manual=fam.manual, extra=extra)

