"""The GP functions on top of the kernel sums against their dense float64 forms: gp_marginal_log_likelihood
against the Cholesky log-likelihood of the kernel matrix, gp_posterior_variance against the dense posterior
covariance's diagonal.

gp_marginal_log_likelihood's log-determinant is a stochastic estimate, so the checks are of two kinds: exact
where the estimate has no randomness (a preconditioner that is the matrix itself leaves log|P^-1 A| = 0 for
every probe; the data-fit term and the gradient in y never depend on the probes), and within five standard
deviations elsewhere, each computed from the dense matrix: a Gaussian probe's quadratic form z^T M z has
variance 2 |M|_F^2 (M symmetric), so a mean over t probes is off by about sqrt(2 / t) |M|_F. M is log(A) for
the log-determinant and the symmetric part of A^-1 dA for a derivative's trace term.
"""
import math

import pytest
import torch

from opforge.kernels import (KernelOperator, gp_marginal_log_likelihood, gp_posterior_mean, gp_posterior_variance,
                             use_backend)
from opforge.kernels.kernel_sum import _lanczos_log_quadrature

N, D = 30, 2


def _data(seed=0, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g, dtype=dtype) * 3
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return x, y


def _dense(x, kernel, ls, os_, noise):
    n = x.shape[-2]
    K = KernelOperator(x, kernel=kernel, lengthscale=ls, outputscale=os_).to_dense()
    return K + noise * torch.eye(n, dtype=x.dtype)


def _exact(x, y, kernel, ls, os_, noise):
    """log p(y) by a Cholesky factor of the dense matrix, per column of y [..., N, R]."""
    L = torch.linalg.cholesky(_dense(x, kernel, ls, os_, noise))
    a = torch.cholesky_solve(y, L)
    return (-0.5 * (y * a).sum(-2) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)[..., None]
            - 0.5 * x.shape[-2] * math.log(2 * math.pi))


@pytest.mark.parametrize("kernel", ["gaussian", "matern32", "imq"])
def test_exact_with_a_preconditioner_that_is_the_matrix(kernel):
    """precond_rank >= N: P = A, so the estimate is exact whatever the probes; so are the value's data-fit term
    and the gradient in y always. (The pivoted Cholesky factor stops where the remaining diagonal is below
    1e-4 noise: here the Gaussian kernel matrix's at 29 of 30, leaving a P^-1 A within 1e-4 of I, whose
    estimated log-determinant was off by up to 2e-6 relative over 40 seeds of the probes.)"""
    x, y = _data()
    ls, os_, noise = 0.8, 1.5, 0.05
    yr = y.clone().requires_grad_()
    out, info = gp_marginal_log_likelihood(x, yr, kernel, noise, ls, os_, num_probes=3, precond_rank=N, tol=1e-10,
                                           return_info=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == () and out.dtype == torch.float64
    want = _exact(x, y[:, None], kernel, ls, os_, noise)[0]
    tol = 1e-9 if kernel != "gaussian" else 1e-5
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    assert info["precond_rank"] <= N and info["num_probes"] == 3 and info["converged"]
    lam = torch.linalg.eigvalsh(_dense(x, kernel, ls, os_, noise))
    torch.testing.assert_close(info["logdet"], lam.log().sum(), rtol=tol, atol=tol)
    gy, = torch.autograd.grad(out, yr)
    yw = y.clone().requires_grad_()
    gw, = torch.autograd.grad(_exact(x, yw[:, None], kernel, ls, os_, noise).sum(), yw)
    torch.testing.assert_close(gy, gw, rtol=1e-8, atol=1e-10)


def _sd(M: torch.Tensor, t: int) -> float:
    """Standard deviation of the mean of t Gaussian-probe quadratic forms of M."""
    Ms = 0.5 * (M + M.mT)
    return math.sqrt(2.0 / t) * float(torch.linalg.matrix_norm(Ms))


@pytest.mark.parametrize("rank", [0, 4])
def test_log_determinant_and_gradients_within_their_spread(rank):
    """Plain CG (rank 0) and a low-rank preconditioner: the value and every gradient (in the hyperparameters,
    and in x along a random direction) within five standard deviations of the dense float64 ones."""
    x, y = _data(1)
    kernel, t = "matern52", 2000
    p0 = torch.tensor([0.7, 1.3, 0.05], dtype=torch.float64)
    ls, os_, noise = (v.clone().requires_grad_() for v in p0)
    xr = x.clone().requires_grad_()
    gen = torch.Generator().manual_seed(7)
    out = gp_marginal_log_likelihood(xr, y, kernel, noise, ls, os_, num_probes=t, precond_rank=rank, tol=1e-9,
                                     generator=gen)
    grads = torch.autograd.grad(out, [xr, ls, os_, noise])
    A = _dense(x, kernel, *p0)
    lam, V = torch.linalg.eigh(A)
    want = _exact(x, y[:, None], kernel, *p0)[0]
    assert abs(float(out.detach() - want)) <= 5 * 0.5 * _sd(V @ torch.diag(lam.log()) @ V.T, t)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    Ainv = torch.linalg.inv(A)
    # each derivative: the exact one (autograd of the dense log-likelihood) and dA along it
    checks = [(float((grads[0] * v).sum()), lambda e: (x + e * v, *p0))]
    checks += [(float(grads[i + 1]), lambda e, i=i: (x, *(p0 + e * torch.eye(3, dtype=x.dtype)[i])))
               for i in range(3)]
    for got, at in checks:
        e = torch.zeros((), dtype=x.dtype, requires_grad=True)
        d_want = float(torch.autograd.grad(_exact(*at(e)[:1], y[:, None], kernel, *at(e)[1:])[0], e)[0])
        dA = torch.autograd.functional.jacobian(lambda e: _dense(at(e)[0], kernel, *at(e)[1:]),
                                                torch.zeros((), dtype=x.dtype))
        assert abs(got - d_want) <= 5 * 0.5 * _sd(Ainv @ dA, t) + 1e-8 * abs(d_want), (got, d_want)


def test_lanczos_quadrature_is_exact_for_a_full_run():
    """The tridiagonal built from a column's CG coefficients: its e1^T log(T) e1, times r0^T r0, is r0^T log(A)
    r0 once CG has run to the end (the Gauss quadrature of N nodes is exact for N eigenvalues)."""
    from opforge.kernels.kernel_sum import _cg
    x, _ = _data(2, n=12)
    A = KernelOperator(x, kernel="gaussian", lengthscale=0.5, noise=0.3)
    r0 = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    rec = {}
    _cg(A, r0, 1e-13, 100, None, None, rec)
    got = (rec["rz0"] * _lanczos_log_quadrature(rec["steps"]))[0]
    lam, V = torch.linalg.eigh(A.to_dense())
    want = (r0 * (V @ torch.diag(lam.log()) @ V.T @ r0)).sum(0)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_columns_and_batches():
    """y [N, R] gives one log-likelihood per column (one log-determinant shared); a batch of point sets with a
    batch of lengthscales gives each entry its own (exact here: a full preconditioner)."""
    x, y = _data(3)
    Y = torch.stack([y, -2 * y, y.flip(0)], -1)
    out = gp_marginal_log_likelihood(x, Y, "matern32", 0.1, 0.9, 1.0, precond_rank=N, tol=1e-10, num_probes=2)
    torch.testing.assert_close(out, _exact(x, Y, "matern32", 0.9, 1.0, 0.1), rtol=1e-9, atol=1e-9)
    xb = torch.stack([x, _data(4)[0]])
    lsb = torch.tensor([0.6, 1.1], dtype=x.dtype).reshape(2, 1, 1)
    out = gp_marginal_log_likelihood(xb, y, "laplacian", 0.1, lsb, precond_rank=N, tol=1e-10, num_probes=2)
    assert out.shape == (2,)
    for i in range(2):
        torch.testing.assert_close(out[i], _exact(xb[i], y[:, None], "laplacian", float(lsb[i]), 1.0, 0.1)[0],
                                   rtol=1e-9, atol=1e-9)


def test_generator_makes_it_reproducible_and_probes_move_only_the_estimate():
    x, y = _data(5)
    args = (x, y, "matern32", 0.05, 0.7)
    a = gp_marginal_log_likelihood(*args, generator=torch.Generator().manual_seed(1), precond_rank=0)
    b = gp_marginal_log_likelihood(*args, generator=torch.Generator().manual_seed(1), precond_rank=0)
    c = gp_marginal_log_likelihood(*args, generator=torch.Generator().manual_seed(2), precond_rank=0)
    assert a == b and a != c


def test_triton_path_agrees_with_torch_path():
    """Through the flash kernels (the interpreter on a CPU), float32: the same probes give the same value and
    gradients as the torch variant, to float32's rounding of a CG run."""
    x, y = (t.float() for t in _data(6, n=24))
    res = {}
    for backend in ("torch", "triton"):
        ls = torch.tensor(0.8, requires_grad=True)
        nz = torch.tensor(0.1, requires_grad=True)
        xr = x.clone().requires_grad_()
        with use_backend(backend):
            out = gp_marginal_log_likelihood(xr, y, "gaussian", nz, ls, 1.2, num_probes=4, tol=1e-5,
                                             generator=torch.Generator().manual_seed(0), precond_rank=3)
            res[backend] = (out.detach(),) + torch.autograd.grad(out, [xr, ls, nz])
    for a, b in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()))


def test_16bit_inputs_computed_in_float32():
    x, y = (t.float() for t in _data(7))
    gen = torch.Generator().manual_seed
    want = gp_marginal_log_likelihood(x.bfloat16().float(), y.bfloat16().float(), noise=0.1, generator=gen(0))
    got = gp_marginal_log_likelihood(x.bfloat16(), y.bfloat16(), noise=0.1, generator=gen(0))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gp_marginal_log_likelihood(x.bfloat16(), y.bfloat16(), noise=0.1, generator=gen(0))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_fitting_hyperparameters_reaches_the_dense_optimum():
    """Adam on the negative estimate (log-parametrised lengthscale and noise) ends where maximising the dense
    log-likelihood does: within 0.1% of its best value."""
    x, y = _data(8, n=60)

    def fit(loss_of):
        p = torch.zeros(2, dtype=x.dtype, requires_grad=True)  # log lengthscale, log noise
        opt = torch.optim.Adam([p], lr=0.1)
        for _ in range(80):
            opt.zero_grad()
            loss_of(p.exp()).backward()
            opt.step()
        return p.detach().exp()

    gen = torch.Generator().manual_seed(0)
    est = fit(lambda q: -gp_marginal_log_likelihood(x, y, "matern52", q[1], q[0], num_probes=8, generator=gen,
                                                    precond_rank=16, tol=1e-8))
    best = fit(lambda q: -_exact(x, y[:, None], "matern52", q[0], 1.0, q[1])[0])
    v_est, v_best = (float(_exact(x, y[:, None], "matern52", q[0], 1.0, q[1])[0]) for q in (est, best))
    assert v_est >= v_best - 1e-3 * abs(v_best), (est, best, v_est, v_best)


def test_bad_arguments_name_themselves():
    x, y = _data()
    with pytest.raises(ValueError, match="num_probes"):
        gp_marginal_log_likelihood(x, y, num_probes=0)
    with pytest.raises(TypeError, match="generator"):
        gp_marginal_log_likelihood(x, y, generator=0)
    with pytest.raises(ValueError, match="noise"):
        gp_marginal_log_likelihood(x, y, noise=0.0)
    with pytest.raises(ValueError, match="y must be"):
        gp_marginal_log_likelihood(x, y[:-1])


def test_unconverged_run_warns_naming_the_function():
    x, y = _data()
    with pytest.warns(RuntimeWarning, match="gp_marginal_log_likelihood: conjugate gradients did not converge"):
        out = gp_marginal_log_likelihood(x, y, noise=1e-3, max_iter=2, precond_rank=0)
    assert torch.isfinite(out)


def _dense_variance(xtr, xte, kernel, ls, os_, noise):
    A = _dense(xtr, kernel, ls, os_, noise)
    Kxs = KernelOperator(xtr, xte, kernel=kernel, lengthscale=ls, outputscale=os_).to_dense()
    prior = KernelOperator(xte, xte, kernel=kernel, lengthscale=ls, outputscale=os_).diag()
    return prior - (Kxs * torch.linalg.solve(A, Kxs)).sum(-2)


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern52", "cauchy"])
def test_posterior_variance_against_dense(kernel):
    """300 test points (three blocks of at most 128), some on the training points, some far from them: the
    dense posterior variance to float64 rounding, near the noise level at the data and outputscale far away."""
    x, _ = _data(9)
    g = torch.Generator().manual_seed(1)
    xt = torch.cat([x[:5], torch.rand(290, D, generator=g, dtype=x.dtype) * 4 - 0.5, x[:5] + 40])
    var = gp_posterior_variance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-11)
    assert var.shape == (300,) and var.dtype == torch.float64
    torch.testing.assert_close(var, _dense_variance(x, xt, kernel, 0.7, 1.3, 0.05), rtol=1e-8, atol=1e-10)
    assert float(var[:5].max()) < 0.05 and torch.allclose(var[-5:], torch.full((5,), 1.3, dtype=x.dtype))
    noisy = gp_posterior_variance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-11, include_noise=True)
    torch.testing.assert_close(noisy, var + 0.05)


def test_posterior_variance_gradients_and_batches():
    """Gradients in x_test, x_train, lengthscale, outputscale and noise against autograd through the dense form;
    a batch of lengthscales gives each entry its own variances."""
    x, _ = _data(10)
    xt = torch.rand(7, D, generator=torch.Generator().manual_seed(2), dtype=x.dtype) * 3
    leaves = [x.clone().requires_grad_(), xt.clone().requires_grad_()] + [
        torch.tensor(v, dtype=x.dtype, requires_grad=True) for v in (0.6, 1.4, 0.08)]
    w = torch.randn(7, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    got = torch.autograd.grad((gp_posterior_variance(leaves[0], leaves[1], "matern32", leaves[4], leaves[2],
                                                     leaves[3], tol=1e-12) * w).sum(), leaves)
    want = torch.autograd.grad((_dense_variance(leaves[0], leaves[1], "matern32", leaves[2], leaves[3], leaves[4])
                                * w).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    lsb = torch.tensor([0.5, 0.9], dtype=x.dtype).reshape(2, 1, 1)
    var = gp_posterior_variance(x, xt, "gaussian", 0.1, lsb, tol=1e-11)
    assert var.shape == (2, 7)
    for i in range(2):
        torch.testing.assert_close(var[i], _dense_variance(x, xt, "gaussian", float(lsb[i]), 1.0, 0.1), rtol=1e-8,
                                   atol=1e-10)


def test_posterior_variance_16bit_and_triton_path():
    x, _ = (t.float() for t in _data(11))
    xt = torch.rand(9, D, generator=torch.Generator().manual_seed(4)) * 3
    want = gp_posterior_variance(x.bfloat16().float(), xt.bfloat16().float(), noise=0.1, tol=1e-7)
    got = gp_posterior_variance(x.bfloat16(), xt.bfloat16(), noise=0.1, tol=1e-7)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = gp_posterior_variance(x.bfloat16(), xt.bfloat16(), noise=0.1, tol=1e-7)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, want)
    with use_backend("triton"):
        tri = gp_posterior_variance(x, xt, "matern52", 0.1, 0.8, tol=1e-6)
    torch.testing.assert_close(tri, gp_posterior_variance(x, xt, "matern52", 0.1, 0.8, tol=1e-6), rtol=1e-4,
                               atol=1e-5)


def test_posterior_variance_bad_arguments():
    x, _ = _data()
    with pytest.raises(ValueError, match="x_test must be"):
        gp_posterior_variance(x, torch.randn(4, D + 1, dtype=x.dtype))
    with pytest.raises(TypeError, match="x_test must have x_train's dtype"):
        gp_posterior_variance(x, torch.randn(4, D))
    with pytest.raises(ValueError, match="x_test must be finite"):
        gp_posterior_variance(x, torch.full((4, D), float("nan"), dtype=x.dtype))
    with pytest.raises(ValueError, match="x_train must be finite"):
        gp_posterior_variance(x * float("inf"), x[:3])
    with pytest.raises(ValueError, match="noise"):
        gp_posterior_variance(x, x[:0], noise=-1.0)
    with pytest.raises(TypeError, match="include_noise"):
        gp_posterior_variance(x, x[:3], include_noise=1)


def test_posterior_mean_under_autocast_is_float32():
    """Under autocast every GP function answers in float32, as kernel_solve and kernel_matvec do (the posterior
    mean took its 16-bit branch first and answered in bfloat16)."""
    x, y = (t.float() for t in _data(12))
    xt = x[:4] + 0.1
    want = gp_posterior_mean(x.bfloat16().float(), y.bfloat16().float(), xt.bfloat16().float(), noise=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gp_posterior_mean(x.bfloat16(), y.bfloat16(), xt.bfloat16(), noise=0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
