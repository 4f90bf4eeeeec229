"""neural-mechanics-ext: watch a network train through the symmetries of its loss.

The public API (DESIGN.md §3); everything else in the package is an implementation detail.
"""
from ._version import __version__
from ._backend import build_info
from .ops import adam_moments, lion_moments, slice_moments
from .schema import MOMENTS
from .symmetry import Rejected, SymmetryFamily, describe, find_symmetries, prove_families
from .tracker import SymmetryTracker
from .hessian import hessian_check

__all__ = ["__version__", "MOMENTS", "build_info", "slice_moments", "adam_moments", "lion_moments", "SymmetryFamily", "find_symmetries",
           "prove_families", "describe", "Rejected", "SymmetryTracker", "hessian_check"]
