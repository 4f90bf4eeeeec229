"""SymmetryTracker (package split in progress)."""
from .facade import SymmetryTracker

__all__ = ["SymmetryTracker"]
