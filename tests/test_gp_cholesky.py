"""The solvers' Cholesky path (``method="cholesky"``, and "auto" for up to 800 points): the dense float64 matrix,
its Cholesky factor, and autograd through both. Against the NumPy float64 references (exact: no iterations, no
probes), against the conjugate-gradient path, gradients and second gradients by finite differences
(``gradcheck``), the rule "auto" follows, and what happens where the matrix is not positive definite."""
import math

import numpy as np
import pytest
import torch

import opforge.kernels.kernel_sum as ks
from opforge.kernels import (KERNELS, SOLVE_METHODS, GPRegression, gp_marginal_log_likelihood,
                             gp_posterior_covariance, gp_posterior_mean, gp_posterior_variance, kernel_solve)
from opforge.reference import kernel_sum as ref

N, D = 37, 3


def _data(seed=0, n=N, d=D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype) * 3
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    xt = torch.cat([x[:3], torch.rand(8, d, generator=g, dtype=dtype) * 3.5 - 0.25])  # 3 on training points
    return x, y, xt


def _np(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("d", [3, 10])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_solver_against_the_references(kernel, d):
    """Odd sizes (37 points, 3 or 10 dimensions, 2 right-hand sides), an ARD lengthscale: the solve, the
    posterior mean and variance (test points on training points among them) and the log-likelihood with its
    log-determinant, to float64 rounding, reported as Cholesky solves."""
    x, y, xt = _data(d=d)
    ls = torch.linspace(0.7, 1.1, d, dtype=x.dtype) * math.sqrt(d / 3)
    os_, noise = 1.3, 0.05
    xn, tn, lsn = _np(x), _np(xt), _np(ls)
    A = ref.kernel_matrix(xn, xn, kernel, lsn, os_) + noise * np.eye(N)
    rhs = torch.stack([y, y.flip(0)], -1)
    alpha, info = kernel_solve(x, rhs, kernel, noise, ls, os_, return_info=True)
    assert info["method"] == "cholesky" and info["iterations"] == 0 and info["converged"] and info["residual"] < 1e-12
    np.testing.assert_allclose(_np(alpha), np.linalg.solve(A, _np(rhs)), rtol=1e-10, atol=1e-12)
    mean = gp_posterior_mean(x, y, xt, kernel, noise, ls, os_)
    np.testing.assert_allclose(_np(mean), ref.kernel_matrix(tn, xn, kernel, lsn, os_) @ np.linalg.solve(A, _np(y)),
                               rtol=1e-10, atol=1e-12)
    var = gp_posterior_variance(x, xt, kernel, noise, ls, os_)
    np.testing.assert_allclose(_np(var), ref.gp_posterior_variance(xn, tn, kernel, noise, lsn, os_), rtol=1e-9,
                               atol=1e-12)
    mll, info = gp_marginal_log_likelihood(x, y, kernel, noise, ls, os_, return_info=True)
    assert info["method"] == "cholesky" and info["num_probes"] == 0
    np.testing.assert_allclose(float(mll), ref.gp_log_marginal_likelihood(xn, _np(y), kernel, noise, lsn, os_),
                               rtol=1e-12)
    np.testing.assert_allclose(float(info["logdet"]), np.linalg.slogdet(A)[1], rtol=1e-12)


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern52"])
def test_the_two_paths_agree(kernel):
    """Cholesky and conjugate gradients (tol 1e-12) on one problem with batches of points, lengthscales and
    outputscales: the same shapes and values, and the same gradients in every input."""
    x, y, xt = _data(1, n=20)
    xb = torch.stack([x, x.flip(0)])  # [2, 20, 3]
    out = {}
    for method in ("cholesky", "cg"):
        leaves = [xb.clone().requires_grad_(), y.clone().requires_grad_(),
                  torch.tensor([[[0.6, 0.8, 1.0]]], dtype=x.dtype).expand(3, 1, 1, 3).clone().requires_grad_(),
                  torch.tensor([1.1, 1.3, 0.7], dtype=x.dtype).reshape(3, 1).requires_grad_(),
                  torch.tensor(0.07, dtype=x.dtype, requires_grad=True)]
        xr, yr, ls, os_, nz = leaves
        kw = dict(tol=1e-12, precond_rank=20, method=method)
        alpha = kernel_solve(xr, yr, kernel, nz, ls, os_, **kw)
        mll = gp_marginal_log_likelihood(xr, yr, kernel, nz, ls, os_, **kw)
        var = gp_posterior_variance(xr, xt, kernel, nz, ls, os_, **kw)
        assert alpha.shape == (3, 2, 20) and mll.shape == (3, 2) and var.shape == (3, 2, 11)
        w = torch.linspace(-1, 1, alpha.numel(), dtype=x.dtype).reshape(alpha.shape)
        grads = torch.autograd.grad((alpha * w).sum() + var.sum(), leaves)
        out[method] = [alpha.detach(), mll.detach(), var.detach(), *grads]
    for a, b in zip(out["cholesky"], out["cg"]):
        # (the likelihood's log-determinant on the CG path is exact only with a rank-N preconditioner, which
        # the Gaussian's pivoted factor stops short of: 1e-4 of the matrix, tests/test_gp.py)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("kernel,d", [("gaussian", 2), ("matern52", 2), ("gaussian", 10), ("cauchy", 10)])
def test_gradients_and_second_gradients_by_finite_differences(kernel, d):
    """gradcheck and gradgradcheck of each solver in every differentiable input, with two coincident training
    points (r = 0 off the diagonal: a smooth kernel's slope there is 0, its curvature not); D = 10 takes the
    distances' expansion |p|^2 + |q|^2 - 2 p.q (D > 8, no square root), D = 2 exact differences."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(7, d, generator=g, dtype=torch.float64) * 2
    x[5] = x[1]
    y = torch.randn(7, generator=g, dtype=torch.float64)
    xt = torch.rand(3, d, generator=g, dtype=torch.float64) * 2
    ls = torch.linspace(0.7, 1.2 * d, d, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, y, xt, ls, torch.tensor(1.3, dtype=torch.float64),
                                                   torch.tensor([0.1], dtype=torch.float64))]

    def f(x, y, xt, ls, os_, nz):
        kw = dict(kernel=kernel, noise=nz, lengthscale=ls, outputscale=os_, method="cholesky")
        return torch.cat([kernel_solve(x, y, **kw), gp_marginal_log_likelihood(x, y, **kw).reshape(1),
                          gp_posterior_variance(x, xt, **kw), gp_posterior_mean(x, y, xt, **kw)])
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("kernel,d", [("matern52", 3), ("gaussian", 10)])
def test_written_out_backwards_match_plain_autograd(kernel, d):
    """The likelihood's and the kernel matrix's backwards are written out (``_CholeskyMLL``, ``_DenseK``); under
    torch.func and forward-mode AD, which do not take custom autograd Functions, the same steps run as plain torch
    ops. All three give one gradient of the likelihood and of a solve, in x, the lengthscale, the outputscale and
    the noise (with coincident training points)."""
    import torch.autograd.forward_ad as fwad

    x, y, _ = _data(4, n=9, d=d)
    x[6] = x[2]
    params = (x, torch.tensor(0.8, dtype=x.dtype), torch.tensor(1.4, dtype=x.dtype), torch.tensor(0.05, dtype=x.dtype))

    def f(x, ls, os_, nz):
        kw = dict(kernel=kernel, noise=nz, lengthscale=ls, outputscale=os_, method="cholesky")
        return gp_marginal_log_likelihood(x, y, **kw) + kernel_solve(x, y, **kw).square().sum()

    leaves = [t.clone().requires_grad_() for t in params]
    written = torch.autograd.grad(f(*leaves), leaves)
    plain = torch.func.grad(f, argnums=(0, 1, 2, 3))(*params)
    for a, b in zip(written, plain):  # (one gradient summed in other orders: rounding, of entries that cancel)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    v = [torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype) for t in params]
    with fwad.dual_level():
        tangent = fwad.unpack_dual(f(*(fwad.make_dual(t, dt) for t, dt in zip(params, v)))).tangent
    np.testing.assert_allclose(float(tangent), sum(float((a * dt).sum()) for a, dt in zip(written, v)), rtol=1e-8)


@pytest.mark.parametrize("kernel,d", [("matern32", 2), ("imq", 10)])
def test_gradients_in_one_point_set_alone(kernel, d):
    """K(x_train, x_test) with only one side requiring grad (numbers for the scales): the kernel matrix's
    written-out backward computes that side's gradient alone, and a recorded backward differentiates only it
    (it had asked autograd for the other side's too, an error)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(7, d, generator=g, dtype=torch.float64)
    xt = torch.cat([x[:1], torch.rand(2, d, generator=g, dtype=torch.float64)])
    for side in ("x_train", "x_test"):
        def f(t):
            a, b = (t, xt) if side == "x_train" else (x, t)
            return gp_posterior_covariance(a, b, kernel, 0.1, 0.8, 1.3, method="cholesky")
        leaf = (x if side == "x_train" else xt).clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (leaf,)) and torch.autograd.gradgradcheck(f, (leaf,)), side


def test_laplacian_gradients_at_coincident_points_are_finite():
    """The Laplacian's slope at r = 0 is taken as 0 (the kernel sums' convention): coincident points give finite
    gradients, the conjugate-gradient path's (a solve's: the likelihood's are a stochastic estimate there)."""
    x, y, _ = _data(3, n=12)
    x = torch.cat([x, x[:4]])
    y = torch.cat([y, y[:4] + 0.1])
    grads = {}
    for method in ("cholesky", "cg"):
        xr = x.clone().requires_grad_()
        out = kernel_solve(xr, y, "laplacian", 0.1, 0.8, tol=1e-12, method=method)
        grads[method], = torch.autograd.grad(out, xr, torch.linspace(-1, 1, 16, dtype=x.dtype))
    assert torch.isfinite(grads["cholesky"]).all()
    torch.testing.assert_close(grads["cholesky"], grads["cg"], rtol=1e-7, atol=1e-9)


def test_auto_takes_cholesky_up_to_a_size_by_device_and_a_memory_bound(monkeypatch):
    """"auto" is Cholesky for N <= 4096 on a CPU (faster than conjugate gradients at every size of
    perf/results/solvers/cpu.json) and N <= 800 elsewhere (GPyTorch's max_cholesky_size, until a GPU has timed
    both) while the matrices, with the D per entry autograd may keep of exact differences, stay within 2^26
    entries; conjugate gradients beyond. The bounds are lowered here so that the conjugate-gradient side of each
    runs small."""
    assert (ks._CHOLESKY_MAX, ks._DENSE_ENTRIES) == ({"cpu": 4096, "cuda": 800}, 1 << 26)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ks._dense_wanted("auto", 4096, 3, "gaussian", (), cpu) and not ks._dense_wanted("auto", 4097, 3,
                                                                                           "gaussian", (), cpu)
    assert ks._dense_wanted("auto", 800, 3, "gaussian", (), gpu) and not ks._dense_wanted("auto", 801, 3,
                                                                                          "gaussian", (), gpu)
    assert not ks._dense_wanted("auto", 801, 3, "gaussian", (), torch.device("meta"))  # (others: a GPU's)
    assert not ks._dense_wanted("auto", 4096, 8, "matern32", (), cpu)  # 9 x 4096^2 entries > 2^26
    monkeypatch.setattr(ks, "_CHOLESKY_MAX", {"cpu": 12, "cuda": 12})
    x, y, xt = _data(4, n=13)
    for n, want in ((12, "cholesky"), (13, "cg")):
        assert kernel_solve(x[:n], y[:n], "matern32", 0.1, return_info=True)[1]["method"] == want
        assert gp_marginal_log_likelihood(x[:n], y[:n], "matern32", 0.1, return_info=True)[1]["method"] == want
    for method in ("cholesky", "cg"):  # the named method, whatever the size
        assert kernel_solve(x, y, "matern32", 0.1, return_info=True, method=method)[1]["method"] == method
    monkeypatch.setattr(ks, "_CHOLESKY_MAX", {"cpu": 800, "cuda": 800})
    # 2 x 10^2 entries x (D + 1) per entry for exact differences (D = 3 <= 8): 800, then 2 x 10^2 for the expansion
    monkeypatch.setattr(ks, "_DENSE_ENTRIES", 799)
    xb = torch.stack([x[:10], x[1:11]])
    assert kernel_solve(xb, y[:10], "gaussian", 0.1, return_info=True)[1]["method"] == "cg"
    x9 = torch.rand(2, 10, 9, dtype=torch.float64)
    assert kernel_solve(x9, y[:10], "gaussian", 0.1, return_info=True)[1]["method"] == "cholesky"
    assert kernel_solve(x9, y[:10], "matern52", 0.1, return_info=True)[1]["method"] == "cg"  # (a square root)
    calls = []
    dense = ks._dense_variance
    monkeypatch.setattr(ks, "_dense_variance", lambda *a: calls.append(1) or dense(*a))
    gp_posterior_variance(x9, x9[0, :4], "gaussian", 0.1)
    gp_posterior_variance(x9, x9[0, :4], "matern52", 0.1)
    assert calls == [1]


def test_cg_is_cg_throughout(monkeypatch):
    """method="cg" factors nothing: the variance's and covariance's blocks are conjugate-gradient solves too,
    with a preconditioner or without one (which once let each block's solve take "auto", the Cholesky path
    at these sizes)."""
    factored = []
    factor = ks._dense_factor
    monkeypatch.setattr(ks, "_dense_factor", lambda *a, **k: factored.append(1) or factor(*a, **k))
    x, y, xt = _data(8, n=20)
    for rank in (0, 4):
        gp_posterior_variance(x, xt, "matern52", 0.1, precond_rank=rank, method="cg")
        gp_posterior_covariance(x, xt, "matern52", 0.1, precond_rank=rank, method="cg")
        kernel_solve(x, y, "matern52", 0.1, precond_rank=rank, method="cg")
        gp_marginal_log_likelihood(x, y, "matern52", 0.1, precond_rank=rank, method="cg")
        gp_posterior_mean(x, y, xt, "matern52", 0.1, precond_rank=rank, method="cg")
    assert not factored


def test_not_positive_definite_in_float64(monkeypatch):
    """A noise far below the kernel matrix's rounding (1e-18 against points 1e-3 apart, a Gaussian kernel of
    lengthscale 1): "cholesky" says so, naming the noise; "auto" hands the system to conjugate gradients."""
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3
    y = torch.randn(60, dtype=torch.float64)
    for call in (lambda m: kernel_solve(x, y, noise=1e-18, method=m),
                 lambda m: gp_marginal_log_likelihood(x, y, noise=1e-18, method=m),
                 lambda m: gp_posterior_variance(x, x[:2], noise=1e-18, method=m)):
        with pytest.raises(ValueError, match=r"method='cholesky' found outputscale K\(x, x\) \+ noise I not positive "
                                             r"definite in float64 \(noise 1e-18\)"):
            call("cholesky")
    handed = []

    def cg(*args, **kwargs):
        handed.append(1)
        raise RuntimeError("conjugate gradients reached")

    monkeypatch.setattr(ks, "_cg", cg)
    for call in (lambda: kernel_solve(x, y, noise=1e-18), lambda: gp_marginal_log_likelihood(x, y, noise=1e-18),
                 lambda: gp_posterior_variance(x, x[:2], noise=1e-18, precond_rank=0)):
        with pytest.raises(RuntimeError, match="conjugate gradients reached"):
            call()
    assert len(handed) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_inputs(dtype):
    """float32 and bfloat16 points and targets: the float64 Cholesky solve of the rounded inputs, returned in
    their dtype (bfloat16 through float32, as on the conjugate-gradient path)."""
    x, y, xt = (t.to(dtype) for t in _data(5))
    alpha = kernel_solve(x, y, "matern32", 0.05, 0.8)
    want = kernel_solve(x.double(), y.double(), "matern32", 0.05, 0.8)
    assert alpha.dtype == dtype
    torch.testing.assert_close(alpha.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)
    var = gp_posterior_variance(x, xt, "matern32", 0.05, 0.8)
    assert var.dtype == dtype
    torch.testing.assert_close(var.double(), gp_posterior_variance(x.double(), xt.double(), "matern32", 0.05, 0.8),
                               rtol=1e-2, atol=1e-3)
    mll = gp_marginal_log_likelihood(x, y, "matern32", 0.05, 0.8)
    assert mll.dtype == dtype and math.isfinite(float(mll))


def test_gp_regression_is_exact_and_deterministic():
    """The module's default: no probes, so the likelihood is the reference's whatever the generator, and a fit
    is the same fit twice."""
    x, y, xt = _data(6)
    gp = GPRegression(x, y, "matern52", lengthscale=0.7, noise=0.05, mean=0.2).double()
    a = gp.marginal_log_likelihood(generator=torch.Generator().manual_seed(1))
    b = gp.marginal_log_likelihood(generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    ls, os_, nz, c = (float(t.detach()) for t in (gp.lengthscale, gp.outputscale, gp.noise, gp.mean_constant))
    np.testing.assert_allclose(_np(a), ref.gp_log_marginal_likelihood(_np(x), _np(y) - c, "matern52", nz, ls, os_),
                               rtol=1e-12)
    fits = []
    for _ in range(2):
        m = GPRegression(x, y, "matern52", lengthscale=0.7, noise=0.05).double()
        fits.append((m.fit(steps=5, lr=0.05), m(xt).detach()))
    assert fits[0][0] == fits[1][0]
    assert torch.equal(fits[0][1], fits[1][1])


def test_method_is_checked():
    x, y, xt = _data(7, n=5)
    calls = [lambda m: kernel_solve(x, y, method=m), lambda m: gp_posterior_mean(x, y, xt, method=m),
             lambda m: gp_posterior_variance(x, xt, method=m), lambda m: gp_marginal_log_likelihood(x, y, method=m),
             lambda m: GPRegression(x, y, method=m)]
    assert SOLVE_METHODS == ("auto", "cholesky", "cg")
    for call in calls:
        for bad in ("dense", "Cholesky", None, 1, True):
            with pytest.raises(ValueError, match=r"method must be one of \['auto', 'cholesky', 'cg'\], got"):
                call(bad)
