"""NumPy float64 references for every opforge op: plain, readable math, never calling opforge.

Each module ``opforge.reference.X`` mirrors ``opforge.kernels.X``.
"""
from .tolerance import assert_close, assert_rounded_once, rel_error, tolerance

__all__ = ["assert_close", "assert_rounded_once", "rel_error", "tolerance"]
