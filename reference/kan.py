"""NumPy float64 reference of Kolmogorov-Arnold (KAN) layers, written from the math.

    y[b, o] = sum_i sum_k W[o, i, k] phi_k(x[b, i])  +  sum_i Wb[o, i] silu(x[b, i])  +  bias[o]

Bases phi_k (K per input feature):

* ``bspline``: B-splines of order ``p`` on a per-feature knot vector t_0 < ... < t_{G+2p}
  (efficient-kan's "extended" grid), K = G + p, by the Cox-de Boor recursion with
  half-open intervals [t_j, t_{j+1}); zero outside [t_0, t_{G+2p}).
  B'_{m,p} = p (B_{m,p-1} / (t_{m+p} - t_m) - B_{m+1,p-1} / (t_{m+p+1} - t_{m+1})).
* ``rbf``: Gaussian bumps exp(-((x - c_k) / h)^2) at centres c_k (FastKAN).
* ``chebyshev``: T_k(tanh x) = cos(k arccos(tanh x)), k = 0..degree (ChebyKAN);
  dT_k/dt = k U_{k-1}(t), so d/dx = k U_{k-1}(t) (1 - t^2).
* ``fourier``: cos(k x) for k = 1..G, then sin(k x) for k = 1..G, K = 2G (FourierKAN).
"""
from __future__ import annotations

import numpy as np

BASES = ("bspline", "rbf", "chebyshev", "fourier")


def bspline_basis(x: np.ndarray, grid: np.ndarray, order: int, derivative: bool = False) -> np.ndarray:
    """x [B, I], grid [I, G + 2p + 1] -> [B, I, G + p] (or its derivative in x)."""
    x = np.asarray(x, np.float64)[:, :, None]
    t = np.asarray(grid, np.float64)[None]
    bases = ((x >= t[..., :-1]) & (x < t[..., 1:])).astype(np.float64)
    lower = None
    for p in range(1, order + 1):
        lower = bases
        left = (x - t[..., : -(p + 1)]) / (t[..., p:-1] - t[..., : -(p + 1)]) * bases[..., :-1]
        right = (t[..., p + 1:] - x) / (t[..., p + 1:] - t[..., 1:-p]) * bases[..., 1:]
        bases = left + right
    if not derivative:
        return bases
    if order == 0:
        return np.zeros_like(bases)
    p = order
    d1 = t[..., p:-1] - t[..., : -(p + 1)]  # t_{m+p} - t_m for m = 0 .. G+p-1
    d2 = t[..., p + 1:] - t[..., 1:-p]  # t_{m+p+1} - t_{m+1}
    return p * (lower[..., :-1] / d1 - lower[..., 1:] / d2)


def chebyshev_basis(x, degree: int, derivative: bool = False) -> np.ndarray:
    t = np.tanh(np.asarray(x, np.float64))[..., None]
    k = np.arange(degree + 1)
    if not derivative:
        return np.cos(k * np.arccos(t))
    u = [np.ones_like(t[..., 0]), 2 * t[..., 0]]  # U_0, U_1, ...
    for _ in range(2, degree + 1):
        u.append(2 * t[..., 0] * u[-1] - u[-2])
    du = [np.zeros_like(t[..., 0])] + [kk * u[kk - 1] for kk in range(1, degree + 1)]
    return np.stack(du, -1) * (1 - t ** 2)


def rbf_basis(x, centers, width: float, derivative: bool = False) -> np.ndarray:
    z = (np.asarray(x, np.float64)[..., None] - np.asarray(centers, np.float64)) / width
    phi = np.exp(-z * z)
    return -2 * z / width * phi if derivative else phi


def fourier_basis(x, grid_size: int, derivative: bool = False) -> np.ndarray:
    x = np.asarray(x, np.float64)[..., None]
    k = np.arange(1, grid_size + 1)
    if derivative:
        return np.concatenate([-k * np.sin(k * x), k * np.cos(k * x)], -1)
    return np.concatenate([np.cos(k * x), np.sin(k * x)], -1)


def basis(x, kind: str, derivative: bool = False, grid=None, order=3, centers=None, width=None, degree=None,
          grid_size=None) -> np.ndarray:
    if kind == "bspline":
        return bspline_basis(x, grid, order, derivative)
    if kind == "rbf":
        return rbf_basis(x, centers, width, derivative)
    if kind == "chebyshev":
        return chebyshev_basis(x, degree, derivative)
    if kind == "fourier":
        return fourier_basis(x, grid_size, derivative)
    raise ValueError(f"unknown basis {kind!r}; valid: {BASES}")


def silu(x):
    return x / (1 + np.exp(-x))


def dsilu(x):
    s = 1 / (1 + np.exp(-x))
    return s * (1 + x * (1 - s))


def kan_linear(x, weight, kind, base_weight=None, bias=None, **basis_args) -> np.ndarray:
    """x [B, I], weight [O, I, K] -> y [B, O]."""
    x = np.asarray(x, np.float64)
    y = np.einsum("bik,oik->bo", basis(x, kind, **basis_args), np.asarray(weight, np.float64))
    if base_weight is not None:
        y = y + silu(x) @ np.asarray(base_weight, np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def kan_linear_vjp(x, weight, kind, g, base_weight=None, **basis_args):
    """Gradients (dx, dweight, dbase_weight) of sum(kan_linear(...) * g)."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, weight, g))
    phi = basis(x, kind, **basis_args)
    dphi = basis(x, kind, derivative=True, **basis_args)
    dx = np.einsum("bo,oik,bik->bi", g, w, dphi)
    dw = np.einsum("bo,bik->oik", g, phi)
    dwb = None
    if base_weight is not None:
        wb = np.asarray(base_weight, np.float64)
        dx = dx + (g @ wb) * dsilu(x)
        dwb = g.T @ silu(x)
    return dx, dw, dwb
