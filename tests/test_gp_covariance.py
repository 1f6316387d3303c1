"""gp_posterior_covariance and GPRegression(return_covariance=True): the joint posterior covariance between test
points, on both solver paths, against the dense NumPy float64 posterior; its diagonal is gp_posterior_variance's,
its gradients agree across the paths and with finite differences, and it makes a MultivariateNormal."""
import numpy as np
import pytest
import torch

from opforge.kernels import GPRegression, gp_posterior_covariance, gp_posterior_mean, gp_posterior_variance
from opforge.reference import kernel_sum as ref

N, D = 23, 2
METHODS = pytest.mark.parametrize("method", ["cholesky", "cg"])


def _data(seed=0, n=N, t=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g, dtype=dtype) * 3
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    xt = torch.cat([x[:2], torch.rand(t - 3, D, generator=g, dtype=dtype) * 3, x[:1] + 30])  # on, near, far
    return x, y, xt


def _np(t):
    return t.detach().double().numpy()


def _want(x, xt, kernel, noise, ls, os_):
    xn, tn = _np(x), _np(xt)
    A = ref.kernel_matrix(xn, xn, kernel, ls, os_) + noise * np.eye(len(xn))
    ks = ref.kernel_matrix(tn, xn, kernel, ls, os_)
    return ref.kernel_matrix(tn, tn, kernel, ls, os_) - ks @ np.linalg.solve(A, ks.T)


@METHODS
@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern52", "imq"])
def test_against_the_dense_posterior(kernel, method):
    """The covariance to float64 rounding (test points on training points, between them, and far away, where
    it is the prior's), symmetric, its diagonal the variance, ``include_noise`` adding noise I."""
    x, _, xt = _data()
    cov = gp_posterior_covariance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-12, method=method)
    assert cov.shape == (9, 9) and cov.dtype == torch.float64
    np.testing.assert_allclose(_np(cov), _want(x, xt, kernel, 0.05, 0.7, 1.3), rtol=1e-9, atol=1e-11)
    assert torch.equal(cov, cov.mT)
    var = gp_posterior_variance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-12, method=method)
    torch.testing.assert_close(cov.diagonal().clamp_min(0), var, rtol=1e-10, atol=1e-12)
    noisy = gp_posterior_covariance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-12, method=method, include_noise=True)
    torch.testing.assert_close(noisy, cov + 0.05 * torch.eye(9, dtype=cov.dtype))


@METHODS
def test_batches_empty_and_lower_precision(method):
    """A batch of lengthscales gives each entry its own covariance; no test points, [..., 0, 0]; float32 and
    bfloat16 points come back in their dtype (bfloat16 through float32)."""
    x, _, xt = _data(1)
    ls = torch.tensor([0.5, 0.9], dtype=x.dtype).reshape(2, 1, 1)
    cov = gp_posterior_covariance(x, xt, "matern32", 0.05, ls, tol=1e-12, method=method)
    assert cov.shape == (2, 9, 9)
    for i in range(2):
        np.testing.assert_allclose(_np(cov[i]), _want(x, xt, "matern32", 0.05, float(ls[i]), 1.0), rtol=1e-9,
                                   atol=1e-11)
    assert gp_posterior_covariance(x, xt[:0], method=method).shape == (0, 0)
    for dtype in (torch.float32, torch.bfloat16):
        c = gp_posterior_covariance(x.to(dtype), xt.to(dtype), "matern32", 0.05, 0.7, method=method)
        assert c.dtype == dtype
        np.testing.assert_allclose(_np(c), _want(x.to(dtype), xt.to(dtype), "matern32", 0.05, 0.7, 1.0),
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_gradients_agree_across_paths_and_with_finite_differences():
    """gradcheck on the Cholesky path (x_train, x_test, lengthscale, outputscale, noise); the conjugate-gradient
    path's gradients equal its."""
    x, _, xt = _data(2, n=8, t=4)
    leaves = [x, xt[:3], torch.tensor(0.8, dtype=x.dtype), torch.tensor(1.2, dtype=x.dtype),
              torch.tensor(0.1, dtype=x.dtype)]
    leaves = [t.clone().requires_grad_() for t in leaves]

    def f(method):
        return lambda a, b, ls, os_, nz: gp_posterior_covariance(a, b, "matern52", nz, ls, os_, tol=1e-12,
                                                                 method=method)
    assert torch.autograd.gradcheck(f("cholesky"), leaves)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    grads = [torch.autograd.grad((f(m)(*leaves) * w).sum(), leaves) for m in ("cholesky", "cg")]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@METHODS
def test_gp_regression_returns_the_joint_posterior(method):
    """``gp(x_test, return_covariance=True)``: the posterior mean and covariance of the functions (and of the
    centred targets' mean constant), a MultivariateNormal with a 1e-8 jitter samples from it; asking for the
    variance too is an error."""
    x, y, xt = _data(3)
    gp = GPRegression(x, y, "matern52", lengthscale=0.7, noise=0.05, mean=0.2, tol=1e-12, method=method).double()
    ls, os_, nz, c = (t.detach() for t in (gp.lengthscale, gp.outputscale, gp.noise, gp.mean_constant))
    with torch.no_grad():
        mean, cov = gp(xt, return_covariance=True)
        _, cov_y = gp(xt, return_covariance=True, include_noise=True)
        want_mean = gp_posterior_mean(x, y - c, xt, "matern52", nz, ls, os_, tol=1e-12, method=method) + c
    torch.testing.assert_close(mean, want_mean)
    np.testing.assert_allclose(_np(cov), _want(x, xt, "matern52", float(nz), float(ls), float(os_)), rtol=1e-9,
                               atol=1e-11)
    torch.testing.assert_close(cov_y, cov + nz * torch.eye(9, dtype=cov.dtype))
    dist = torch.distributions.MultivariateNormal(mean, cov + 1e-8 * torch.eye(9, dtype=cov.dtype))
    assert dist.rsample((4,)).shape == (4, 9)
    with pytest.raises(ValueError, match="return_variance and return_covariance: ask for one"):
        gp(xt, return_variance=True, return_covariance=True)
    with pytest.raises(TypeError, match="return_covariance must be a bool"):
        gp(xt, return_covariance=1)
