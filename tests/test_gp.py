"""The GP functions on top of the kernel sums against the NumPy float64 references
(``opforge.reference.kernel_sum``: the Cholesky log-likelihood of the dense kernel matrix, the dense posterior
covariance's diagonal), their gradients against central differences of those references.

gp_marginal_log_likelihood's log-determinant is a stochastic estimate, so the checks are of two kinds: exact
where the estimate has no randomness (a preconditioner that is the matrix itself leaves log|P^-1 A| = 0 for
every probe; the data-fit term and the gradient in y never depend on the probes), and within five standard
deviations elsewhere, each computed from the dense matrix: a Gaussian probe's quadratic form z^T M z has
variance 2 |M|_F^2 (M symmetric), so a mean over t probes is off by about sqrt(2 / t) |M|_F. M is log(A) for
the log-determinant and the symmetric part of A^-1 dA for a derivative's trace term.

These are the conjugate-gradient paths (``method="cg"``, which "auto" takes only above 800 points); the
Cholesky path is tested in test_gp_cholesky.py.
"""
import functools

import numpy as np
import pytest
import scipy.optimize
import torch

from opforge import kernels
from opforge.kernels import KernelOperator, use_backend
from opforge.kernels.kernel_sum import _cg, _lanczos_log_quadrature
from opforge.reference import kernel_sum as ref

gp_marginal_log_likelihood = functools.partial(kernels.gp_marginal_log_likelihood, method="cg")
gp_posterior_mean = functools.partial(kernels.gp_posterior_mean, method="cg")
gp_posterior_variance = functools.partial(kernels.gp_posterior_variance, method="cg")

N, D = 30, 2


def _data(seed=0, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g, dtype=dtype) * 3
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return x, y


def _np(t):
    return t.detach().double().numpy()


def _dense(x, kernel, ls, os_, noise):
    """The NumPy A = outputscale K(x, x) + noise I."""
    return ref.kernel_matrix(x, x, kernel, ls, os_) + noise * np.eye(len(x))


def _diff(f, h=1e-5):
    """d f(e) / de at 0 by central differences (f of a float)."""
    return (f(h) - f(-h)) / (2 * h)


@pytest.mark.parametrize("kernel", ["gaussian", "matern32", "imq"])
def test_exact_with_a_preconditioner_that_is_the_matrix(kernel):
    """precond_rank >= N: P = A, so the estimate is exact whatever the probes; so are the value's data-fit term
    and the gradient in y (-A^-1 y) always. (The pivoted Cholesky factor stops where the remaining diagonal is
    below 1e-4 noise: here the Gaussian kernel matrix's at 29 of 30, leaving a P^-1 A within 1e-4 of I, whose
    estimated log-determinant was off by up to 2e-6 relative over 40 seeds of the probes.)"""
    x, y = _data()
    ls, os_, noise = 0.8, 1.5, 0.05
    yr = y.clone().requires_grad_()
    out, info = gp_marginal_log_likelihood(x, yr, kernel, noise, ls, os_, num_probes=3, precond_rank=N, tol=1e-10,
                                           return_info=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == () and out.dtype == torch.float64
    tol = 1e-9 if kernel != "gaussian" else 1e-5
    want = ref.gp_log_marginal_likelihood(_np(x), _np(y), kernel, noise, ls, os_)
    np.testing.assert_allclose(float(out.detach()), want, rtol=tol, atol=tol)
    assert info["precond_rank"] <= N and info["num_probes"] == 3 and info["converged"]
    A = _dense(_np(x), kernel, ls, os_, noise)
    np.testing.assert_allclose(float(info["logdet"]), np.linalg.slogdet(A)[1], rtol=tol, atol=tol)
    gy, = torch.autograd.grad(out, yr)
    np.testing.assert_allclose(_np(gy), -np.linalg.solve(A, _np(y)), rtol=1e-8, atol=1e-10)


def _sd(M: np.ndarray, t: int) -> float:
    """Standard deviation of the mean of t Gaussian-probe quadratic forms of M."""
    return float(np.sqrt(2.0 / t) * np.linalg.norm(0.5 * (M + M.T)))


@pytest.mark.parametrize("rank", [0, 4])
def test_log_determinant_and_gradients_within_their_spread(rank):
    """Plain CG (rank 0) and a low-rank preconditioner: the value and every gradient (in the hyperparameters,
    and in x along a random direction) within five standard deviations of the reference's."""
    x, y = _data(1)
    kernel, t = "matern52", 2000
    p0 = np.array([0.7, 1.3, 0.05])  # lengthscale, outputscale, noise
    ls, os_, noise = (torch.tensor(v, dtype=x.dtype, requires_grad=True) for v in p0)
    xr = x.clone().requires_grad_()
    out = gp_marginal_log_likelihood(xr, y, kernel, noise, ls, os_, num_probes=t, precond_rank=rank, tol=1e-9,
                                     generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out, [xr, ls, os_, noise])
    xn, yn = _np(x), _np(y)
    A = _dense(xn, kernel, *p0)
    lam, V = np.linalg.eigh(A)
    want = ref.gp_log_marginal_likelihood(xn, yn, kernel, p0[2], p0[0], p0[1])
    assert abs(float(out.detach()) - want) <= 5 * 0.5 * _sd(V @ np.diag(np.log(lam)) @ V.T, t)
    v = np.random.default_rng(3).standard_normal(xn.shape)
    Ainv = np.linalg.inv(A)
    # each derivative: the points along v, then each hyperparameter; (x, lengthscale, outputscale, noise) at e
    moves = [(float((_np(grads[0]) * v).sum()), lambda e: (xn + e * v, *p0))]
    moves += [(float(grads[i + 1]), lambda e, i=i: (xn, *(p0 + e * np.eye(3)[i]))) for i in range(3)]
    for got, at in moves:
        d_want = _diff(lambda e: ref.gp_log_marginal_likelihood(at(e)[0], yn, kernel, at(e)[3], at(e)[1], at(e)[2]))
        dA = _diff(lambda e: _dense(at(e)[0], kernel, *at(e)[1:]))
        assert abs(got - d_want) <= 5 * 0.5 * _sd(Ainv @ dA, t) + 1e-6 * abs(d_want), (got, d_want)


def test_lanczos_quadrature_is_exact_for_a_full_run():
    """The tridiagonal built from a column's CG coefficients: its e1^T log(T) e1, times r0^T r0, is r0^T log(A)
    r0 once CG has run to the end (the Gauss quadrature of N nodes is exact for N eigenvalues)."""
    x, _ = _data(2, n=12)
    A = KernelOperator(x, kernel="gaussian", lengthscale=0.5, noise=0.3)
    r0 = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    rec = {}
    _cg(A, r0, 1e-13, 100, None, None, rec)
    got = (rec["rz0"] * _lanczos_log_quadrature(rec["steps"]))[0]
    lam, V = np.linalg.eigh(_dense(_np(x), "gaussian", 0.5, 1.0, 0.3))
    want = (_np(r0) * (V @ np.diag(np.log(lam)) @ V.T @ _np(r0))).sum(0)
    np.testing.assert_allclose(_np(got), want, rtol=1e-7, atol=1e-9)


def test_columns_and_batches():
    """y [N, R] gives one log-likelihood per column (one log-determinant shared); a batch of point sets with a
    batch of lengthscales gives each entry its own (exact here: a full preconditioner)."""
    x, y = _data(3)
    Y = torch.stack([y, -2 * y, y.flip(0)], -1)
    out = gp_marginal_log_likelihood(x, Y, "matern32", 0.1, 0.9, 1.0, precond_rank=N, tol=1e-10, num_probes=2)
    np.testing.assert_allclose(_np(out), ref.gp_log_marginal_likelihood(_np(x), _np(Y), "matern32", 0.1, 0.9),
                               rtol=1e-9, atol=1e-9)
    xb = torch.stack([x, _data(4)[0]])
    lsb = torch.tensor([0.6, 1.1], dtype=x.dtype).reshape(2, 1, 1)
    out = gp_marginal_log_likelihood(xb, y, "laplacian", 0.1, lsb, precond_rank=N, tol=1e-10, num_probes=2)
    assert out.shape == (2,)
    for i in range(2):
        np.testing.assert_allclose(float(out[i]), ref.gp_log_marginal_likelihood(_np(xb[i]), _np(y), "laplacian",
                                                                                 0.1, float(lsb[i])),
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


def test_fitting_hyperparameters_reaches_the_reference_optimum():
    """Adam on the negative estimate (log-parametrised lengthscale and noise) ends where maximising the
    reference log-likelihood does (scipy's L-BFGS-B on it): within 0.1% of its best value (at 80 steps of
    lr 0.1 alone it was 0.6% short, still moving)."""
    x, y = _data(8, n=60)
    xn, yn = _np(x), _np(y)

    def ref_ll(q):  # q: lengthscale, noise
        return ref.gp_log_marginal_likelihood(xn, yn, "matern52", q[1], q[0])

    p = torch.zeros(2, dtype=x.dtype, requires_grad=True)  # log lengthscale, log noise
    opt = torch.optim.Adam([p], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(120):
        if step == 80:  # smaller steps at the end: the gradient estimates' noise then moves p less
            opt.param_groups[0]["lr"] = 0.03
        opt.zero_grad()
        q = p.exp()
        (-gp_marginal_log_likelihood(x, y, "matern52", q[1], q[0], num_probes=8, generator=gen, precond_rank=16,
                                     tol=1e-8)).backward()
        opt.step()
    best = scipy.optimize.minimize(lambda lq: -ref_ll(np.exp(lq)), np.zeros(2), method="L-BFGS-B")
    v_est, v_best = ref_ll(_np(p.exp())), -best.fun
    assert v_est >= v_best - 1e-3 * abs(v_best), (_np(p.exp()), np.exp(best.x), v_est, v_best)


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


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern52", "cauchy"])
def test_posterior_variance_against_reference(kernel):
    """300 test points (three blocks of at most 128), some on the training points, some far from them: the
    reference to float64 rounding, near the noise level at the data and outputscale far away."""
    x, _ = _data(9)
    g = torch.Generator().manual_seed(1)
    xt = torch.cat([x[:5], torch.rand(290, D, generator=g, dtype=x.dtype) * 4 - 0.5, x[:5] + 40])
    var = gp_posterior_variance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-11)
    assert var.shape == (300,) and var.dtype == torch.float64
    np.testing.assert_allclose(_np(var), ref.gp_posterior_variance(_np(x), _np(xt), kernel, 0.05, 0.7, 1.3),
                               rtol=1e-8, atol=1e-10)
    assert float(var[:5].max()) < 0.05 and torch.allclose(var[-5:], torch.full((5,), 1.3, dtype=x.dtype))
    noisy = gp_posterior_variance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-11, include_noise=True)
    torch.testing.assert_close(noisy, var + 0.05)


def test_posterior_variance_builds_one_preconditioner(monkeypatch):
    """The blocks of test points solve one system: its pivoted-Cholesky factor is built once, not per block."""
    import opforge.kernels.kernel_sum as ks

    x, _ = _data(9)
    xt = torch.rand(300, D, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    built = []
    factor = ks._pivoted_cholesky
    monkeypatch.setattr(ks, "_pivoted_cholesky", lambda *a: built.append(1) or factor(*a))
    var = gp_posterior_variance(x, xt, "matern52", 0.05, 0.7, precond_rank=8, tol=1e-11)
    assert len(built) == 1
    np.testing.assert_allclose(_np(var), ref.gp_posterior_variance(_np(x), _np(xt), "matern52", 0.05, 0.7),
                               rtol=1e-8, atol=1e-10)


def test_posterior_variance_gradients_and_batches():
    """Gradients in x_train and x_test (along random directions), lengthscale, outputscale and noise against
    central differences of the reference; a batch of lengthscales gives each entry its own variances."""
    x, _ = _data(10)
    xt = torch.rand(7, D, generator=torch.Generator().manual_seed(2), dtype=x.dtype) * 3
    p0 = np.array([0.6, 1.4, 0.08])  # lengthscale, outputscale, noise
    leaves = [x.clone().requires_grad_(), xt.clone().requires_grad_()] + [
        torch.tensor(v, dtype=x.dtype, requires_grad=True) for v in p0]
    rng = np.random.default_rng(3)
    w = rng.standard_normal(7)
    out = gp_posterior_variance(leaves[0], leaves[1], "matern32", leaves[4], leaves[2], leaves[3], tol=1e-12)
    grads = torch.autograd.grad((out * torch.from_numpy(w)).sum(), leaves)
    xn, xtn = _np(x), _np(xt)
    vx, vt = rng.standard_normal(xn.shape), rng.standard_normal(xtn.shape)
    moves = [(float((_np(grads[0]) * vx).sum()), lambda e: (xn + e * vx, xtn, *p0)),
             (float((_np(grads[1]) * vt).sum()), lambda e: (xn, xtn + e * vt, *p0))]
    moves += [(float(grads[i + 2]), lambda e, i=i: (xn, xtn, *(p0 + e * np.eye(3)[i]))) for i in range(3)]
    for got, at in moves:
        want = _diff(lambda e: float((ref.gp_posterior_variance(*at(e)[:2], "matern32", at(e)[4], at(e)[2],
                                                                at(e)[3]) * w).sum()))
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)
    lsb = torch.tensor([0.5, 0.9], dtype=x.dtype).reshape(2, 1, 1)
    var = gp_posterior_variance(x, xt, "gaussian", 0.1, lsb, tol=1e-11)
    assert var.shape == (2, 7)
    for i in range(2):
        np.testing.assert_allclose(_np(var[i]), ref.gp_posterior_variance(xn, xtn, "gaussian", 0.1, float(lsb[i])),
                                   rtol=1e-8, atol=1e-10)


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
