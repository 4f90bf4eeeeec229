"""Symmetry discovery: find the translation, scale and rescale families of a model and prove them.

``find_symmetries(model, example_inputs, loss="cross_entropy")`` captures one forward pass (and the
loss), applies the rules of THEORY.md §1.2 to the recorded dataflow, and proves every candidate with the
gradient constraint of THEORY.md §1.1 before returning it.  ``SymmetryFamily`` + ``prove_families``
declare and prove families by hand; ``describe`` formats them as a table.  ``twin_layers=`` discovers
on a reduced-depth twin of a large Hugging Face model (twin.py).
"""
from .describe import describe, format_members
from .discover import find_symmetries
from .family import SymmetryFamily
from .prove import EXACT_TOLERANCE, Rejected, prove_families
from .twin import TwinError

__all__ = ["SymmetryFamily", "find_symmetries", "prove_families", "describe", "format_members", "Rejected",
           "EXACT_TOLERANCE", "TwinError"]
