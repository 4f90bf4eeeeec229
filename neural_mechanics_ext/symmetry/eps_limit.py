"""The eps → 0 limit of normalisers, where their scale symmetries are exact (THEORY.md §1.2).

A normaliser's eps breaks the scale symmetry it carries at O(eps/var).  The proof of a family
(:mod:`.prove`) and the Hessian check (:mod:`neural_mechanics_ext.hessian`) therefore also run the model
with every normaliser's eps replaced by ``EPS_LIMIT`` (torch refuses eps = 0 in training; 1e-30 is exact
in float64): a function mode rewrites the ``eps`` argument of each ``F.batch_norm`` / ``layer_norm`` /
``group_norm`` / ``instance_norm`` / ``rms_norm`` call, so functional code is covered too, and the eps of
a normaliser written out by hand: a positive number added to a second moment (a mean or sum of squares,
or a variance; the rules' :func:`~neural_mechanics_ext.symmetry.rules.normalisers.second_moment`).
"""
from __future__ import annotations

import weakref

import torch
from torch.overrides import TorchFunctionMode

from .capture import SIGNATURES, bind_args, normaliser_op, op_name

EPS_LIMIT = 1e-30


class NormaliserWatch(TorchFunctionMode):
    """Note whether the forward pass calls a normaliser (``seen``); with ``limit``, replace the eps of
    every normaliser call, and of every hand-written one, by EPS_LIMIT."""

    def __init__(self, limit: bool):
        super().__init__()
        self.limit = limit
        self.seen = False
        self._squares = {}      # id -> weakref of tensors that are x², and of their means/sums/variances
        self._moments = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = normaliser_op(func)
        if op is not None:
            self.seen = True
            if self.limit:
                a = bind_args(SIGNATURES[op], args, kwargs)
                a["eps"] = EPS_LIMIT
                return func(**a)
            return func(*args, **kwargs)
        name, rev = op_name(func)
        if name == "add" and len(args) == 2 and not kwargs:
            t, c = args if isinstance(args[0], torch.Tensor) else args[::-1]
            if _number(c) and c > 0 and _tracked(self._moments, t):
                self.seen = True
                if self.limit:
                    return func(*[EPS_LIMIT if x is c else x for x in args])
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._track(name, rev, args, kwargs, out)
        return out

    def _track(self, name, rev, args, kwargs, out) -> None:
        x = args[0] if args else None
        n = args[1] if len(args) > 1 else kwargs.get("exponent")
        if name == "square" or (name == "mul" and len(args) == 2 and args[0] is args[1]) or (
                name == "pow" and not rev and _number(n) and float(n) == 2.0):
            self._squares[id(out)] = weakref.ref(out)
        elif name == "var" or (name in ("mean", "sum") and _tracked(self._squares, x)):
            self._moments[id(out)] = weakref.ref(out)


def _number(c) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def _tracked(table, t) -> bool:
    ref = table.get(id(t)) if isinstance(t, torch.Tensor) else None
    return ref is not None and ref() is t
