"""The tracker's checks, each a named helper: arguments, what can be tracked, and that the model and the
optimizer it was built for are still the ones being trained.  Every refusal is an exception that names
the problem and what to do instead."""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..symmetry.family import SymmetryFamily


def check_arguments(optimizer, log_every: int, flush_every: int, hook: str, ranks: str) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"SymmetryTracker: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if log_every < 1 or flush_every < 1:
        raise ValueError("SymmetryTracker: log_every and flush_every must be positive")
    if hook not in ("optimizer", "backward"):
        raise ValueError(f"SymmetryTracker: hook must be 'optimizer' or 'backward', got {hook!r}")
    if ranks not in ("all", "rank0"):
        raise ValueError(f"SymmetryTracker: ranks must be 'all' or 'rank0', got {ranks!r}")


def check_model(model: torch.nn.Module) -> None:
    if any(type(p).__name__ == "FlatParameter" for p in model.parameters()):
        raise ValueError("SymmetryTracker: FSDP1 (FullyShardedDataParallel) flattens parameters, which hides "
                         "their layout; use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP")


def exclusion_reason(f: SymmetryFamily, named: Dict[str, torch.nn.Parameter], group_of: Dict[int, int]
                     ) -> Optional[str]:
    """Why family ``f`` cannot be tracked (a missing, frozen or unoptimized parameter), or None."""
    for name in f.param_names:
        p = named.get(name)
        if p is None:
            return f"the model has no parameter {name!r}"
        if not p.requires_grad:
            return f"parameter {name} is frozen (requires_grad=False)"
        if id(p) not in group_of:
            return f"parameter {name} is not in the optimizer"
    return None


def trackable(families: Sequence[SymmetryFamily], named: Dict[str, torch.nn.Parameter],
              group_of: Dict[int, int], stacklevel: int
              ) -> Tuple[List[SymmetryFamily], List[Tuple[SymmetryFamily, str]]]:
    """(kept, excluded with reasons); warns for each excluded family (at ``stacklevel``), raises when
    none is left."""
    if not families:
        raise ValueError("SymmetryTracker: the model has no symmetry to track (find_symmetries found none); "
                         "declare families by hand with nmx.SymmetryFamily if discovery cannot see them")
    excluded, kept = [], []
    for f in families:
        reason = exclusion_reason(f, named, group_of)
        if reason:
            excluded.append((f, reason))
        else:
            kept.append(f)
    for f, reason in excluded:
        warnings.warn(f"SymmetryTracker: not tracking {f.name}: {reason}", stacklevel=stacklevel)
    if not kept:
        raise ValueError("SymmetryTracker: no family can be tracked: "
                         + "; ".join(f"{f.name}: {r}" for f, r in excluded))
    return kept, excluded


def one_device(params: Sequence[torch.Tensor]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"SymmetryTracker: tracked parameters are on several devices {sorted(map(str, devices))}")
    return devices.pop()


def check_sharded(hook: str, ranks: str) -> None:
    if hook == "backward" or ranks == "rank0":
        raise ValueError("SymmetryTracker: sharded (FSDP2) parameters need hook='optimizer' and ranks='all'")


class Unchanged:
    """Checks, at every step, that the tracked parameters and the optimizer's param groups are still the
    ones the tracker was built for (a replaced parameter would be read from a stale tensor)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                 optimizer: torch.optim.Optimizer):
        self._slots = [_owner(model, n) for n in names]
        self._params, self._optimizer = list(params), optimizer
        self._group_sizes = [len(g["params"]) for g in optimizer.param_groups]

    def check(self) -> None:
        for (module, attr), p in zip(self._slots, self._params):
            if module._parameters.get(attr) is not p:
                raise RuntimeError(f"SymmetryTracker: parameter {module.__class__.__name__}.{attr} was replaced "
                                   "after the tracker was built; build a new tracker for the changed model")
        groups = self._optimizer.param_groups
        if len(groups) != len(self._group_sizes) or any(len(g["params"]) != n for g, n in zip(groups, self._group_sizes)):
            raise RuntimeError("SymmetryTracker: the optimizer's param groups changed after the tracker was built; "
                               "build a new tracker for the changed optimizer")


def _owner(model: torch.nn.Module, name: str):
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr
