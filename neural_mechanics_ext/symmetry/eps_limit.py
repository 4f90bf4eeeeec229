"""The eps → 0 limit of normalisers, where their scale symmetries are exact (THEORY.md §1.2).

A normaliser's eps breaks the scale symmetry it carries at O(eps/var).  The proof of a family
(:mod:`.prove`) and the Hessian check (:mod:`neural_mechanics_ext.hessian`) therefore also run the model
with every normaliser's eps replaced by ``EPS_LIMIT`` (torch refuses eps = 0 in training; 1e-30 is exact
in float64): a function mode rewrites the ``eps`` argument of each ``F.batch_norm`` / ``layer_norm`` /
``group_norm`` / ``instance_norm`` / ``rms_norm`` call, so functional code is covered too.
"""
from __future__ import annotations

from torch.overrides import TorchFunctionMode

from .capture import SIGNATURES, bind_args, normaliser_op

EPS_LIMIT = 1e-30


class NormaliserWatch(TorchFunctionMode):
    """Note whether the forward pass calls a normaliser (``seen``); with ``limit``, replace the eps of
    every normaliser call by EPS_LIMIT."""

    def __init__(self, limit: bool):
        super().__init__()
        self.limit = limit
        self.seen = False

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
