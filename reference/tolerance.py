"""One tolerance table per dtype, scaled by the reduction length.

An output is compared by its *normalised* max error, ``max|a - e| / max|e|``;
the bound is ``FACTOR[dtype] * eps(dtype) * sqrt(reduction)`` (16-bit dtypes: see
``tolerance``), ``reduction`` being the number of terms summed into each output
element (e.g. in_channels x grid points for a spectral convolution).  float32 kernels on the GPU use
3xTF32 dot products, whose error is of float32's order, so the same row holds; ``float32-tf32`` is the
row for float32 data under TF32 dot products (torch's float32 matmul setting allows TF32: operands
rounded to a 10-bit mantissa, unit roundoff 2^-11).
"""
from __future__ import annotations

import math

import numpy as np

EPS = {
    "float64": 2.220446049250313e-16,
    "float32": 1.1920928955078125e-07,
    "float16": 9.765625e-04,
    "bfloat16": 7.8125e-03,
    "float32-tf32": 4.8828125e-04,
}
FACTOR = {"float64": 16.0, "float32": 16.0, "float16": 4.0, "bfloat16": 2.0, "float32-tf32": 8.0}
_ROUNDED = ("bfloat16", "float16", "float32-tf32")  # a fixed rounding-level error plus float32 accumulation


def _name(dtype) -> str:
    """A torch dtype or its name (``"float32-tf32"`` included) as a row of the table."""
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name not in EPS:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {sorted(EPS)}")
    return name


def tolerance(dtype, reduction: int = 1) -> float:
    """Bound on the normalised max error for a result of ``dtype`` summing ``reduction`` terms.

    float32/float64: ``FACTOR * eps * sqrt(reduction)``. 16-bit results are accumulated in float32 by
    every opforge kernel (and the reference sees the same 16-bit-rounded inputs), so their error is
    the final rounding to the 16-bit dtype (bfloat16 data's TF32 operand rounding, 2^-11, is below it;
    float16 data takes 3xTF32) plus the
    float32 accumulation: ``FACTOR * eps16 + FACTOR32 * eps32 * sqrt(reduction)``. Scaling eps16 by
    sqrt(reduction) instead would allow errors of order one at realistic reductions. ``float32-tf32``
    takes the same form with TF32's operand rounding: each product of rounded operands errs by about
    2^-11 of itself, independently, so the sum errs by about 2^-11 of the terms' root-sum-square, which
    is the result's own scale when terms of both signs are summed.
    """
    n = _name(dtype)
    red = math.sqrt(max(int(reduction), 1))
    if n in _ROUNDED:
        return FACTOR[n] * EPS[n] + FACTOR["float32"] * EPS["float32"] * red
    return FACTOR[n] * EPS[n] * red


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        if a.is_complex():
            a = a.to(dtype=a.dtype).resolve_conj()
        else:
            a = a.double()
        a = a.numpy()
    return np.asarray(a)


def rel_error(actual, expected) -> float:
    """``max|actual - expected| / max|expected|`` (0 for two empty arrays)."""
    a, e = _np(actual), _np(expected)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    if e.size == 0:
        return 0.0
    scale = float(np.max(np.abs(e)))
    return float(np.max(np.abs(a - e))) / (scale if scale > 0 else 1.0)


def assert_close(actual, expected, dtype, reduction: int = 1, what: str = "output") -> float:
    """Raise AssertionError naming ``what`` when the normalised error is over the bound."""
    err = rel_error(actual, expected)
    tol = tolerance(dtype, reduction)
    if not err <= tol:
        raise AssertionError(f"{what}: normalised max error {err:.3e} > tolerance {tol:.3e} ({dtype}, reduction {reduction})")
    return err


def assert_rounded_once(actual, expected, slack: float = 1e-5, what: str = "output") -> None:
    """Raise AssertionError naming ``what`` unless every element of a float16 or bfloat16 ``actual`` is within
    one rounding of ``expected`` (float64), u |expected| (u = 2^-11 float16, 2^-8 bfloat16), plus ``slack``
    of max |expected| (the float32 computation's own error): a 16-bit result rounded once, no 16-bit
    intermediate before it."""
    a = actual.detach()
    units = {"torch.float16": 2.0 ** -11, "torch.bfloat16": 2.0 ** -8}
    if str(a.dtype) not in units:
        raise AssertionError(f"{what}: a float16 or bfloat16 result expected, got {a.dtype}")
    a, e = _np(a), _np(expected)
    over = float(np.max(np.abs(a - e) - (units[str(actual.dtype)] * np.abs(e) + slack * np.max(np.abs(e)))))
    if not over <= 0:
        raise AssertionError(f"{what}: {over:.2e} past one {actual.dtype} rounding")
