"""The names that every layer shares: moment columns, family kinds, prediction kinds.

One home so that the kernel's column order, the families, the theory, the tracker's history and the run
folder's files cannot drift apart.
"""
from __future__ import annotations

# Columns of slice_moments' result, in order: for each slice, the sums of x, y, z and their products.
MOMENTS = ("x", "y", "z", "xx", "yy", "zz", "xy", "xz", "yz")
COL = {name: i for i, name in enumerate(MOMENTS)}

# Symmetry kinds (THEORY.md §1.2).
KINDS = ("translation", "scale", "rescale")

# Predictions the tracker integrates beside the empirical values (THEORY.md §3, §4).
PREDICTIONS = ("exact", "paper", "modified")
