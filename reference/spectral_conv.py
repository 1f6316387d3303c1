"""NumPy float64 reference of the FNO spectral convolution (neuraloperator's dense ``SpectralConv``).

Semantics (Li et al., "Fourier Neural Operator", with neuraloperator's layout):

    X  = rfftn(x, norm="forward")            over the d spatial axes of x [B, in, *grid]
    Y[b, o, k] = sum_i X[b, i, k] * W[i, o, k]   for every kept mode k
    y  = irfftn(Y placed at its frequencies in an [B, out, *output_grid] spectrum,
                s=output_grid, norm="forward")  + bias[o]

(``fft_norm`` "backward" or "ortho" puts the 1/N on the inverse, or 1/sqrt(N) on each, instead.)

Kept modes, in the weight's layout W[in, out, m_1, ..., m_d]:

* on every axis but the last, index j is frequency ``j - m // 2`` (negative and
  positive frequencies around 0);
* on the last axis, index j is frequency ``j`` (0 ... m_d - 1 of the half spectrum).

Frequencies are placed in an FFT-ordered spectrum at ``f mod N``: numpy's
semantics, correct on odd sizes too (neuraloperator 2.0.0 shifts odd sizes by
one with ``fftshift`` where ``ifftshift`` is due).  ``irfftn`` keeps the real
part of the self-conjugate bins (Hermitian-consistent inverse).
"""
from __future__ import annotations

import numpy as np


def mode_positions(m: int, n: int, last: bool) -> np.ndarray:
    """Positions, in an FFT-ordered axis of length ``n``, of the ``m`` kept modes."""
    j = np.arange(m)
    return j if last else (j - m // 2) % n


def _half(n: int) -> int:
    return n // 2 + 1


def _gather(spec: np.ndarray, modes, grid) -> np.ndarray:
    """Kept modes of an rfftn spectrum [.., *grid'] -> [.., *modes]."""
    d = len(modes)
    for ax in range(d):
        pos = mode_positions(modes[ax], grid[ax], ax == d - 1)
        spec = np.take(spec, pos, axis=spec.ndim - d + ax)
    return spec


def _scatter(vals: np.ndarray, modes, grid) -> np.ndarray:
    """Place [.., *modes] at their frequencies in a zero [.., *grid[:-1], grid[-1]//2+1] spectrum."""
    d = len(modes)
    lead = vals.shape[: vals.ndim - d]
    out = np.zeros(lead + tuple(grid[:-1]) + (_half(grid[-1]),), dtype=np.complex128)
    idx = np.ix_(*[mode_positions(modes[ax], grid[ax], ax == d - 1) for ax in range(d)])
    out[(Ellipsis,) + idx] = vals
    return out


def _last_axis_weights(m: int, n: int) -> np.ndarray:
    """Multiplicity of each kept last-axis frequency in a real signal of length n (1 or 2)."""
    c = np.full(m, 2.0)
    c[0] = 1.0
    if n % 2 == 0 and m > n // 2:
        c[n // 2] = 1.0
    return c


def check_modes(modes, grid, what: str) -> None:
    d = len(modes)
    for ax in range(d):
        limit = _half(grid[ax]) if ax == d - 1 else grid[ax]
        if not 1 <= modes[ax] <= limit:
            raise ValueError(f"{what}: {modes[ax]} modes on axis {ax} do not fit a grid of {grid[ax]} (at most {limit})")


def spectral_conv(x, weight, bias=None, output_shape=None, fft_norm="forward") -> np.ndarray:
    """Forward pass. x [B, in, *grid] real; weight [in, out, *modes] complex; bias [out] or None;
    ``fft_norm`` the norm of both transforms (numpy's: "forward", "backward" or "ortho")."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.complex128)
    d = w.ndim - 2
    grid = x.shape[2:]
    out_grid = tuple(output_shape) if output_shape is not None else tuple(grid)
    modes = w.shape[2:]
    check_modes(modes, grid, "input grid")
    check_modes(modes, out_grid, "output grid")
    axes = tuple(range(2, 2 + d))
    X = _gather(np.fft.rfftn(x, axes=axes, norm=fft_norm), modes, grid)
    Y = np.einsum("bi...,io...->bo...", X, w)
    y = np.fft.irfftn(_scatter(Y, modes, out_grid), s=out_grid, axes=axes, norm=fft_norm)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * d)
    return y


def spectral_conv_vjp(x, weight, bias, grad_y, output_shape=None):
    """Gradients (dx, dweight, dbias) of ``sum(spectral_conv(x, weight, bias) * grad_y)``.

    Everything is linear, so these are adjoints written out:

    * y = sum_k c_k Re(Y_k e^{+i theta}) with c_k the last-axis multiplicity, so
      dY_k = c_k * rfftn(grad_y, norm="backward")_k  (PyTorch's convention for
      complex gradients: dL/dRe + i dL/dIm);
    * dX = sum_o dY conj(W),  dW = sum_b conj(X) dY;
    * X_k = (1/N) sum_n x_n e^{-i theta}, so dx = (1/N) Re sum_k dX_k e^{+i theta}
      = irfftn(dX / c, norm="backward") on the input grid.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.complex128)
    g = np.asarray(grad_y, dtype=np.float64)
    d = w.ndim - 2
    grid = x.shape[2:]
    out_grid = tuple(output_shape) if output_shape is not None else tuple(grid)
    modes = w.shape[2:]
    axes = tuple(range(2, 2 + d))
    X = _gather(np.fft.rfftn(x, axes=axes, norm="forward"), modes, grid)
    dY = _gather(np.fft.rfftn(g, axes=axes, norm="backward"), modes, out_grid)
    dY = dY * _last_axis_weights(modes[-1], out_grid[-1])
    dX = np.einsum("bo...,io...->bi...", dY, np.conj(w))
    dW = np.einsum("bi...,bo...->io...", np.conj(X), dY)
    dX = dX / _last_axis_weights(modes[-1], grid[-1])
    dx = np.fft.irfftn(_scatter(dX, modes, grid), s=grid, axes=axes, norm="backward")
    db = None if bias is None else g.sum(axis=(0,) + axes).reshape(np.shape(bias))
    return dx, dW, db
