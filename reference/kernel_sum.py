"""NumPy float64 reference of kernel sums (kernel-matrix times vectors), with gradients.

    out[i, r] = outputscale * sum_j k(r_ij) b[j, r],   r_ij = || (x_i - y_j) / lengthscale ||

``lengthscale`` is a scalar or one value per dimension (ARD). Kernels, as in
GPyTorch (``RBFKernel``, ``MaternKernel`` nu=3/2, 5/2) and KeOps' usual
formulas (``tests/test_keops_parity.py`` checks opforge against KeOps itself, with
those formulas written as a KeOps user writes them), with s = r^2:

    gaussian   exp(-s / 2)
    laplacian  exp(-r)
    matern32   (1 + sqrt3 r) exp(-sqrt3 r)
    matern52   (1 + sqrt5 r + 5/3 s) exp(-sqrt5 r)
    imq        (1 + s)^(-1/2)
    cauchy     1 / (1 + s)

Gradients use dk/ds; at r = 0 the Laplacian's dk/ds is unbounded but its
contribution dk/ds * 2 (x - y) is defined here as 0 (the symmetric
subgradient), so coincident points give finite gradients.

The GP functions built on kernel sums (``gp_log_marginal_likelihood``,
``gp_posterior_variance``) are dense linear algebra on the kernel matrix here.
"""
from __future__ import annotations

import numpy as np

S3, S5 = np.sqrt(3.0), np.sqrt(5.0)
KERNELS = ("gaussian", "laplacian", "matern32", "matern52", "imq", "cauchy")


def phi(s: np.ndarray, kernel: str) -> np.ndarray:
    """k as a function of the squared scaled distance s."""
    r = np.sqrt(s)
    if kernel == "gaussian":
        return np.exp(-0.5 * s)
    if kernel == "laplacian":
        return np.exp(-r)
    if kernel == "matern32":
        return (1 + S3 * r) * np.exp(-S3 * r)
    if kernel == "matern52":
        return (1 + S5 * r + 5.0 / 3.0 * s) * np.exp(-S5 * r)
    if kernel == "imq":
        return 1 / np.sqrt(1 + s)
    if kernel == "cauchy":
        return 1 / (1 + s)
    raise ValueError(f"unknown kernel {kernel!r}; valid: {KERNELS}")


def dphi(s: np.ndarray, kernel: str) -> np.ndarray:
    """dk/ds (0 where the Laplacian's derivative is singular, at s = 0)."""
    r = np.sqrt(s)
    if kernel == "gaussian":
        return -0.5 * np.exp(-0.5 * s)
    if kernel == "laplacian":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s > 0, -np.exp(-r) / (2 * np.where(s > 0, r, 1.0)), 0.0)
    if kernel == "matern32":
        return -1.5 * np.exp(-S3 * r)
    if kernel == "matern52":
        return -5.0 / 6.0 * (1 + S5 * r) * np.exp(-S5 * r)
    if kernel == "imq":
        return -0.5 * (1 + s) ** -1.5
    if kernel == "cauchy":
        return -1 / (1 + s) ** 2
    raise ValueError(f"unknown kernel {kernel!r}; valid: {KERNELS}")


def _scaled_diff(x, y, lengthscale):
    ls = np.broadcast_to(np.asarray(lengthscale, dtype=np.float64), (x.shape[-1],))
    diff = (x[:, None, :] - y[None, :, :]) / ls  # [N, M, D]
    return diff, ls


def kernel_matrix(x, y, kernel="gaussian", lengthscale=1.0, outputscale=1.0) -> np.ndarray:
    """Dense K [N, M] for x [N, D], y [M, D]."""
    diff, _ = _scaled_diff(np.asarray(x, np.float64), np.asarray(y, np.float64), lengthscale)
    return outputscale * phi((diff ** 2).sum(-1), kernel)


def kernel_matvec(x, y, b, kernel="gaussian", lengthscale=1.0, outputscale=1.0) -> np.ndarray:
    """out [..., N, R] for x [..., N, D], y [..., M, D], b [..., M, R] (leading dims equal)."""
    x, y, b = (np.asarray(a, np.float64) for a in (x, y, b))
    lead = x.shape[:-2]
    xs, ys, bs = x.reshape((-1,) + x.shape[-2:]), y.reshape((-1,) + y.shape[-2:]), b.reshape((-1,) + b.shape[-2:])
    out = np.stack([kernel_matrix(xi, yi, kernel, lengthscale, outputscale) @ bi for xi, yi, bi in zip(xs, ys, bs)])
    return out.reshape(lead + out.shape[-2:])


def kernel_matvec_vjp(x, y, b, g, kernel="gaussian", lengthscale=1.0, outputscale=1.0):
    """Gradients (dx, dy, db, dlengthscale) of sum(kernel_matvec(...) * g), single batch: x [N, D] etc.

    With s_ij = sum_d (x_id - y_jd)^2 / l_d^2 and w_ij = outputscale * <g_i, b_j>:
    dx_i = sum_j w_ij phi'(s_ij) 2 (x_i - y_j) / l^2,  dy_j = -sum_i (same),
    db_j = outputscale * sum_i k_ij g_i,  dl_d = sum_ij w_ij phi'(s_ij) (-2 (x_id - y_jd)^2 / l_d^3).
    ``dlengthscale`` has the lengthscale's shape (a scalar sums over d).
    """
    x, y, b, g = (np.asarray(a, np.float64) for a in (x, y, b, g))
    diff, ls = _scaled_diff(x, y, lengthscale)  # diff = (x - y) / l
    s = (diff ** 2).sum(-1)
    K = phi(s, kernel)
    w = outputscale * (g @ b.T)  # [N, M]
    dk = dphi(s, kernel) * w
    dx = 2 * np.einsum("nm,nmd->nd", dk, diff) / ls
    dy = -2 * np.einsum("nm,nmd->md", dk, diff) / ls
    db = outputscale * K.T @ g
    dl_vec = -2 * np.einsum("nm,nmd->d", dk, diff ** 2) / ls
    dl = dl_vec if np.ndim(lengthscale) else dl_vec.sum()
    return dx, dy, db, dl


def _noisy_kernel_matrix(x, kernel, noise, lengthscale, outputscale) -> np.ndarray:
    """A = outputscale K(x, x) + noise I for x [N, D]."""
    x = np.asarray(x, np.float64)
    return kernel_matrix(x, x, kernel, lengthscale, outputscale) + noise * np.eye(len(x))


def gp_log_marginal_likelihood(x, y, kernel="gaussian", noise=1e-2, lengthscale=1.0, outputscale=1.0):
    """log p(y | x) = -1/2 y^T A^-1 y - 1/2 log|A| - N/2 log(2 pi), A = outputscale K(x, x) + noise I, from a
    Cholesky factor A = L L^T (log|A| = 2 sum log L_ii). x [N, D]; y [N] (a number) or [N, R] (one per
    column)."""
    y = np.asarray(y, np.float64)
    L = np.linalg.cholesky(_noisy_kernel_matrix(x, kernel, noise, lengthscale, outputscale))
    Y = y.reshape(len(L), -1)
    alpha = np.linalg.solve(L.T, np.linalg.solve(L, Y))
    out = -0.5 * (Y * alpha).sum(0) - np.log(np.diag(L)).sum() - 0.5 * len(L) * np.log(2 * np.pi)
    return out[0] if y.ndim == 1 else out


def gp_posterior_variance(x_train, x_test, kernel="gaussian", noise=1e-2, lengthscale=1.0, outputscale=1.0):
    """Posterior variance of the latent function at each test point, the diagonal of
    K(x*, x*) - K(x*, X) A^-1 K(X, x*) with A = outputscale K(X, X) + noise I: [T] for x_test [T, D]."""
    A = _noisy_kernel_matrix(x_train, kernel, noise, lengthscale, outputscale)
    Ks = kernel_matrix(x_train, x_test, kernel, lengthscale, outputscale)  # [N, T]
    prior = outputscale * phi(np.zeros(len(np.asarray(x_test))), kernel)  # k(x*, x*) = outputscale phi(0)
    return prior - (Ks * np.linalg.solve(A, Ks)).sum(0)
