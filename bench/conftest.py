"""pytest-benchmark micro-benchmarks (``pytest bench/ --benchmark-only``); not part of the test run.

The repository root goes first on ``sys.path`` so that the checkout's package (and its built ``_C``) is
the one measured, also when another copy is installed in the environment.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
